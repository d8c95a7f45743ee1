"""App speed on the built-in DLM, CPU, under AppTest: a 64-token, 64-step generation with capture
on the Denoising explorer against the same generation through ``sap_core`` without capture and
without the app, measured in the same run. Target (issue 7): a few seconds. (Stepping through the
run happens in the browser: ``bench/browser_latency.py`` measures it where the user sits.)

    python bench/app_speed.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from streamlit.testing.v1 import AppTest

from sap_core.decoding import DecodeSpec
from sap_core.diffusion import generate
from sap_core.models import load_model

ROOT = Path(__file__).resolve().parents[1]


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="plain generations timed (median)")
    args = parser.parse_args()
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=600)
    at.run()
    at.switch_page("pages/explorer.py").run()
    gen_app = timed(lambda: at.button[0].click().run())  # defaults: 64 tokens, 64 steps, temperature 0.8, capture on
    assert not at.exception and not at.error, at.error
    handle = load_model("tiny-dlm", device="cpu")  # same process: app.py has set torch's thread count
    spec = DecodeSpec(gen_length=64, steps=64, block_length=16, temperature=0.8)
    gen_plain = statistics.median(timed(lambda: generate(handle, "ROMEO.\n", spec)) for _ in range(args.repeats))
    print(
        f"64-token, 64-step generation with capture in the app: {gen_app:.2f} s; plain sap_core generate without "
        f"capture: {gen_plain:.2f} s; ratio {gen_app / gen_plain:.2f}x"
    )


if __name__ == "__main__":
    main()
