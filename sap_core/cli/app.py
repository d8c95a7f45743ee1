"""``sinkscope app``: start the Streamlit app (``python -m streamlit run app.py`` underneath).

Without ``--shared`` it serves one user on this machine (localhost only, as ``.streamlit/config.toml``
sets). ``--shared`` serves a class: the settings travel to the app in the environment
(:class:`sap_core.serving.ServerSettings`), checked here first so that a bad one is a one-line error
before Streamlit starts.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from sap_core.cli import common
from sap_core.serving import ServerSettings

APP = Path(__file__).resolve().parents[2] / "app.py"  # the checkout's app.py, beside the sap_core package


def add_parser(sub) -> None:
    p = sub.add_parser(
        "app",
        help="start the app (Streamlit); --shared serves a class",
        description="Start the SinkScope app ('streamlit run app.py'). By default it listens on localhost only. "
        "--shared serves a class from one server: the model picker lists the built-in models and the model "
        "directories under --models (no paths typed), variants are saved under --runs with names the server "
        "makes, no page shows a server path, and each student's runs and variants stay their own.",
    )
    p.add_argument("--shared", action="store_true", help="serve a class (needs --models and --runs)")
    p.add_argument("--models", metavar="DIR", default=None, help="directory whose model directories the picker offers")
    p.add_argument("--runs", metavar="DIR", default=None, help="directory where variants and shared runs are written")
    p.add_argument("--host", default="localhost", help="address to listen on (default localhost; 0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8501, help="port (default 8501)")
    p.add_argument("--no-heavy-jobs", action="store_true", help="turn off pruning, sweeps and benchmarks (shared mode)")
    p.add_argument("--max-gen-length", type=int, default=None, metavar="N", help="cap on a generation's length (shared mode)")
    p.add_argument(
        "--max-calibration-samples",
        type=int,
        default=None,
        metavar="N",
        help="cap on a prune's calibration windows (shared mode)",
    )
    p.add_argument(
        "--memory-budget",
        type=float,
        default=None,
        metavar="GB",
        help="memory all sessions' variants may hold together (default: half of what is free at start)",
    )
    p.set_defaults(func=cmd_app)


def cmd_app(args) -> int:
    if not args.shared and (args.models or args.runs):
        raise common.UsageError("--models and --runs serve a class: add --shared.")
    if not 0 < args.port < 65536:
        raise common.UsageError(f"--port must be between 1 and 65535 (got {args.port}).")
    settings = ServerSettings(
        shared=args.shared,
        models_dir=Path(args.models).expanduser() if args.models else None,
        runs_dir=Path(args.runs).expanduser() if args.runs else None,
        heavy_jobs=not args.no_heavy_jobs,
        max_gen_length=args.max_gen_length,
        max_calibration_samples=args.max_calibration_samples,
        memory_budget_gb=args.memory_budget,
    )  # a bad setting raises its one-line SapError here, before Streamlit starts
    if not APP.is_file():
        raise common.UsageError(f"app.py is not beside the sap_core package ({APP.parent}); run from a SinkScope checkout.")
    argv = [sys.executable, "-m", "streamlit", "run", str(APP), "--server.address", args.host, "--server.port", str(args.port)]
    env = dict(os.environ, **settings.to_env())
    os.chdir(APP.parent)  # .streamlit/config.toml is read from the working directory
    os.execvpe(argv[0], argv, env)
    return 0  # not reached: exec replaces this process
