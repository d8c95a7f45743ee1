"""Rendering the explorer's GIF: Pillow drawing each step straight into a fixed palette (what
``sap_core.animation.gif_bytes`` does) against kaleido exporting a plotly bar chart of the same step
(plotly's own static export, a headless Chromium per call batch), measured in the same run.

    python bench/gif_render.py [--steps 64] [--kaleido-frames 8]

Prints ms per frame for both and the ratio. kaleido needs Chromium: set BROWSER_PATH=/usr/bin/chromium.
"""

from __future__ import annotations

import argparse
import os
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--kaleido-frames", type=int, default=8, help="frames exported with kaleido (it is slow)")
    args = ap.parse_args()
    os.environ.setdefault("BROWSER_PATH", "/usr/bin/chromium")
    import numpy as np
    import plotly.graph_objects as go
    import torch

    from sap_core import animation
    from sap_core.attention import AttentionRecorder
    from sap_core.decoding import DecodeSpec
    from sap_core.diffusion import generate
    from sap_core.models import load_model
    from sap_core.sink_report import analyze
    from sap_core.sinks import SinkSpec
    from sap_core.viz import STATE_COLORS

    torch.set_num_threads(1)
    handle = load_model("tiny-dlm", device="cpu")
    traj = generate(
        handle, "ROMEO.\n", DecodeSpec(args.steps, args.steps, 16, "low_confidence", 0.8, 0.0, 0), recorder=AttentionRecorder()
    )
    report = analyze(traj, SinkSpec(tau=0.05))
    tokens = animation.readable_tokens(handle.decode, traj.final_tokens)

    t = time.perf_counter()
    gif = animation.gif_bytes(report, tokens)
    pillow_ms = 1000 * (time.perf_counter() - t) / report.n_steps

    import kaleido  # noqa: F401  (plotly's static export)

    mult = animation.step_mass(report)
    hi = animation.color_limits(mult, "global99")[0, 1]
    names = ["prompt", "decoded", "decoding", "masked", "absent"]
    frames = []
    kaleido_n = min(args.kaleido_frames, report.n_steps)
    t = time.perf_counter()
    for s in range(kaleido_n):  # the same picture: bars coloured by state, sinks red, tokens under the bars
        colors = ["#e53935" if report.is_sink[s, j] else STATE_COLORS[names[report.state[s, j]]] for j in range(report.length)]
        fig = go.Figure(go.Bar(x=list(range(report.length)), y=np.nan_to_num(mult[s]), marker_color=colors))
        fig.update_layout(
            title=f"Step {s}",
            width=1100,
            height=360,
            yaxis_range=[0, hi],
            template="plotly_white",
            xaxis=dict(tickmode="array", tickvals=list(range(report.length)), ticktext=tokens, tickangle=-90),
        )
        frames.append(fig.to_image(format="png"))
    kaleido_ms = 1000 * (time.perf_counter() - t) / kaleido_n
    print(f"{report.n_steps} steps, {report.length} positions; GIF {len(gif) / 1e6:.2f} MB")
    print(f"Pillow, drawn into a fixed palette: {pillow_ms:8.1f} ms per frame (the whole GIF, written)")
    print(f"kaleido, plotly PNG export:         {kaleido_ms:8.1f} ms per frame ({kaleido_n} frames, PNG only, no GIF assembly)")
    print(f"Pillow is {kaleido_ms / pillow_ms:.0f}x faster")


if __name__ == "__main__":
    main()
