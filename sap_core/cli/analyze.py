"""``sinkscope analyze``: the sink report of a trajectory or a fresh generation."""

from __future__ import annotations

import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np

from sap_core.cli import common
from sap_core.errors import SapError
from sap_core.files import atomic_write


def add_parser(sub) -> None:
    p = sub.add_parser(
        "analyze",
        help="sink analysis of a trajectory",
        description="Detect attention sinks in a trajectory (--trajectory NPZ recorded with --record-attention) "
        "or in a fresh generation of --prompt. Prints a JSON summary; --out writes the full report as JSON, "
        "--csv DIR its tables (positions, steps, layers, scores) as CSV. The summary ends with the five heads with the "
        "highest per-head sink score.",
    )
    common.add_model(p)
    common.add_decode(p)
    p.add_argument(
        "--trajectory", default=None, metavar="NPZ", help="trajectory saved by 'generate --record-attention --trajectory'"
    )
    common.add_sink(p)
    p.add_argument("--out", default=None, metavar="JSON", help="write the full report as JSON (SinkReport.from_json loads it)")
    p.add_argument("--csv", default=None, metavar="DIR", help="write the report tables as CSV files into DIR")
    p.set_defaults(func=cmd_analyze)


def cmd_analyze(args) -> int:
    # Cheap checks first: a wrong path fails before torch is imported.
    if args.trajectory and args.prompt:
        raise SapError("Give either --trajectory or --prompt, not both.")
    if args.trajectory and not Path(args.trajectory).is_file() and not Path(args.trajectory + ".npz").is_file():
        raise SapError(
            f"No trajectory at '{args.trajectory}'; write one with 'generate --record-attention --trajectory {args.trajectory}'."
        )
    common.check_outputs(args)
    # lazy: --help must not import torch
    from sap_core.decoding import Trajectory
    from sap_core.sink_report import analyze, ranked_heads

    sink_spec = common.sink_spec(args)
    if args.trajectory:
        path = Path(args.trajectory)
        traj = Trajectory.load(path)  # TrajectoryError (a SapError) for a foreign, damaged or non-finite file
        if traj.mass is None:
            raise SapError(
                f"'{path}' has no attention mass; regenerate it with 'generate --record-attention --trajectory {path}'."
            )
        source = str(path)
    else:
        # lazy: --help must not import torch
        from sap_core.attention import AttentionRecorder
        from sap_core.diffusion import generate

        spec = common.decode_spec(args)
        handle = common.load(args)
        with common.Bar("generate", not args.quiet) as bar:
            traj = generate(
                handle,
                args.prompt or common.DEFAULT_PROMPT,
                spec,
                recorder=AttentionRecorder(),
                progress=bar,
                allow_large_capture=args.allow_large_capture,
            )
        source = args.model
    report = analyze(traj, sink_spec)
    if args.out:
        atomic_write(args.out, report.to_json)
        print(f"wrote {args.out} (load with sap_core.sink_report.SinkReport.from_json)", file=sys.stderr)
    if args.csv:
        report.to_csv(args.csv)
        print(
            f"wrote {args.csv}/ (positions, steps, layers, scores .csv; load with sap_core.sink_report.read_csv)", file=sys.stderr
        )
    summary = _report_summary(report, source)
    summary["top_heads"] = [  # the per-head sink score's ranking (docs/sinks.md), strongest first
        {"layer": int(r.layer), "head": int(r.head), "position": int(r.position), "score": float(r.score)}
        for r in ranked_heads(traj).head(5).itertuples()
    ]
    common.write_json(summary, None)
    return 0


def _report_summary(report, source: str) -> dict:
    """A short JSON view of a SinkReport: the aggregate instability, label counts, the sink positions."""
    labels = report.labels
    counts = {name: int((labels == name).sum()) for name in ("stable", "transient", "unstable", "none")}
    order = np.argsort(-report.positions.frequency, kind="stable")
    sinks = [int(j) for j in order if report.positions.frequency[j] > 0][:10]
    return {
        "source": source,
        "spec": report.spec.to_dict(),
        "n_steps": report.n_steps,
        "length": report.length,
        "prompt_length": report.prompt_length,
        "aggregate": asdict(report.aggregate),
        "label_counts": counts,
        "top_sink_positions": [
            {
                "position": j,
                "frequency": float(report.positions.frequency[j]),
                "variance": float(report.positions.variance[j]),
                "label": str(labels[j]),
            }
            for j in sinks
        ],
        "dominant": report.dominant,
    }
