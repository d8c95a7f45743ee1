"""Cost of sink analysis against the bare mass reduction, on a random mass of a large model's shape.

Times, in one process, on the same ``float32 [steps, layers, heads, L]`` array (default
``[64, 32, 32, 512]``, 128 MiB):

* baseline: ``mass.sum(axis=(1, 2))``, the one pass over the mass any sink statistic needs;
* ``analyze`` cold (reduction cache cleared), ``analyze`` warm (reduction cached), and
  ``report.rescore(k=..., tau=...)`` (what a slider change costs).

Prints the median of each in ms and its ratio to the baseline. Target (issue 4): analyze well
under a second on CPU.

    python bench/sink_analysis.py [--shape 64 32 32 512] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass

import numpy as np

from sap_core.sink_report import analyze
from sap_core.sinks import SinkSpec, clear_cache


@dataclass
class RandomTrajectory:
    mass: np.ndarray
    valid_length: np.ndarray
    decoded_at: np.ndarray
    final_tokens: np.ndarray
    prompt_length: int
    causal: bool = False


def make(shape: tuple[int, int, int, int], seed: int = 0) -> RandomTrajectory:
    S, Ly, H, L = shape
    rng = np.random.default_rng(seed)
    mass = rng.random(shape, dtype=np.float32)
    mass[..., 0] += 4.0  # a sink
    mass *= L / mass.sum(-1, keepdims=True)  # every (step, layer, head) receives L in all
    P = L // 4
    decoded_at = np.full(L, -1, np.int64)
    decoded_at[P:] = np.arange(L - P) * S // (L - P)
    return RandomTrajectory(mass, np.full(S, L, np.int64), decoded_at, np.zeros(L, np.int64), P)


def median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=4, default=[64, 32, 32, 512], metavar=("STEPS", "LAYERS", "HEADS", "L"))
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    traj = make(tuple(args.shape))
    spec = SinkSpec(tau=0.05)
    analyze(traj, spec)  # warm-up
    report = analyze(traj, spec)

    def cold():
        clear_cache()
        analyze(traj, spec)

    timings = {
        "baseline mass.sum(axis=(1, 2))": median_ms(lambda: traj.mass.sum(axis=(1, 2)), args.repeats),
        "analyze, cold (reduces the mass)": median_ms(cold, args.repeats),
        "analyze, warm (reduction cached)": median_ms(lambda: analyze(traj, spec), args.repeats),
        "rescore (new k and tau)": median_ms(lambda: report.rescore(k=1.5, tau=0.1), args.repeats),
    }
    base = timings["baseline mass.sum(axis=(1, 2))"]
    print(f"mass shape {args.shape} ({traj.mass.nbytes / 2**20:.0f} MiB float32), median of {args.repeats}")
    for name, ms in timings.items():
        print(f"{name:36s} {ms:8.1f} ms   {ms / base:6.2f}x baseline")


if __name__ == "__main__":
    main()
