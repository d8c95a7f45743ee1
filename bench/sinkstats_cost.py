"""Cost of the across-prompt AR-vs-DLM statistics against plain generation, in one process.

Loads tiny-dlm and tiny-ar once, then times, on one CPU thread:

* baseline: one prompt decoded by each model with the attention recorder attached (``generate``
  twice), the least work any sink statistic of that prompt needs; median of ``--repeats`` runs;
* the same without the recorder (what the capture itself costs);
* :func:`sap_core.sinkstats.run_sinkstats` over ``--prompts`` prompts (windows of the evaluation
  text), which reuses the loaded models and analyses each trajectory as it goes.

Prints the seconds (wall and CPU), the per-prompt cost of ``run_sinkstats`` and its ratio to the baseline (1.0 =
the analysis and bookkeeping cost nothing on top of decoding), and the load average, since on a
shared machine wall time depends on it (the CPU-time ratio much less).

    python bench/sinkstats_cost.py [--prompts 32] [--gen-length 64] [--steps 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from sap_core.attention import AttentionRecorder
from sap_core.decoding import DecodeSpec
from sap_core.diffusion import generate
from sap_core.models import load_model
from sap_core.sinkstats import evaluation_prompts, run_sinkstats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--gen-length", type=int, default=64)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--block-length", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    load_before = os.getloadavg()
    dlm, ar = load_model("tiny-dlm", device="cpu"), load_model("tiny-ar", device="cpu")
    spec = DecodeSpec(gen_length=args.gen_length, steps=args.steps, block_length=args.block_length)
    prompts = evaluation_prompts(dlm, args.prompts)
    generate(dlm, prompts[0], DecodeSpec(gen_length=16, steps=16, block_length=16))  # warm-up

    def pair(record: bool) -> tuple[float, float]:
        wall, cpu = time.perf_counter(), time.process_time()
        for handle in (dlm, ar):
            generate(handle, prompts[0], spec, recorder=AttentionRecorder() if record else None)
        return time.perf_counter() - wall, time.process_time() - cpu

    def median(runs):  # (wall, cpu) medians
        runs = list(runs)
        return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)

    base = median(pair(True) for _ in range(args.repeats))
    bare = median(pair(False) for _ in range(args.repeats))
    cpu = time.process_time()
    stats = run_sinkstats(dlm, ar, prompts, spec)
    cpu = time.process_time() - cpu
    n = len(prompts)
    print(f"load average before: {load_before[0]:.2f}  after: {os.getloadavg()[0]:.2f} (2 cores shared)")
    print(f"settings: {n} prompts, gen_length {spec.gen_length}, DLM steps {spec.steps} (AR: {spec.gen_length}), 1 thread")
    print(
        f"baseline, one prompt through both models with the recorder: {base[0]:.2f} s wall, {base[1]:.2f} s CPU "
        f"(without the recorder: {bare[0]:.2f} s wall, {bare[1]:.2f} s CPU)"
    )
    print(
        f"run_sinkstats: {stats.seconds:.1f} s wall, {cpu:.1f} s CPU in all; per prompt {stats.seconds / n:.2f} s wall, {cpu / n:.2f} s CPU"
    )
    print(
        f"ratio per prompt / baseline: {stats.seconds / n / base[0]:.2f} (wall), {cpu / n / base[1]:.2f} (CPU, less sensitive to the load)"
    )


if __name__ == "__main__":
    main()
