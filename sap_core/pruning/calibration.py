"""Calibration data: token windows from text, and forward noising.

* :func:`calibration_ids`: ``int64 [nsamples, seqlen]`` windows of the tokenized text (no special
  tokens) at random offsets drawn from ``torch.Generator().manual_seed(seed)``, as Wanda/SparseGPT
  draw their wikitext windows.
* :func:`noised_ids`: ``int64 [nsamples, n_timesteps, seqlen]``; at timestep ``t`` each token
  independently becomes ``mask_id`` with probability ``(1 − eps)·t/T + eps`` (the official code's
  ``_forward_diffusion``). The uniform draws come from the same seeded generator, after the offsets,
  so a spec gives the same noised inputs whatever the method or batch size.
"""

from __future__ import annotations

import torch

from sap_core.errors import PruneSpecError
from sap_core.pruning.spec import CalibrationSpec
from sap_core.text import text_ids


def tokenize(handle, spec: CalibrationSpec) -> list[int]:
    """Token ids of the calibration text; :class:`PruneSpecError` when it is shorter than ``seqlen``."""
    text = spec.load_text()
    if handle.tokenizer is None:
        raise PruneSpecError("This model has no tokenizer, so calibration text cannot be tokenized.")
    ids = list(text_ids(handle.tokenizer, text))  # cached: every job of a sweep calibrates on the same text
    if len(ids) < spec.seqlen:
        raise PruneSpecError(
            f"The calibration text is {len(ids)} tokens long but seqlen is {spec.seqlen}: give "
            f"more text or lower seqlen to at most {len(ids)}."
        )
    return ids


def calibration_ids(token_ids: list[int], spec: CalibrationSpec) -> tuple[torch.Tensor, torch.Generator]:
    """``[nsamples, seqlen]`` windows and the generator, positioned for :func:`noised_ids`."""
    generator = torch.Generator().manual_seed(int(spec.seed))
    ids = torch.tensor(token_ids, dtype=torch.long)
    starts = torch.randint(0, len(token_ids) - spec.seqlen + 1, (spec.nsamples,), generator=generator)
    windows = torch.stack([ids[s : s + spec.seqlen] for s in starts.tolist()])
    return windows, generator


def noised_ids(clean: torch.Tensor, spec: CalibrationSpec, mask_id: int, generator: torch.Generator) -> torch.Tensor:
    """``[nsamples, n_timesteps, seqlen]``: ``clean`` corrupted at each sampled timestep."""
    steps = spec.timesteps
    p = torch.tensor([spec.mask_probability(t) for t in steps], dtype=torch.float32)
    u = torch.rand(clean.shape[0], len(steps), clean.shape[1], generator=generator)
    return torch.where(u < p[None, :, None], torch.full_like(clean[:, None], int(mask_id)), clean[:, None])
