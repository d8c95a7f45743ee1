"""GPU check: generation, capture and pruning cost at the paper's model shapes, measured side by side in one run.

Builds a *random* model of one family's released shape in bf16 directly on the GPU (no checkpoint, no
download; ``--family``):

* ``llada`` (default): LLaDA-8B (d_model 4096, 32 heads, 32 layers, MLP 12288, vocabulary 126464);
* ``dream``: Dream-v0-7B (hidden 3584, 28 query / 4 KV heads, 28 layers, MLP 18944, vocabulary 152064, q/k/v
  biases, RoPE θ 10⁶; [MASK] 151666), decoded with Dream's own sampler (its family default);
* ``mmada``: MMaDA-8B (LLaDA-8B's network over 126464 text + 8192 image rows = 134656; [MASK] 126336),
  decoded with MMaDA's own sampler;

then measures:

1. generation at L = 512 (prompt 448 + 64 generated) with 64 steps: tokens/s and seconds per step,
   without and with attention capture (ratio = captured / plain);
2. Wanda and sink-aware Wanda on 8 calibration samples × 512 tokens (ratio = sink_wanda / wanda);
3. SparseGPT on one block (all its linears, Hessians from the same 8 × 512 tokens);
4. peak GPU memory of each phase and of the whole run.

Calibration text is synthetic (a stub tokenizer maps words to ids): the timings depend on shapes,
not on the text. Budget: well under 8 minutes on one H200.

    python bench/gpu_check.py                   # LLaDA-8B; needs CUDA
    python bench/gpu_check.py --family dream    # Dream-7B (mmada: MMaDA-8B)
    python bench/gpu_check.py --tiny            # tiny shape of the family, runs anywhere (CPU included); used by the tests
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass

import torch

from sap_core.attention import AttentionRecorder
from sap_core.decoding import DecodeSpec
from sap_core.diffusion import generate
from sap_core.models import ModelHandle
from sap_core.models.dream import DreamConfig, DreamModel
from sap_core.models.llada import LLaDAConfig, LLaDAModelLM
from sap_core.models.mmada import MMadaConfig, MMadaModelLM
from sap_core.pruning import CalibrationSpec, PruneSpec, prune
from sap_core.pruning.sparsegpt import Hessian, sparsegpt_prune


@dataclass(frozen=True)
class Shape:
    d_model: int
    n_heads: int
    n_layers: int
    mlp_hidden_size: int
    vocab_size: int
    length: int  # total sequence length L of generation
    steps: int  # denoising steps (= generated tokens: one per step)
    samples: int  # calibration samples
    seqlen: int  # calibration tokens per sample
    T: int  # diffusion steps of the noised calibration (timesteps interval..T)
    interval: int
    family: str = "llada"  # ModelHandle.family: llada, Dream or mmada
    n_kv_heads: int | None = None  # None: as many as n_heads
    image_rows: int = 0  # MMaDA: image-codebook rows after the text rows (vocab_size counts both)
    name: str = "random shape"


RUN = dict(length=512, steps=64, samples=8, seqlen=512, T=50, interval=5)
LLADA_8B = Shape(4096, 32, 32, 12288, 126464, **RUN, name="random LLaDA-8B shape")
DREAM_7B = Shape(3584, 28, 28, 18944, 152064, **RUN, family="Dream", n_kv_heads=4, name="random Dream-7B shape")
MMADA_8B = Shape(4096, 32, 32, 12288, 126464 + 8192, **RUN, family="mmada", image_rows=8192, name="random MMaDA-8B shape")
TINY_RUN = dict(length=32, steps=8, samples=2, seqlen=16, T=10, interval=5)
TINY = Shape(32, 4, 2, 64, 256, **TINY_RUN, name="random tiny LLaDA shape")
TINY_DREAM = Shape(32, 4, 2, 64, 256, **TINY_RUN, family="Dream", n_kv_heads=2, name="random tiny Dream shape")
TINY_MMADA = Shape(32, 4, 2, 64, 256 + 64, **TINY_RUN, family="mmada", image_rows=64, name="random tiny MMaDA shape")
SHAPES = {"llada": (LLADA_8B, TINY), "dream": (DREAM_7B, TINY_DREAM), "mmada": (MMADA_8B, TINY_MMADA)}
MASK_IDS = {"llada": 126336, "mmada": 126336, "Dream": 151666}  # each family's [MASK]; clipped into a tiny vocabulary


class StubTokenizer:
    """Maps each whitespace-separated word ``w<n>`` to id ``n mod vocab``: enough for calibration windows."""

    def __init__(self, vocab: int, avoid: int):
        self.vocab, self.avoid = vocab, avoid

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids = [int(w[1:]) % self.vocab for w in text.split()]
        return [i if i != self.avoid else (i + 1) % self.vocab for i in ids]

    def decode(self, ids, **kwargs) -> str:
        return " ".join(f"w{int(i)}" for i in ids)


def build(shape: Shape, device: torch.device, dtype: torch.dtype) -> ModelHandle:
    text_rows = shape.vocab_size - shape.image_rows
    mask_id = min(MASK_IDS[shape.family], text_rows - 1)
    if shape.family == "Dream":
        cls, config = (
            DreamModel,
            DreamConfig(
                vocab_size=shape.vocab_size,
                hidden_size=shape.d_model,
                intermediate_size=shape.mlp_hidden_size,
                num_hidden_layers=shape.n_layers,
                num_attention_heads=shape.n_heads,
                num_key_value_heads=shape.n_kv_heads,
                max_position_embeddings=131072,
                rope_theta=1000000.0,
                mask_token_id=mask_id,
            ),
        )
    else:
        dims = dict(
            d_model=shape.d_model,
            n_heads=shape.n_heads,
            n_kv_heads=shape.n_kv_heads or shape.n_heads,
            n_layers=shape.n_layers,
            mlp_hidden_size=shape.mlp_hidden_size,
            vocab_size=shape.vocab_size,
            embedding_size=shape.vocab_size,
            max_sequence_length=4096,
            rope_theta=500000.0,
            mask_token_id=mask_id,
        )
        if shape.family == "mmada":
            cls, config = MMadaModelLM, MMadaConfig(llm_vocab_size=text_rows, codebook_size=shape.image_rows, **dims)
        else:
            cls, config = LLaDAModelLM, LLaDAConfig(**dims)
    torch.manual_seed(0)
    with torch.device(device):  # parameters are created (and initialised) on the device, in dtype
        module = cls._from_config(config, dtype=dtype)
    module.eval().requires_grad_(False)
    tokenizer = StubTokenizer(text_rows, mask_id)  # text ids only, never [MASK]
    return ModelHandle(module, tokenizer, mask_id, shape.family, device, dtype, False, shape.name)


class Meter:
    """Wall time (synchronised on CUDA) and peak memory of one phase."""

    def __init__(self, device: torch.device):
        self.device = device
        self.overall: float | None = None  # highest phase peak so far

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def start(self) -> float:
        self.sync()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        return time.perf_counter()

    def stop(self, t0: float) -> float:
        self.sync()
        return time.perf_counter() - t0

    def peak_gib(self) -> float | None:
        if self.device.type != "cuda":
            return None
        peak = torch.cuda.max_memory_allocated(self.device) / 2**30
        self.overall = peak if self.overall is None else max(self.overall, peak)
        return peak


def fmt_mem(gib: float | None) -> str:
    return f"{gib:.1f} GiB" if gib is not None else "n/a (CPU)"


def bench_generation(handle: ModelHandle, shape: Shape, meter: Meter, repeats: int) -> dict:
    gen = shape.steps
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, shape.vocab_size - shape.image_rows, (shape.length - gen,), generator=g)
    prompt = prompt.masked_fill(prompt == handle.mask_id, 0).tolist()
    spec = DecodeSpec(gen_length=gen, steps=shape.steps, block_length=gen, temperature=0.0, seed=0)
    generate(handle, prompt, spec)  # warm-up: kernels, allocator, rotary table
    plain, captured, peaks = [], [], {}
    for _ in range(repeats):
        t0 = meter.start()
        generate(handle, prompt, spec)
        plain.append(meter.stop(t0))
        peaks["plain"] = meter.peak_gib()
        t0 = meter.start()
        traj = generate(handle, prompt, spec, recorder=AttentionRecorder())
        captured.append(meter.stop(t0))
        peaks["captured"] = meter.peak_gib()
    a, b = statistics.median(plain), statistics.median(captured)
    assert traj.mass is not None and traj.mass.shape == (shape.steps, shape.n_layers, shape.n_heads, shape.length)
    return dict(plain=a, captured=b, peaks=peaks, tokens=gen)


def bench_pruning(handle: ModelHandle, shape: Shape, meter: Meter) -> dict:
    text = " ".join(f"w{(i * 7919) % 100003}" for i in range(shape.seqlen * shape.samples * 4))
    cal = CalibrationSpec(text=text, nsamples=shape.samples, seqlen=shape.seqlen, T=shape.T, interval=shape.interval)
    out = {}
    for method in ("wanda", "sink_wanda"):
        t0 = meter.start()
        variant = prune(handle, PruneSpec(method, 0.5, calibration=cal))
        out[method] = (meter.stop(t0), meter.peak_gib(), variant.achieved_sparsity, variant.timings)
        del variant
    return out


def bench_sparsegpt_block(handle: ModelHandle, shape: Shape, meter: Meter) -> tuple[float, float | None, int]:
    block = handle.module.blocks[0]
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, shape.vocab_size, (shape.samples, shape.seqlen), generator=g).to(handle.device)
    inputs: dict[str, torch.Tensor] = {}
    linears = {n: m for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
    hooks = [m.register_forward_pre_hook(lambda mod, args, n=n: inputs.__setitem__(n, args[0])) for n, m in linears.items()]
    t0 = meter.start()
    with torch.no_grad():
        block(handle.module.embed(ids))
        for h in hooks:
            h.remove()
        hessians: dict[int, Hessian] = {}
        for name, lin in linears.items():
            x = inputs[name]
            key = id(x)  # q/k/v (and gate/up) read the same tensor: one Hessian each
            if key not in hessians:
                hessians[key] = Hessian(x.shape[-1], x.device)
                hessians[key].add(x)
            sparsegpt_prune(lin.weight, hessians[key].matrix(), 0.5)
    return meter.stop(t0), meter.peak_gib(), len(linears)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--family", choices=sorted(SHAPES), default="llada", help="whose released shape (default llada: LLaDA-8B)"
    )
    parser.add_argument("--tiny", action="store_true", help="tiny shape of the family; runs on CPU (for tests)")
    parser.add_argument("--repeats", type=int, default=2, help="generation runs of each kind (median)")
    args = parser.parse_args(argv)
    full, tiny = SHAPES[args.family]
    shape = tiny if args.tiny else full
    if not args.tiny and not torch.cuda.is_available():
        print(f"gpu_check needs a CUDA GPU for the {shape.name}; run with --tiny to check the script on CPU.")
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    meter = Meter(device)
    t_all = time.perf_counter()
    if device.type == "cuda":
        print(f"device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}")
    else:
        print(f"device: CPU ({torch.get_num_threads()} threads), torch {torch.__version__}")

    t0 = meter.start()
    handle = build(shape, device, dtype)
    print(
        f"model: {handle.source}, {handle.n_params / 1e9:.2f} B params, {dtype}, built in {meter.stop(t0):.1f} s, "
        f"weights {fmt_mem(meter.peak_gib())}"
    )

    g = bench_generation(handle, shape, meter, args.repeats)
    tps_a, tps_b = g["tokens"] / g["plain"], g["tokens"] / g["captured"]
    print(
        f"generation L={shape.length}, {shape.steps} steps: plain {g['plain']:.2f} s ({tps_a:.1f} tok/s, "
        f"{1e3 * g['plain'] / shape.steps:.0f} ms/step, peak {fmt_mem(g['peaks']['plain'])}); "
        f"captured {g['captured']:.2f} s ({tps_b:.1f} tok/s, peak {fmt_mem(g['peaks']['captured'])})"
    )
    print(f"ratio capture/plain: {g['captured'] / g['plain']:.2f}x")

    p = bench_pruning(handle, shape, meter)
    for method, (sec, peak, sparsity, timings) in p.items():
        parts = ", ".join(f"{k} {v:.1f} s" for k, v in timings.items())
        print(
            f"{method} 50% on {shape.samples} x {shape.seqlen} tokens: {sec:.1f} s ({parts}), "
            f"sparsity {sparsity:.3f}, peak {fmt_mem(peak)}"
        )
    print(f"ratio sink_wanda/wanda: {p['sink_wanda'][0] / p['wanda'][0]:.2f}x")
    sec, peak, n = bench_sparsegpt_block(handle, shape, meter)
    print(f"sparsegpt 50% on one block ({n} linears, {shape.samples} x {shape.seqlen} tokens): {sec:.1f} s, peak {fmt_mem(peak)}")
    print(f"ratio sparsegpt one block / wanda whole model: {sec / p['wanda'][0]:.2f}x")
    print(f"total: {time.perf_counter() - t_all:.1f} s; peak memory over the run {fmt_mem(meter.overall)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
