"""Memory estimates for capture and pruning, so a user can pick settings that fit before running.

All figures are bytes and upper-bound estimates of the dominant terms (not allocator overheads).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from dataclasses import dataclass

import torch

from sap_core.errors import MemoryGuardError, SapError


@dataclass(frozen=True)
class MemoryEstimate:
    weights: int  # the dense model
    capture_record: int  # Trajectory.mass: steps × layers × heads × L float32 (host memory)
    capture_peak: int  # one query chunk of scores for all heads, float32 (device)
    activations: int  # one forward pass: hidden states of one block plus logits
    pruning_copy: int  # a pruned variant's new weights (block linears)
    pruning_calibration: int  # calibration activations of one block + per-layer statistics

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)

    @property
    def generation_total(self) -> int:
        """A generation with capture: weights + record + one forward's activations and capture peak."""
        return self.weights + self.capture_record + self.capture_peak + self.activations

    @property
    def pruning_total(self) -> int:
        """A pruning run: weights + the variant's new weights + one block's calibration."""
        return self.weights + self.pruning_copy + self.pruning_calibration


def available(device) -> tuple[int, str]:
    """Free memory on ``device`` in bytes and what it is: free CUDA memory on a GPU
    (``torch.cuda.mem_get_info``), else the host's available RAM (``MemAvailable`` in /proc/meminfo,
    or free pages where there is no /proc)."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info(device)
        return int(free), f"free CUDA memory on {device}"
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "available RAM"
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")), "free RAM"


def estimate(handle, seq_len: int, steps: int, chunk_size: int = 128, calib_tokens: int = 16 * 128) -> MemoryEstimate | None:
    """Estimate memory for a generation of ``seq_len`` positions over ``steps`` steps with capture,
    and for pruning with ``calib_tokens`` calibration tokens."""
    cfg = handle.module.config
    layers, heads = handle.n_layers, handle.n_heads
    elem = {"torch.float32": 4}.get(str(handle.dtype), 2)
    params = handle.n_params
    d = handle.d_model
    vocab = getattr(cfg, "padded_vocab_size", None) or getattr(cfg, "vocab_size")
    linear_params = sum(
        m.weight.numel()
        for b in handle.module.blocks
        for m in b.modules()
        if hasattr(m, "weight") and m.weight is not None and m.weight.dim() == 2
    )
    widest = max(
        m.weight.shape[1]
        for b in handle.module.blocks
        for m in b.modules()
        if hasattr(m, "weight") and m.weight is not None and m.weight.dim() == 2
    )
    return MemoryEstimate(
        weights=params * elem,
        capture_record=steps * layers * heads * seq_len * 4,
        capture_peak=heads * min(chunk_size, seq_len) * seq_len * 4 * 2,
        activations=seq_len * (4 * d + vocab) * 4,
        pruning_copy=linear_params * elem,
        pruning_calibration=calib_tokens * d * elem * 2 + widest * widest * 4,
    )


def human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


# --- the guard: refuse a capture that cannot fit, before it starts ---------------------------------------


def free_memory(device) -> tuple[int, int | None]:
    """``(free host RAM, free memory of device or None for a CPU)`` in bytes, now.

    Host RAM is ``MemAvailable`` from /proc/meminfo (what can be allocated without swapping), else
    ``os.sysconf`` pages; a CUDA device's is ``torch.cuda.mem_get_info``."""
    ram = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    ram = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    if ram is None:
        ram = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    vram = None
    if getattr(device, "type", str(device)) == "cuda":
        vram = int(torch.cuda.mem_get_info(device)[0])
    return ram, vram


def check_allocation(
    what: str,
    host: int,
    device=None,
    on_device: int = 0,
    fix: str = "",
    allow: bool = False,
    free: tuple[int, int | None] | None = None,
) -> None:
    """The one memory guard: refuse (:class:`~sap_core.errors.MemoryGuardError`) work that would allocate
    ``host`` bytes of host RAM (and ``on_device`` bytes on a CUDA ``device``) when that exceeds
    :data:`GUARD_SHARE` of what is free now, before anything is allocated. ``what`` names the work and
    its parts, ``fix`` says what to change; ``allow=True`` is the explicit override; ``free`` replaces the
    measured ``(ram, vram)`` (tests)."""
    ram, vram = free_memory(device if device is not None else "cpu") if free is None else free
    problems = []
    if host > GUARD_SHARE * ram:
        problems.append(f"about {human(host)} of host RAM, {human(ram)} is free")
    if vram is not None and on_device > GUARD_SHARE * vram:
        problems.append(f"about {human(on_device)} of GPU memory, {human(vram)} is free")
    if problems and not allow:
        raise MemoryGuardError(f"{what} refused: it needs {'; '.join(problems)}. {fix}".strip())


def check_capture(
    handle, seq_len: int, steps: int, allow: bool = False, free: tuple[int, int | None] | None = None, capture: bool = True
) -> MemoryEstimate | None:
    """Refuse (:class:`~sap_core.errors.MemoryGuardError`) a generation whose allocations do not fit,
    before it starts: the per-step token and confidence arrays (``steps x seq_len``, int64 + float32) and,
    with ``capture``, the attention record in host RAM, and the per-layer capture scores on the device;
    with the estimate and what to change. ``allow=True`` is the explicit override. ``free`` replaces the
    measured ``(ram, vram)`` (tests). Returns the capture's :class:`MemoryEstimate` (None without capture)."""
    host = steps * seq_len * (8 + 4)  # Trajectory.tokens (int64) and .confidence (float32)
    parts = f"{steps} steps x {seq_len} positions of tokens and confidences"
    est, on_device = None, 0
    if capture:
        est = estimate(handle, seq_len, steps)
        host += CAPTURE_COPIES * est.capture_record + (est.activations if handle.device.type == "cpu" else 0)
        on_device = est.capture_peak + est.activations
        parts += f", and the attention record of {handle.n_layers} layers x {handle.n_heads} heads"
    check_allocation(
        f"Generation ({parts})",
        int(host),
        handle.device,
        int(on_device),
        "Use fewer steps or a shorter generation"
        + (", analyse fewer layers" if capture else "")
        + ", or override (allow_large_capture=True, --allow-large-capture on the command line).",
        allow,
        free,
    )
    return est


CAPTURE_COPIES = 1.2  # the preallocated record plus one step in flight and the recorder's per-layer tensors
GUARD_SHARE = 0.8  # leave a fifth of the free memory to everything else


# --- the allocator: a long-running server must give freed memory back ----------------------------------

_TUNED = False


def tune_allocator() -> bool:
    """Configure glibc malloc for a long-running process that runs each request in a new thread
    (Streamlit reruns): at most two arenas, so every thread does not get a heap of its own that
    freed capture buffers fragment, and :func:`release_freed` trims the heap after a capture.
    Idempotent; a no-op off glibc or when ``SINKSCOPE_MALLOC_DEFAULTS=1``. Returns whether the settings
    were applied. See ``bench/memory_growth.py``.

    A fixed mmap threshold (256 KiB) was tried too: it held the resident set flat but made every large
    tensor a fresh mapping, and pruning and generation about twice as slow
    (``bench/prune_cost.py``: sink-aware Wanda statistics 4.8 s against 2.6 s), so it is not set."""
    global _TUNED
    if _TUNED or os.environ.get("SINKSCOPE_MALLOC_DEFAULTS") == "1":
        return _TUNED
    libc = _libc()
    if libc is None:
        return False
    M_ARENA_MAX = -8
    _TUNED = libc.mallopt(M_ARENA_MAX, 2) == 1
    return _TUNED


def release_freed() -> None:
    """Return freed heap memory to the system (glibc ``malloc_trim``); a no-op elsewhere or untuned."""
    if not _TUNED:
        return
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018 - glibc only
    except (OSError, AttributeError):
        return None
    return libc


# --- variants held by a server: what one costs, and one budget for all sessions ---------------------------

# LLaDA-8B-Instruct's shape (its config.json): the reference for "memory per variant".
LLADA_8B = {"d_model": 4096, "n_heads": 32, "n_kv_heads": 32, "n_layers": 32, "mlp_hidden_size": 12288}


def block_linear_params(config: dict) -> int:
    """Weights of every linear inside the transformer blocks (what a variant prunes), from a checkpoint's
    ``config.json`` as a dict: LLaDA keys (``d_model``, ``n_heads``, ``n_kv_heads``, ``n_layers``,
    ``mlp_hidden_size``) or transformers' (``hidden_size``, ``num_attention_heads``, ``num_key_value_heads``,
    ``num_hidden_layers``, ``intermediate_size``). Attention q, k, v, o and a SwiGLU MLP (three matrices)."""
    if "d_model" in config:
        d, heads, layers = config["d_model"], config["n_heads"], config["n_layers"]
        kv = config.get("n_kv_heads") or heads
        hidden = config.get("mlp_hidden_size") or config.get("mlp_ratio", 4) * d
    else:
        d, heads, layers = config["hidden_size"], config["num_attention_heads"], config["num_hidden_layers"]
        kv = config.get("num_key_value_heads") or heads
        hidden = config["intermediate_size"]
    head = d // heads
    return int(layers * (2 * d * heads * head + 2 * d * kv * head + 3 * d * hidden))


def variant_bytes(linear_params: int, element_size: int, mask_only: bool) -> int:
    """Memory a variant holds: a bit per pruned weight for a mask-only variant (magnitude, Wanda, the sink-aware
    Wanda family; :class:`~sap_core.pruning.variant.MaskedVariant`), else a copy of every block linear at the
    model's ``element_size`` (SparseGPT-style variants change the weights they keep)."""
    return (int(linear_params) + 7) // 8 if mask_only else int(linear_params) * int(element_size)


def llada_8b_variant_memory() -> dict[str, int]:
    """Bytes per variant at LLaDA-8B shape (:data:`LLADA_8B`, bfloat16): ``mask`` (a mask-only variant,
    one bit per weight) and ``copy`` (a SparseGPT-style variant), with ``linear_params`` pruned."""
    n = block_linear_params(LLADA_8B)
    return {"linear_params": n, "mask": variant_bytes(n, 2, True), "copy": variant_bytes(n, 2, False)}


class BudgetError(SapError):
    """A variant that would pass the server's memory budget for variants."""


@dataclass(frozen=True)
class MemoryBudget:
    """One server-wide limit (bytes) on the memory all sessions' variants hold, and where it is counted
    (``"GPU memory"`` on a GPU, ``"RAM"`` otherwise). :meth:`check` refuses before anything is allocated."""

    limit: int
    where: str = "RAM"

    def check(self, need: int, used: int, fix: str = "") -> None:
        if used + need > self.limit:
            raise BudgetError(
                f"A new variant needs about {human(need)}; variants already hold {human(used)} of this server's "
                f"{human(self.limit)} budget ({self.where}). {fix}".strip()
            )
