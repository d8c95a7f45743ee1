"""Structured pruning on the built-in DLM (tiny-dlm), CPU: is the pruned model really smaller and faster, and
what does it cost in perplexity, baseline vs sink-aware?

For each pruning ratio r (default 0.3 and 0.5; a fraction r of every block's MLP channels *and* attention
heads removed):

* speed: generation time of the pruned model against the dense one on the same prompts, in the same run,
  interleaved prompt by prompt (dense, pruned, dense, pruned, ...) so that load on the machine hits both
  alike; prints the median seconds per prompt and the median of the pairwise ratios pruned/dense and the forward FLOPs removed (counted by ``torch.utils.flop_counter`` on
  one forward pass of the decoding length), parameters and ``model.safetensors`` bytes of the saved model;
* quality: a sweep (:func:`sap_core.sweep.run_sweep`: same evaluation windows and masking draws for every
  row) of struct_wanda, flap (clean windows), their noised controls and their sink-aware variants, and the
  paired standard error of each sink-aware method against its baseline and its control (:func:`sap_core.sweep.method_differences`).

Benchmark accuracy (the built-in lm-eval task) is not scored yet: ``sap_core.lmeval`` is another branch's
work; the ``accuracy`` column is printed as ``n/a`` until it is merged (marked ``BENCHMARK`` below).

    OMP_NUM_THREADS=1 python bench/structured_speed.py [--ratios 0.3 0.5] [--repeats 5] [--csv OUT.csv] [--speed-only]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
from torch.utils.flop_counter import FlopCounterMode

from sap_core.decoding import DecodeSpec
from sap_core.diffusion import generate
from sap_core.evaluate import EvalSpec
from sap_core.models import load_model
from sap_core.pruning import PruneSpec, prune
from sap_core.sweep import MethodSetting, SweepSpec, method_differences, run_sweep

PROMPTS = ["ROMEO.\n", "To be, or not to be", "KING HENRY.\nOnce more unto the breach", "The quality of mercy"]
# (sink-aware, reference): the baseline on clean windows, and the control on the same noised windows without sink weights
PAIRS = (
    ("sink_struct_wanda", "struct_wanda"),
    ("sink_flap", "flap"),
    ("sink_struct_wanda", "noised_struct_wanda"),
    ("sink_flap", "noised_flap"),
)
METHODS = ("struct_wanda", "noised_struct_wanda", "sink_struct_wanda", "flap", "noised_flap", "sink_flap")


def forward_flops(handle, length: int) -> int:
    ids = torch.full((1, length), 5, dtype=torch.long)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        handle.module(ids)
    return counter.get_total_flops()


def time_generation(handle, pruned, spec: DecodeSpec, repeats: int) -> tuple[float, float, float]:
    """Dense and pruned (a separate copy: no swapping inside the timing) decode each prompt back to back,
    ``repeats`` times; returns the median seconds per prompt of each and the median of the pairwise ratios
    (each ratio from two adjacent runs, so the machine's load drifts out of it)."""
    dense, small, ratios = [], [], []
    for _ in range(repeats):
        for p in PROMPTS:
            pair = []
            for model in (handle, pruned):
                t0 = time.perf_counter()
                generate(model, p, spec)
                pair.append(time.perf_counter() - t0)
            dense.append(pair[0])
            small.append(pair[1])
            ratios.append(pair[1] / pair[0])
    return statistics.median(dense), statistics.median(small), statistics.median(ratios)


def speed_rows(handle, ratios, repeats: int, decode: DecodeSpec) -> pd.DataFrame:
    rows = []
    length = len(handle.encode(PROMPTS[0])) + decode.gen_length
    dense_flops, dense_params = forward_flops(handle, length), handle.n_params
    with tempfile.TemporaryDirectory() as tmp:
        handle.module.save_pretrained(str(Path(tmp) / "dense"))
        dense_bytes = (Path(tmp) / "dense" / "model.safetensors").stat().st_size
        for r in ratios:
            v = prune(handle, PruneSpec("struct_wanda", r, heads=r))
            with v.applied(handle):
                flops, params = forward_flops(handle, length), handle.n_params
            size = (v.save(Path(tmp) / f"r{r}", handle) / "model.safetensors").stat().st_size
            t_dense, t_pruned, ratio = time_generation(handle, v.apply_to_copy(handle), decode, repeats)
            rows.append(
                dict(
                    ratio=r,
                    params=params,
                    params_ratio=params / dense_params,
                    bytes_ratio=size / dense_bytes,
                    flops_removed=1 - flops / dense_flops,
                    dense_s=t_dense,
                    pruned_s=t_pruned,
                    time_ratio=ratio,
                )
            )
    return pd.DataFrame(rows)


def quality_rows(handle, ratios, eval_spec: EvalSpec) -> tuple[pd.DataFrame, pd.DataFrame]:
    frames, diffs = [], []
    for i, r in enumerate(ratios):
        settings = tuple(MethodSetting(m, options=(("heads", r),)) for m in METHODS)
        df = run_sweep(handle, SweepSpec(settings, (r,), eval=eval_spec, include_dense=i == 0))
        frames.append(df)
        diffs.append(method_differences(df, PAIRS))
    return pd.concat(frames, ignore_index=True), pd.concat(diffs, ignore_index=True)


def accuracy_rows(handle, ratios, limit: int, mc_num: int) -> pd.DataFrame | None:
    """BENCHMARK: accuracy on the built-in lm-eval task, paired per document; None without ``sap_core.lmeval``."""
    try:
        from sap_core.lmeval.accuracy import accuracy_table
        from sap_core.lmeval.model import BenchSpec
    except ImportError:
        return None
    rows = []
    for r in ratios:
        variants = {m: prune(handle, PruneSpec(m, r, heads=r)) for m in METHODS}
        res = accuracy_table(handle, variants, spec=BenchSpec(mc_num=mc_num, batch_size=mc_num), limit=limit)
        acc = {model: a for (_, model), a in res.per_doc.items()}
        for method, ref in (("dense", None), *((m, None) for m in METHODS), *PAIRS):
            if method == "dense" and r != ratios[0]:
                continue
            a = acc[method]
            row = dict(
                ratio=0.0 if method == "dense" else r, method=method, n=len(a), acc=a.mean(), acc_se=a.std(ddof=1) / len(a) ** 0.5
            )
            if ref is not None:
                d = a - acc[ref]
                row.update(method=f"{method} − {ref}", acc=d.mean(), acc_se=d.std(ddof=1) / len(d) ** 0.5)
            rows.append(row)
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.3, 0.5])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--gen-length", type=int, default=64)
    parser.add_argument("--csv", default=None, help="write the quality rows here")
    parser.add_argument("--speed-only", action="store_true", help="skip the perplexity sweep and the accuracy")
    parser.add_argument("--limit", type=int, default=100, help="documents of the built-in task (accuracy)")
    parser.add_argument("--mc-num", type=int, default=8, help="Monte Carlo rows per request (accuracy)")
    args = parser.parse_args()
    torch.manual_seed(0)
    handle = load_model("tiny-dlm", device="cpu", dtype="float32")
    decode = DecodeSpec(gen_length=args.gen_length, steps=args.gen_length, block_length=args.gen_length)
    print(f"tiny-dlm, {handle.n_params:,} parameters, {torch.get_num_threads()} threads; decoding {decode}")
    speed = speed_rows(handle, args.ratios, args.repeats, decode)
    print("\nspeed (struct_wanda; every structured method removes the same shapes):")
    print(speed.to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    if args.speed_only:
        return
    df, diffs = quality_rows(handle, args.ratios, EvalSpec())
    print("\nperplexity (EvalSpec(): 16 windows of 128 tokens, 8 draws):")
    print(df[["label", "ppl", "ppl_se", "achieved_sparsity", "prune_seconds"]].to_string(index=False))
    print("\nsink-aware vs baseline (delta_nll < 0: sink-aware better; z with the paired SE):")
    print(diffs[["method", "baseline", "sparsity", "ppl", "ppl_baseline", "delta_nll", "se_paired", "z"]].to_string(index=False))
    if args.csv:
        from sap_core.sweep import save_sweep

        save_sweep(df, args.csv)
    acc = accuracy_rows(handle, args.ratios, args.limit, args.mc_num)
    if acc is None:
        print("\naccuracy: n/a (sap_core.lmeval, the lm-eval branch, is not in this checkout)")
    else:
        print(
            f"\naccuracy on sinkscope_nextline ({args.limit} documents, mc_num {args.mc_num}; differences paired per document):"
        )
        print(acc.to_string(index=False, float_format=lambda x: f"{x:.3f}"))


if __name__ == "__main__":
    main()
