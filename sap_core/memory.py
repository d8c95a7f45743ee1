"""Memory estimates for capture and pruning, so a user can pick settings that fit before running.

All figures are bytes and upper-bound estimates of the dominant terms (not allocator overheads).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MemoryEstimate:
    weights: int            # the dense model
    capture_record: int     # Trajectory.mass: steps × layers × heads × L float32 (host memory)
    capture_peak: int       # one query chunk of scores for all heads, float32 (device)
    activations: int        # one forward pass: hidden states of one block plus logits
    pruning_copy: int       # a pruned variant's new weights (block linears)
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
    import os

    import torch

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



def estimate(handle, seq_len: int, steps: int, chunk_size: int = 128, calib_tokens: int = 16 * 128) -> MemoryEstimate:
    """Estimate memory for a generation of ``seq_len`` positions over ``steps`` steps with capture,
    and for pruning with ``calib_tokens`` calibration tokens."""
    cfg = handle.module.config
    layers, heads = handle.n_layers, handle.n_heads
    elem = {"torch.float32": 4}.get(str(handle.dtype), 2)
    params = handle.n_params
    d = getattr(cfg, "d_model", None) or getattr(cfg, "hidden_size")
    vocab = getattr(cfg, "padded_vocab_size", None) or getattr(cfg, "vocab_size")
    linear_params = sum(m.weight.numel() for b in handle.module.blocks for m in b.modules() if hasattr(m, "weight") and m.weight is not None and m.weight.dim() == 2)
    widest = max(m.weight.shape[1] for b in handle.module.blocks for m in b.modules() if hasattr(m, "weight") and m.weight is not None and m.weight.dim() == 2)
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
