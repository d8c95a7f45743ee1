"""``sinkscope sweep``: perplexity over methods x sparsities x patterns, as CSV and plot."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from sap_core.cli import common
from sap_core.errors import SapError
from sap_core.files import atomic_write, is_special, signals_held


def add_parser(sub) -> None:
    p = sub.add_parser(
        "sweep",
        help="perplexity over methods x sparsities x patterns",
        description="Prune with every method at every sparsity and pattern, score each by perplexity, and "
        "write a CSV (method, sparsity, pattern, ppl, ppl_se, prune_seconds, ...) with the dense "
        "model as the first row. --plot PNG draws it (plotly + kaleido).",
    )
    common.add_model(p)
    p.add_argument(
        "--methods", type=common.names, default=["magnitude", "wanda"], help="comma-separated methods (default magnitude,wanda)"
    )
    p.add_argument(
        "--sparsities", type=common.floats, default=[0.3, 0.5, 0.7], help="comma-separated sparsities (default 0.3,0.5,0.7)"
    )
    p.add_argument(
        "--patterns", type=common.names, default=["unstructured"], help="comma-separated patterns (default unstructured)"
    )
    common.add_sink(p)
    p.add_argument(
        "--sink-taus",
        type=common.taus,
        default=(),
        metavar="LIST",
        help="comma-separated taus, e.g. 0,0.01,0.02,0.05,0.1: one row per tau for each gated_* method "
        "(default: --sink-tau alone), plus the method's ungated twin (sink_wanda, sink_sparsegpt: the official rule) "
        "as the reference",
    )
    p.add_argument(
        "--heads",
        type=common.fraction,
        default=0.0,
        metavar="F",
        help="fraction of each block's attention heads the structured methods (struct_wanda, flap, their sink-aware "
        "variants) also remove (default 0: MLP channels only; LLaDA without GQA only)",
    )
    common.add_calibration(p)
    common.add_eval(p)
    p.add_argument(
        "--out",
        default="sweep.csv",
        metavar="CSV",
        help="CSV to write (default sweep.csv); the per-draw estimates go to <name>.estimates.npz beside it, "
        "finished rows to <name>.partial.csv while the sweep runs",
    )
    p.add_argument("--plot", default=None, metavar="PNG", help="also save the perplexity-vs-sparsity plot (PNG/SVG/PDF)")
    p.add_argument(
        "--plot-view",
        choices=("delta", "absolute"),
        default="delta",
        help="delta (default): change of perplexity against the dense model with ±2 paired SE of the difference; "
        "absolute: perplexity with each row's own ±1 SE (unpaired)",
    )
    g = p.add_argument_group("accuracy (with --metric acc:TASK)")
    g.add_argument(
        "--metric", default="ppl", help="ppl (default) or acc:TASK: also lm-eval accuracy on TASK (columns acc, acc_se, acc_task)"
    )
    g.add_argument("--limit", type=common.positive, default=None, help="documents of TASK (default: all)")
    g.add_argument("--mc-num", type=common.positive, default=32, help="Monte Carlo rows per request, DLM only (default 32)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="skip the jobs whose rows are already in <out>.partial.csv (from an interrupted run of the same sweep)",
    )
    p.add_argument(
        "--executor",
        choices=["serial", "ray"],
        default="serial",
        help="serial (default: one job after the other in this process) or ray (jobs spread over Ray workers; same rows)",
    )
    p.add_argument(
        "--address",
        default=None,
        metavar="HOST:PORT",
        help="with --executor ray: join this Ray cluster (started with 'ray start --head'); default: start Ray on this machine",
    )
    p.add_argument("--workers", type=int, default=2, metavar="N", help="with --executor ray: number of workers (default 2)")
    p.add_argument(
        "--gpus-per-worker",
        type=float,
        default=0.0,
        metavar="G",
        help="with --executor ray: GPUs per worker (default 0: CPU workers); > 0 loads the model on CUDA in each worker",
    )
    p.add_argument(
        "--cpus-per-worker",
        type=int,
        default=1,
        metavar="C",
        help="with --executor ray: CPUs (and torch threads) per worker (default 1)",
    )
    p.set_defaults(func=cmd_sweep)


def cmd_sweep(args) -> int:
    # lazy: --help must not import torch
    from sap_core.sweep import SerialExecutor, SweepSpec, SweepWriter, estimates_path, run_sweep, sweep_settings

    spec = SweepSpec(
        methods=tuple(args.methods),
        sparsities=tuple(args.sparsities),
        patterns=tuple(args.patterns),
        sink=common.sink_spec(args),
        calibration=common.calibration_spec(args),
        eval=common.eval_spec(args),
        metrics=common.metrics(args),
        sink_taus=tuple(args.sink_taus),
        heads=args.heads,
    )
    spec.validate()
    executor = SerialExecutor()
    if args.executor == "ray":
        from sap_core.distributed import RayExecutor  # lazy: Ray is optional and heavy (only --executor ray)

        executor = RayExecutor(
            workers=args.workers, address=args.address, gpus_per_worker=args.gpus_per_worker, cpus_per_worker=args.cpus_per_worker
        )
    elif args.address is not None:
        raise common.UsageError("--address needs --executor ray")
    if args.plot:
        _check_plot_path(args.plot)
    common.check_outputs(args)
    # Finished rows go to <out>.partial.csv as they arrive; --out is replaced only on success.
    writer = SweepWriter(args.out, resume=args.resume, settings=sweep_settings(args.model, spec))
    if args.resume and writer.done is not None:
        print(f"resuming: {len(writer.rows)} finished row(s) from {writer.partial}", file=sys.stderr)
    handle = common.load(args)
    try:
        with common.Bar("sweep", not args.quiet) as bar:
            df = run_sweep(handle, spec, progress=bar, on_result=writer.add, executor=executor, done=writer.done)
    except BaseException as exc:
        if writer.rows:
            again = (
                "run the same command with --resume to continue" if isinstance(exc, KeyboardInterrupt) else "--resume skips them"
            )
            print(
                f"note: the {len(writer.rows)} finished row(s) are in {writer.partial}; {args.out} was not changed; {again}",
                file=sys.stderr,
            )
        raise
    with signals_held():  # the CSV and its estimates are written (and the partial file removed) as one step
        writer.finish(df)
    side, plotted = estimates_path(args.out), not args.plot
    try:
        print(f"wrote {args.out}" + (f" and {side} (per-draw estimates)" if side.exists() else ""), file=sys.stderr)
        if args.plot:
            save_figure(df, args.plot, args.plot_view)
            plotted = True
            print(f"wrote {args.plot}", file=sys.stderr)
        if not args.quiet:
            cols = (
                ["label", "ppl", "ppl_se"]
                + [c for c in ("acc", "acc_se") if c in df.columns]
                + ["achieved_sparsity", "prune_seconds"]
            )
            print(df[cols].to_string(index=False), file=sys.stderr)
    except KeyboardInterrupt:  # the sweep's result is written: only the plot or the summary was cut short
        if not plotted:
            print(f"note: interrupted; {args.out} was written, the plot was not", file=sys.stderr)
            return 130
    failed = [(label, error) for label, error in zip(df["label"], df.get("error", [""] * len(df))) if str(error or "")]
    for label, error in failed:
        print(f"error: job '{label}' failed (its row in {args.out} holds the error): {error}", file=sys.stderr)
    return 1 if failed else 0


def _check_plot_path(path: str) -> None:
    if not is_special(path) and Path(path).suffix.lower() not in (".png", ".svg", ".pdf", ".jpg", ".jpeg", ".webp"):
        raise SapError(f"--plot '{path}': give a .png, .svg, .pdf, .jpg or .webp file name.")


def save_figure(df, path, view: str = "delta") -> None:
    """Draw the sweep with :func:`sap_core.viz.sweep_figure` (``view``: ``delta`` or ``absolute``) and write it with kaleido.

    kaleido 1.x drives a Chrome/Chromium; when none is on PATH and ``BROWSER_PATH`` is unset, Debian's
    ``/usr/bin/chromium`` is used.
    """
    from sap_core.viz import sweep_figure  # lazy: --help must not import torch (nor plotly)

    if "BROWSER_PATH" not in os.environ and not any(
        shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome", "chrome")
    ):
        if Path("/usr/bin/chromium").exists():
            os.environ["BROWSER_PATH"] = "/usr/bin/chromium"

    fig = sweep_figure(df, view)
    try:
        atomic_write(
            path, lambda tmp: fig.write_image(str(tmp), width=1000, height=600, scale=2), suffix=Path(path).suffix or ".png"
        )
    except SapError:
        raise
    except Exception as exc:  # kaleido raises several kinds when no browser works
        raise SapError(
            f"Could not write the plot '{path}' ({type(exc).__name__}: {exc}). Install Chromium "
            "(apt-get install chromium) or set BROWSER_PATH to a Chrome binary; the CSV was written."
        ) from None
