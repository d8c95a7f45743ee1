"""Calibration data: token windows from text, and forward noising.

* :func:`calibration_ids`: ``int64 [nsamples, seqlen]`` windows of the tokenized text (no special
  tokens) at random offsets drawn from ``torch.Generator().manual_seed(seed)``, as Wanda/SparseGPT
  draw their wikitext windows.
* :func:`noised_ids`: ``int64 [nsamples, n_timesteps, seqlen]``, the windows corrupted by the spec's
  forward process (``CalibrationSpec.noising``, the official code's ``_forward_diffusion`` of the family):
  LLaDA's (at timestep ``t`` each token independently becomes ``mask_id`` with probability
  ``(1 − eps)·t/T + eps``) or Dream's (:func:`dream_noised_ids`). The uniform draws come from the same
  seeded generator, after the offsets, so a spec gives the same noised inputs whatever the method or batch size.
* :func:`attended_keys`: ``bool [nsamples, seqlen]``, the keys Dream's noised passes attend to (every
  position but the pad tokens), or None.
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
    """``[nsamples, n_timesteps, seqlen]``: ``clean`` corrupted at each sampled timestep by ``spec.noising``
    (unset: LLaDA's; :func:`~sap_core.pruning.record.record_calibration` sets it from the model's family first)."""
    if spec.noising == "dream":
        return dream_noised_ids(clean, spec, mask_id, generator)
    steps = spec.timesteps
    p = torch.tensor([spec.mask_probability(t) for t in steps], dtype=torch.float32)
    u = torch.rand(clean.shape[0], len(steps), clean.shape[1], generator=generator)
    return torch.where(u < p[None, :, None], torch.full_like(clean[:, None], int(mask_id)), clean[:, None])


def dream_noised_ids(clean: torch.Tensor, spec: CalibrationSpec, mask_id: int, generator: torch.Generator) -> torch.Tensor:
    """``[nsamples, n_timesteps, seqlen]``: Dream's forward process, drawn in the official order (``prune_dream``:
    for each batch of ``t_strata`` windows, for each sampled step, ``u0`` then one uniform per token):
    ``t_i = (u0 + i/b) mod 1`` over the batch's ``b`` windows, each token masked with probability
    ``(1 − eps)·t_i + eps``, the first and last positions never."""
    N, L = clean.shape
    S = len(spec.timesteps)
    out = torch.empty(N, S, L, dtype=clean.dtype)
    mask_token = torch.tensor(int(mask_id), dtype=clean.dtype)
    for g0 in range(0, N, spec.t_strata):
        batch = clean[g0 : g0 + spec.t_strata]
        b = batch.shape[0]
        for s in range(S):
            u0 = torch.rand(1, generator=generator, dtype=torch.float32)
            t = (u0 + torch.arange(b, dtype=torch.float32) / b) % 1
            p = ((1.0 - spec.eps) * t + spec.eps)[:, None].repeat(1, L)
            masked = torch.rand(b, L, generator=generator, dtype=torch.float32) < p
            masked[:, 0] = False
            masked[:, -1] = False
            out[g0 : g0 + b, s] = torch.where(masked, mask_token, batch)
    return out


def pad_token_id(handle) -> int | None:
    """The pad token a model's official code masks out of attention: its config's ``pad_token_id``, else the
    tokenizer's (``<|endoftext|>`` for Dream); None when neither names one."""
    pad = getattr(handle.module.config, "pad_token_id", None)
    if pad is None:
        pad = getattr(handle.tokenizer, "pad_token_id", None)
    return None if pad is None else int(pad)


def attended_keys(clean: torch.Tensor, pad_id: int | None) -> torch.Tensor | None:
    """``bool [nsamples, seqlen]``: the keys a window's positions attend to in Dream's noised passes, every
    position whose clean token is not ``pad_id`` (``prune_dream._make_attention_mask``, taken on the clean
    window); None when no window holds a pad token."""
    if pad_id is None:
        return None
    keys = clean != int(pad_id)
    return None if bool(keys.all()) else keys
