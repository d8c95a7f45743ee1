"""Cost of one masked-diffusion perplexity evaluation: the LM head at the masked positions only against
the head at every position (issue 14.3).

On the built-in DLM (tiny-dlm, vocab 4096) with a sweep's evaluation settings (16 windows of 128 tokens,
8 draws, the shipped evaluation text). Interleaves, in the same process, ``repeats`` runs of:

* **before**: ``diffusion_perplexity(..., _all_positions=True)`` with the tokenization cache cleared first:
  the head at all ``T`` positions, one cross-entropy call per (window, draw), the text tokenized on every
  call (what every evaluation did before);
* **now, first call**: the default path with the cache cleared (one evaluation on its own);
* **now, in a sweep**: the default path with the text already tokenized (every evaluation of a sweep
  after the first).

Checks that all give the same estimates (rtol 1e-5) and prints median wall and CPU times and the ratios
against *before*.

    python bench/eval_cost.py [--repeats 5] [--nsamples 16] [--draws 8] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch

from sap_core.evaluate import diffusion_perplexity
from sap_core.models import load_model
from sap_core.text import text_ids


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--draws", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    handle = load_model("tiny-dlm", device="cpu")
    settings = dict(nsamples=args.nsamples, draws=args.draws)
    ways = {
        "before (head everywhere)": (True, True),
        "now, first call": (False, True),
        "now, in a sweep": (False, False),
    }
    diffusion_perplexity(handle, nsamples=1, draws=2)  # warm-up
    print(
        f"tiny-dlm, {args.nsamples} windows x {args.draws} draws, {args.threads} thread(s), {args.repeats} repeats; "
        f"load average at start {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    times = {name: ([], []) for name in ways}
    results = {}
    for _ in range(args.repeats):
        for name, (reference, cold) in ways.items():
            if cold:
                text_ids.cache_clear()
            t0, c0 = time.perf_counter(), time.process_time()
            results[name] = diffusion_perplexity(handle, **settings, _all_positions=reference)
            times[name][0].append(time.perf_counter() - t0)
            times[name][1].append(time.process_time() - c0)
    base = results["before (head everywhere)"].estimates
    for name, result in results.items():
        np.testing.assert_allclose(result.estimates, base, rtol=1e-5)
    worst = max(float(np.max(np.abs(r.estimates - base) / np.abs(base))) for r in results.values())
    print(f"same estimates: max relative difference {worst:.1e} over {base.size} (window, draw) pairs")
    wall0, cpu0 = (statistics.median(t) for t in times["before (head everywhere)"])
    for name, (wall, cpu) in times.items():
        w, c = statistics.median(wall), statistics.median(cpu)
        print(f"{name:>26}: {w:6.2f} s wall, {c:6.2f} s CPU (median); ratio {w / wall0:.2f}x wall, {c / cpu0:.2f}x CPU")
    print(f"load average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
