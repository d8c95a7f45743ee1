"""Write ``docs/explorer.gif``, the README's picture: the built-in DLM's sinks moving over one run.

A fixed run (``tiny-dlm``, prompt ``ROMEO.``, 48 tokens in 48 steps, the explorer's default sampling at a
fixed seed) generated with attention capture, analysed with the default sink rule and drawn with the same
GIF export as ``python -m sap_core animate`` (``sap_core.animation``). Run from the repository root:

    python scripts/make_readme_gif.py            # or --out PATH
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sap_core import animation
from sap_core.attention import AttentionRecorder
from sap_core.decoding import DecodeSpec
from sap_core.diffusion import generate
from sap_core.models import load_model
from sap_core.sink_report import analyze
from sap_core.sinks import SinkSpec

MODEL = "tiny-dlm"
PROMPT = "ROMEO.\n"
DECODE = DecodeSpec(gen_length=48, steps=48, block_length=16, temperature=0.8, seed=0)
FRAME_MS = 150  # slower than the explorer's 80 ms: a reader follows the sinks in the README


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="docs/explorer.gif", help="GIF to write (default docs/explorer.gif)")
    args = ap.parse_args()
    handle = load_model(MODEL, device="cpu", dtype="float32")
    traj = generate(handle, PROMPT, DECODE, recorder=AttentionRecorder())
    report = analyze(traj, SinkSpec())
    tokens = animation.tokenizer_texts(MODEL, traj.final_tokens)
    out = animation.write_animation(report, args.out, tokens, animation.AnimationSpec(frame_ms=FRAME_MS))
    print(f"wrote {out} ({Path(out).stat().st_size / 1e6:.2f} MB, {report.n_steps} steps)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
