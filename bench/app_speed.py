"""App speed on the built-in DLM, CPU: a timestep-slider move on the Denoising explorer and a
64-token, 64-step generation with capture, each against a baseline measured in the same run.

    python bench/app_speed.py [--repeats 5]

Baselines: a rerun of the Model page (the cheapest page: what any interaction costs) for the slider,
and the same generation through ``sap_core`` without capture and without the app for the button.
Targets (issue 7): slider re-render <= 150 ms; the generation in a few seconds.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from streamlit.testing.v1 import AppTest  # noqa: E402

from sap_core.diffusion import DecodeSpec, generate  # noqa: E402
from sap_core.models import load_model  # noqa: E402


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=600)
    at.run()
    model_rerun = statistics.median(timed(at.run) for _ in range(args.repeats))
    at.switch_page("pages/explorer.py").run()
    gen_app = timed(lambda: at.button[0].click().run())  # defaults: 64 tokens, 64 steps, temperature 0.8, capture on
    assert not at.exception and not at.error, at.error
    handle = load_model("tiny-dlm", device="cpu")  # same process: app.py has set torch's thread count
    spec = DecodeSpec(gen_length=64, steps=64, block_length=16, temperature=0.8)
    gen_plain = statistics.median(timed(lambda: generate(handle, "ROMEO.\n", spec)) for _ in range(3))
    moves = []
    for i in range(args.repeats):
        slider = at.slider(key="step")
        moves.append(timed(lambda: slider.set_value((i * 13 + 7) % 64).run()))
    slider_ms = statistics.median(moves) * 1000
    print(f"slider move re-render: {slider_ms:.0f} ms (target <= 150 ms); Model-page rerun {model_rerun * 1000:.0f} ms; "
          f"ratio {slider_ms / (model_rerun * 1000):.2f}x")
    print(f"64-token, 64-step generation with capture in the app: {gen_app:.2f} s; plain sap_core generate without "
          f"capture: {gen_plain:.2f} s; ratio {gen_app / gen_plain:.2f}x")


if __name__ == "__main__":
    main()
