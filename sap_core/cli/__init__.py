"""The SinkScope command line: ``python -m sap_core`` (or ``sinkscope``) ``generate|analyze|prune|evaluate|sweep|animate|sinkstats|app``.

Every subcommand loads ``--model`` (a built-in name or a model directory, including one written by
``prune --save``), shows tqdm progress bars on stderr for long work, and writes JSON (or CSV for
sweeps) that loads back: to ``--out`` when given, else JSON to stdout. User errors (bad options,
missing files, impossible specs) print one line ``error: <message>`` to stderr and exit with status 2;
Ctrl-C exits with 130.

Heavy imports (torch, transformers) happen inside the handlers so that ``--help`` is instant.

One module per subcommand (its ``add_parser(sub)`` and ``cmd_*``); :mod:`sap_core.cli.common` holds what they share.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from sap_core.cli import analyze, animate, app, evaluate, generate, prune, sinkstats, sweep
from sap_core.cli.common import DEFAULT_PROMPT, EXIT_USAGE, Bar, Parser, UsageError
from sap_core.cli.sweep import save_figure
from sap_core.errors import SapError

__all__ = ["DEFAULT_PROMPT", "EXIT_USAGE", "Bar", "Parser", "Terminated", "UsageError", "build_parser", "main", "save_figure"]

SUBCOMMANDS = (generate, analyze, prune, evaluate, sweep, animate, sinkstats, app)  # in the order of the usage line


def build_parser() -> Parser:
    parser = Parser(
        prog="sinkscope" if Path(sys.argv[0]).name == "sinkscope" else "python -m sap_core",
        description="SinkScope: attention sinks and sink-aware pruning of diffusion language models.",
    )
    sub = parser.add_subparsers(dest="command", required=True)  # its metavar lists every subcommand, set at the end
    for module in SUBCOMMANDS:
        module.add_parser(sub)
    sub.metavar = "{" + ",".join(sub.choices) + "}"  # every subcommand on the usage line
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that every ``finally`` runs (temporaries are removed)."""


def _on_sigterm(signum, frame):
    raise Terminated()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        args = parser.parse_args(argv)
        return int(args.func(args) or 0)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt as exc:
        print("error: terminated" if isinstance(exc, Terminated) else "error: interrupted", file=sys.stderr)
        return 143 if isinstance(exc, Terminated) else 130
    except BrokenPipeError:  # e.g. piped into `head`: stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except Exception as exc:
        if isinstance(exc, SapError):
            message = " ".join(str(exc).split()) or type(exc).__name__
            print(f"error: {message}", file=sys.stderr)
            return EXIT_USAGE
        if isinstance(exc, OSError) and exc.strerror:  # disk full, permission denied... while writing
            where = f" ({exc.filename})" if exc.filename else ""
            print(
                f"error: {exc.strerror}{where}; nothing was replaced (outputs are written to a temporary file first).",
                file=sys.stderr,
            )
            return 1
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
