"""Cost of lm-eval log-likelihood requests on a DLM: SinkScope's ``loglikelihood`` against the official one.

On the built-in DLM (tiny-dlm), the requests of the first ``--docs`` documents of the built-in task
``sinkscope_nextline`` (four requests each), ``--mc-num`` Monte Carlo rows in groups of ``--batch-size``:

* **official**: the transcription of the official ``get_loglikelihood`` (``tests/official_lmeval.py``), one
  request at a time, ``mc_num / batch_size`` forward passes of ``batch_size`` rows with the LM head at every
  position, the global RNG seeded per request with the same seed SinkScope's request gets;
* **sinkscope**: :meth:`sap_core.lmeval.model.SinkScopeLM.score_pairs` on the same requests: all masks drawn
  first, rows of equal-length requests stacked into passes of up to ``ROW_TOKENS`` tokens, the head at the
  masked positions only.

Interleaved in one process (``--rounds`` ABBA rounds), checks that both give the same estimates (abs 1e-4) and
prints the median wall and CPU times and their ratios (target <= 0.8).

    python -m bench.lmeval_cost [--docs 10] [--mc-num 32] [--batch-size 32] [--rounds 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from sap_core.lmeval.model import BenchSpec, encode_pair, make_lm, request_seed
from sap_core.lmeval.tasks import BUILTIN_TASK, TASKS_DIR
from sap_core.models import load_model
from tests.official_lmeval import Official


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--docs", type=int, default=10)
    ap.add_argument("--mc-num", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    h = load_model("tiny-dlm", device="cpu", dtype="float32")
    lines = (TASKS_DIR / BUILTIN_TASK / "nextline.jsonl").read_text(encoding="utf-8").splitlines()[: args.docs]
    docs = [json.loads(x) for x in lines]
    pairs = [encode_pair(h, p, "\n" + d["line"]) for d in docs for p in d["passages"]]
    spec = BenchSpec(mc_num=args.mc_num, batch_size=args.batch_size, seed=args.seed)
    official = Official(h.module, h.mask_id, args.mc_num, args.batch_size)

    def run_official():
        out = []
        for prefix, target in pairs:
            torch.manual_seed(request_seed(args.seed, target))
            out.append(official.get_loglikelihood(torch.tensor(prefix), torch.tensor(target)))
        return out

    def run_ours():
        return [ll for ll, _ in make_lm(h, spec=spec).score_pairs(pairs)]

    times = {"official": [], "sinkscope": []}
    cpu = {"official": [], "sinkscope": []}
    results = {}
    order = []
    for r in range(args.rounds):
        order += ["official", "sinkscope"] if r % 2 == 0 else ["sinkscope", "official"]
    with torch.inference_mode():
        for name in order:
            t0, c0 = time.perf_counter(), time.process_time()
            results[name] = run_official() if name == "official" else run_ours()
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    diff = max(abs(a - b) for a, b in zip(results["official"], results["sinkscope"]))
    assert diff <= 1e-4, f"estimates differ by {diff}"
    med = {k: statistics.median(v) for k, v in times.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    print(
        f"{len(pairs)} requests x mc_num {args.mc_num} (batch {args.batch_size}), tiny-dlm, {args.threads} thread(s), "
        f"{args.rounds} rounds; max |difference| of the estimates {diff:.2e}"
    )
    for k, v in med.items():
        print(f"{k:>10}: {v:.2f} s wall median ({', '.join(f'{t:.2f}' for t in times[k])}), {med_cpu[k]:.2f} s CPU")
    print(
        f"ratio sinkscope / official: {med['sinkscope'] / med['official']:.2f}x wall, "
        f"{med_cpu['sinkscope'] / med_cpu['official']:.2f}x CPU"
    )


if __name__ == "__main__":
    main()
