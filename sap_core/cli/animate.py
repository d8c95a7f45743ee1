"""``sinkscope animate``: a GIF or HTML of the sinks moving over the denoising steps."""

from __future__ import annotations

import sys
from pathlib import Path

from sap_core.cli import common
from sap_core.errors import SapError


def add_parser(sub) -> None:
    p = sub.add_parser(
        "animate",
        help="GIF or HTML of the sinks moving over the denoising steps",
        description="Draw the sinks of a trajectory (from 'generate --record-attention --trajectory NPZ') "
        "moving over the denoising steps: --out X.gif writes an animated GIF (per step, the mass each "
        "position receives, tokens and sinks marked), --out X.html the explorer's interactive view "
        "as one self-contained page. --model names the tokenizer for the token texts.",
    )
    p.add_argument(
        "--trajectory", required=True, metavar="NPZ", help="trajectory saved by 'generate --record-attention --trajectory'"
    )
    p.add_argument(
        "--out", required=True, metavar="GIF|HTML", help="file to write; the extension (.gif or .html) picks the format"
    )
    p.add_argument(
        "--model",
        default=None,
        metavar="MODEL",
        help="model directory or built-in name whose tokenizer writes the token texts (default: token ids)",
    )
    p.add_argument(
        "--color-range",
        default="global99",
        choices=["global99", "global", "per-step"],
        help="colour/height range: fixed over all steps (99th percentile or maximum) or per step (default global99)",
    )
    p.add_argument("--layer", type=int, default=None, help="layer of the HTML's step x position map (default: all layers)")
    p.add_argument("--frame-ms", type=int, default=80, metavar="MS", help="time per frame in ms (default 80)")
    common.add_sink(p)
    p.set_defaults(func=cmd_animate)


def cmd_animate(args) -> int:
    path = Path(args.trajectory)
    if not path.is_file():
        raise SapError(f"No trajectory at '{path}'; write one with 'generate --record-attention --trajectory {path}'.")
    if Path(args.out).suffix.lower() not in (".gif", ".html", ".htm"):
        raise SapError(f"--out '{args.out}' must end in .gif or .html (the extension picks the format).")
    # lazy: --help must not import torch
    from sap_core import animation
    from sap_core.decoding import Trajectory
    from sap_core.sink_report import analyze

    spec = animation.AnimationSpec(color_range=args.color_range, layer=args.layer, frame_ms=args.frame_ms)
    try:
        traj = Trajectory.load(path)
    except Exception as exc:  # numpy/zipfile/json raise many kinds for a foreign file
        raise SapError(f"'{path}' is not a trajectory .npz written by 'generate --trajectory' ({type(exc).__name__}).") from None
    if traj.mass is None:
        raise SapError(f"'{path}' has no attention mass; regenerate it with 'generate --record-attention --trajectory {path}'.")
    report = analyze(traj, common.sink_spec(args))
    tokens = animation.tokenizer_texts(args.model, traj.final_tokens) if args.model else None
    out = animation.write_animation(report, args.out, tokens, spec)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB, {report.n_steps} steps)", file=sys.stderr)
    return 0
