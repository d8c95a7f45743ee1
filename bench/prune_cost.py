"""Cost of pruning: every method, and single-pass sink-aware Wanda against the official two-pass structure.

On the built-in DLM (``sap_core/assets/models/tiny-dlm``) when it exists, else a random LLaDA model of the
same shape (d_model 256, 6 layers, 8 heads, vocab 4096) with a byte-level stand-in tokenizer.
Calibration text: ``sap_core/assets/text/calibration.txt`` when it exists, else the repository's own
markdown files. Prints the median time of each method, then times the sink-aware Wanda statistics
computed in one recorded pass per batch (what ``prune`` runs) and in two passes (a recorded pass
for the attention mass, then a plain pass for the activations: the official code's structure),
interleaved in the same process, checks that both give the same scores and prints the ratio.
Target (issue 5): <= 0.6x.

    python bench/prune_cost.py [--repeats 3] [--nsamples 16] [--seqlen 128] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from sap_core.models import BUILTIN_MODELS, ModelHandle, load_model
from sap_core.models.llada import LLaDAConfig, LLaDAModelLM
from sap_core.pruning import METHODS, CalibrationSpec, PruneSpec, prune
from sap_core.pruning import scores as sc
from sap_core.pruning.calibration import tokenize
from sap_core.pruning.record import record_calibration
from sap_core.pruning.spec import DEFAULT_CALIBRATION
from sap_core.pruning.taps import chunks, embed
from sap_core.sinks import SinkSpec

ROOT = Path(__file__).resolve().parents[1]


class ByteTokenizer:
    """Bytes -> ids 4..259 (0-3 special, 3 = [MASK]); enough to calibrate a random model."""

    def encode(self, text: str, add_special_tokens: bool = True, **kwargs) -> list[int]:
        return [4 + b for b in text.encode("utf-8")]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return bytes(max(0, i - 4) for i in ids).decode("utf-8", "replace")


def random_handle() -> ModelHandle:
    torch.manual_seed(0)
    config = LLaDAConfig(
        d_model=256, n_heads=8, n_layers=6, mlp_hidden_size=768, vocab_size=4096, max_sequence_length=512, mask_token_id=3
    )
    module = LLaDAModelLM(config).eval().requires_grad_(False)
    return ModelHandle(module, ByteTokenizer(), 3, "llada", torch.device("cpu"), torch.float32, False, "random tiny-dlm shape")


def calibration_text() -> str:
    if DEFAULT_CALIBRATION.is_file():
        return DEFAULT_CALIBRATION.read_text(encoding="utf-8")
    return "\n".join(p.read_text(encoding="utf-8") for p in sorted(ROOT.rglob("*.md")) if ".git" not in p.parts)


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.no_grad()
def two_pass_stats(handle, cal, sink, token_ids):
    """The official code's structure: a recorded pass for the attention mass (the calibration record), then
    a second, plain pass whose hooked inputs are scaled and reduced as they come. Returns (passes, stats)."""
    taps = sc.make_taps(handle)
    record = record_calibration(handle, cal, sink, token_ids, taps=taps)  # pass 1: attention mass only
    norms = sc.WandaNorms([sc.weighting("official", 0.0)], len(taps))
    N, S, _ = record.noised.shape
    passes = record.passes
    for n in range(N):
        for c0, c1 in chunks(S, cal.batch_size):  # pass 2: activations, weighted as they come
            h = embed(handle, record.noised[n, c0:c1])
            inputs = []
            for tap in taps:
                h = tap(h)
                inputs.append(tap.take_inputs())
            norms(n, c0, c1, inputs, record)
            passes += 1
    return passes, norms.result(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    builtin = BUILTIN_MODELS["tiny-dlm"].exists()
    handle = load_model("tiny-dlm", device="cpu") if builtin else random_handle()
    text = None if DEFAULT_CALIBRATION.is_file() else calibration_text()
    cal = CalibrationSpec(text=text, nsamples=args.nsamples, seqlen=args.seqlen, batch_size=args.batch_size)
    print(
        f"model: {handle.name}, {handle.n_layers} layers, {handle.n_params / 1e6:.1f}M params; "
        f"calibration: {'sap_core/assets/text/calibration.txt' if text is None else 'repository markdown (calibration.txt missing)'}, "
        f"nsamples={cal.nsamples}, seqlen={cal.seqlen}, timesteps={len(cal.timesteps)}, batch_size={cal.batch_size}; "
        f"torch threads = {torch.get_num_threads()}"
    )

    print(f"\nprune(handle, PruneSpec(method, {args.sparsity})): median of {args.repeats}")
    for method in METHODS:
        spec = PruneSpec(method, args.sparsity, calibration=cal)
        prune(handle, spec)  # warm-up
        seconds = median_time(lambda: prune(handle, spec), args.repeats)
        print(f"  {method:22s} {seconds:7.3f} s")

    # single pass vs two passes, same statistics, interleaved
    token_ids = tokenize(handle, cal)
    sink = SinkSpec()
    w = [sc.weighting("official", 0.0)]
    one_record, (one,) = sc.noised_wanda_stats(handle, cal, sink, token_ids, w)
    two_passes, two = two_pass_stats(handle, cal, sink, token_ids)
    worst = 0.0
    for a, b in zip(one.norms, two.norms):
        for g in a:
            worst = max(worst, float(((a[g] - b[g]).abs() / b[g].abs().clamp_min(1e-12)).max()))
    same_weights = bool((one.token_weights == two.token_weights).all())
    singles, doubles = [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        sc.noised_wanda_stats(handle, cal, sink, token_ids, w)
        singles.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        two_pass_stats(handle, cal, sink, token_ids)
        doubles.append(time.perf_counter() - t0)
    a, b = statistics.median(singles), statistics.median(doubles)
    print(f"\nsink-aware Wanda statistics ({cal.nsamples} samples x {len(cal.timesteps)} timesteps):")
    print(f"  one pass : {a:.3f} s ({one_record.passes} forward passes)")
    print(f"  two passes: {b:.3f} s ({two_passes} forward passes)")
    print(f"  scores agree: max relative difference of the column norms {worst:.2e}; token factors identical: {same_weights}")
    print(f"  ratio one/two: {a / b:.2f}x (target <= 0.6x)")


if __name__ == "__main__":
    main()
