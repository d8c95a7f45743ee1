"""Cost of the sink lab against plain generation, in one process (issue 30).

On tiny-dlm (and its AR twin), one CPU thread, the median over ``--repeats`` runs of CPU time (wall time on a
shared machine follows the load; CPU time much less):

* plain: ``generate`` without a recorder (fused SDPA), and with the recorder (what the explorer runs);
* ablation: ``generate`` through :func:`sap_core.ablation.ablated` (every layer's sinks found within the layer's
  own pass and removed as keys; the attention of an ablated layer runs twice), ratio to both plain runs;
* replay: :func:`sap_core.sink_shift.replay` of a wanda-50% variant on the dense trajectory (one variant forward
  pass per step), ratio to one recorded generation.

    python bench/sink_lab_cost.py [--gen-length 64] [--steps 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from sap_core.ablation import SinkAblation, ablated
from sap_core.attention import AttentionRecorder
from sap_core.decoding import DecodeSpec
from sap_core.diffusion import generate
from sap_core.models import load_model
from sap_core.pruning import PruneSpec, prune
from sap_core.sink_shift import replay

PROMPT = "ROMEO.\nBut soft, what light"


def cpu(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.process_time()
        fn()
        times.append(time.process_time() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gen-length", type=int, default=64)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    spec = DecodeSpec(gen_length=args.gen_length, steps=args.steps, block_length=min(16, args.gen_length))
    for name in ("tiny-dlm", "tiny-ar"):
        h = load_model(name)
        plain = cpu(lambda: generate(h, PROMPT, spec), args.repeats)
        recorded = cpu(lambda: generate(h, PROMPT, spec, recorder=AttentionRecorder()), args.repeats)
        abl = ablated(h, SinkAblation())
        ablation = cpu(lambda: generate(abl, PROMPT, spec, recorder=AttentionRecorder()), args.repeats)
        line = (
            f"{name}: plain {plain:.3f} s, recorded {recorded:.3f} s, ablated (all layers) {ablation:.3f} s CPU; "
            f"ablation / plain = {ablation / plain:.2f}x, ablation / recorded = {ablation / recorded:.2f}x"
        )
        if not h.causal:
            variant = prune(h, PruneSpec(method="wanda", sparsity=0.5))
            dense = generate(h, PROMPT, spec, recorder=AttentionRecorder())

            def replayed():
                with variant.applied(h):
                    replay(h, dense)

            rep = cpu(replayed, args.repeats)
            line += f"; replay of a variant (applying it included) {rep:.3f} s = {rep / recorded:.2f}x one recorded generation"
        print(line)
    print(f"load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
