"""Cost of attention capture: generation with and without the recorder, same model and settings.

Runs both in one process, interleaved, and prints the median time of each and their ratio.
Target (issue 2): <= 1.3x on CPU for a 6-layer model at L = 128 with 64 steps.

    python bench/capture_overhead.py [--model tiny-dlm] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from sap_core.attention import AttentionRecorder
from sap_core.decoding import DecodeSpec
from sap_core.diffusion import generate
from sap_core.models import BUILTIN_MODELS, ModelHandle, load_model
from sap_core.models.llada import LLaDAConfig, LLaDAModelLM


def random_handle() -> ModelHandle:
    """A random model of the built-in DLM's shape, for when sap_core/assets/ is not there."""
    from transformers import PreTrainedTokenizerFast  # noqa: F401  (tokenizer unused: prompts are ids)

    torch.manual_seed(0)
    config = LLaDAConfig(
        d_model=256, n_heads=8, n_layers=6, mlp_hidden_size=768, vocab_size=4096, max_sequence_length=512, mask_token_id=3
    )
    return ModelHandle(LLaDAModelLM(config).eval(), None, 3, "llada", torch.device("cpu"), torch.float32, False, "random")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-dlm")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--length", type=int, default=128, help="total sequence length L (prompt + generation)")
    parser.add_argument("--steps", type=int, default=64)
    args = parser.parse_args()
    use_builtin = args.model not in BUILTIN_MODELS or BUILTIN_MODELS[args.model].exists()
    handle = load_model(args.model, device="cpu") if use_builtin else random_handle()
    gen = args.steps
    prompt = list(range(10, 10 + args.length - gen))
    spec = DecodeSpec(gen_length=gen, steps=args.steps, block_length=gen, temperature=0.8, seed=0)
    print(
        f"model: {handle.name}, {handle.n_layers} layers, {handle.n_params / 1e6:.1f}M params, "
        f"L = {args.length}, steps = {args.steps}, torch threads = {torch.get_num_threads()}"
    )
    generate(handle, prompt, spec)  # warm-up
    plain, captured = [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        generate(handle, prompt, spec)
        plain.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        generate(handle, prompt, spec, recorder=AttentionRecorder())
        captured.append(time.perf_counter() - t0)
    a, b = statistics.median(plain), statistics.median(captured)
    print(f"without recorder: {a:.3f} s   with recorder: {b:.3f} s   ratio: {b / a:.2f}x (target <= 1.3x)")


if __name__ == "__main__":
    main()
