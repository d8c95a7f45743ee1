"""Batching across sessions (issue 28): N generations decoded together (:func:`sap_core.diffusion.generate_batch`,
what the scheduler does with the runs of a class that arrive together) against the same N generations one after
another, and against one alone, in one process.

On tiny-dlm, with capture, each run its own seed; torch on ``--threads`` threads (1: what each of the scheduler's
CPU workers uses on a 2-core machine). Prints the median over ``--repeats`` of the wall time and the ratios.

    python bench/batch_cost.py [--runs 8] [--gen-length 64] [--steps 64] [--threads 1] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from sap_core.attention import AttentionRecorder
from sap_core.decoding import DecodeSpec
from sap_core.diffusion import Request, generate, generate_batch
from sap_core.models import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=8)
    ap.add_argument("--gen-length", type=int, default=64)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    handle = load_model("tiny-dlm", device="cpu")
    specs = [DecodeSpec(args.gen_length, args.steps, args.gen_length, temperature=0.8, seed=i) for i in range(args.runs)]
    generate(handle, "ROMEO.\n", specs[0], recorder=AttentionRecorder())  # warm-up

    def one() -> None:
        generate(handle, "ROMEO.\n", specs[0], recorder=AttentionRecorder())

    def serial() -> None:
        for spec in specs:
            generate(handle, "ROMEO.\n", spec, recorder=AttentionRecorder())

    def batched() -> None:
        out = generate_batch(handle, [Request("ROMEO.\n", spec, AttentionRecorder()) for spec in specs])
        assert all(not isinstance(t, Exception) for t in out), out

    times = {"one": [], "serial": [], "batch": []}
    for _ in range(args.repeats):  # interleaved, so a change of load hits all three alike
        for name, fn in (("one", one), ("serial", serial), ("batch", batched)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"tiny-dlm, {args.runs} runs of {args.gen_length} tokens in {args.steps} steps, capture, {args.threads} thread(s)")
    print(f"one run alone          {med['one']:.2f} s")
    print(f"{args.runs} one after another  {med['serial']:.2f} s")
    print(f"{args.runs} as one batch       {med['batch']:.2f} s")
    print(f"batch / one after another: {med['batch'] / med['serial']:.2f}x;  batch / one alone: {med['batch'] / med['one']:.2f}x")


if __name__ == "__main__":
    main()
