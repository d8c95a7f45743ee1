"""MMaDA's own text sampler: the default for an MMaDA model (:func:`sap_core.diffusion.generate` routes to it).

It follows MMaDA's text generation (Gen-Verse/MMaDA ``generate.py`` ``generate`` and
``models/modeling_mmada.py`` ``MMadaModelLM.mmu_generate``, identical loops), step for step:

* ``prompt + [MASK] * gen_length``, blocks of ``block_length`` left to right, ``steps / n_blocks`` steps per
  block; each block's masked positions are split over its steps as evenly as possible, earlier steps first.
* At each step the model predicts every position, and the token is picked over **the whole vocabulary**:
  ``argmax(logits + T·Gumbel)`` in float64 over all rows of the head, the 8,192 image-codebook rows
  included, so an image token can come out of text generation, exactly as in MMaDA's own code. The noise is
  drawn for every position and row in MMaDA's order (``[L, V]`` float64, then for ``random`` remasking an
  ``[L]`` float32 draw), so a seed gives the sample MMaDA's code gives after ``torch.manual_seed(seed)``.
* Candidates are the positions still holding ``[MASK]`` up to the end of the current block (a ``[MASK]`` in
  the prompt included, as MMaDA's); the ``k`` with the highest confidence (``low_confidence``: the softmax
  probability of the picked token; ``random``: a uniform draw) are unmasked, ``topk`` over the whole
  sequence as MMaDA's. MMaDA has no ``entropy`` remasking; it is refused.
* Classifier-free guidance: ``u + (cfg + 1)·(c − u)``, the prompt masked in the unconditional pass.

``DecodeSpec(text_only=True)`` (``generate --text-only``) restricts the pick to the text rows
(``llm_vocab_size``, the first 126,464): the distribution is then ``softmax`` over the text rows only, and no
image-codebook id is ever emitted. The trajectory (tokens, confidence, recorded mass) has the shapes and
meanings of :class:`sap_core.decoding.Trajectory`, so capture, replay and the explorer work unchanged.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from sap_core.decoding import MMADA_REMASKING, DecodeSpec, Trajectory, gumbel_argmax, take_pass, transfer_schedule
from sap_core.errors import DecodeSpecError
from sap_core.progress import report


def check_mmada_spec(handle, spec: DecodeSpec) -> None:
    """Refuse what MMaDA's sampler does not do, before any work."""
    if spec.text_only and handle.family != "mmada":
        raise DecodeSpecError(
            f"text_only keeps MMaDA from picking image-codebook tokens; this '{handle.family}' model has none. Drop text_only."
        )
    if spec.text_only and handle.module.config.text_vocab_size is None:
        raise DecodeSpecError(
            "text_only needs the number of text rows; this MMaDA config.json gives neither llm_vocab_size nor codebook_size."
        )
    if spec.text_only and spec.sampler != "mmada":
        raise DecodeSpecError(f"text_only is an option of MMaDA's sampler, not of sampler='{spec.sampler}'; drop text_only.")
    if spec.sampler == "mmada" and spec.remasking not in MMADA_REMASKING:
        raise DecodeSpecError(
            f"MMaDA's sampler remasks by {' or '.join(MMADA_REMASKING)}, not '{spec.remasking}' (that is Dream's order)."
        )


def _step_logits(handle, x: torch.Tensor, prompt_length: int, spec: DecodeSpec, recorder) -> torch.Tensor:
    """``[L, V]`` logits of one step (with guidance when ``cfg_scale > 0``; only the conditional pass is recorded)."""
    if spec.cfg_scale > 0:
        uncond = x.clone()
        uncond[0, :prompt_length] = handle.mask_id
        both = handle.logits(torch.cat([x, uncond]), recorder)
        cond, un = both[0], both[1]
        return un + (spec.cfg_scale + 1) * (cond - un)
    return handle.logits(x, recorder)[0]


def generate_mmada(handle, prompt_ids: list[int], spec: DecodeSpec, recorder, progress, prompt_text: str) -> Trajectory:
    """One generation by MMaDA's rule (module docstring); called by :func:`sap_core.diffusion.generate`,
    which has validated ``spec`` and checked the memory."""
    P, G, mask_id = len(prompt_ids), spec.gen_length, handle.mask_id
    L, S = P + G, spec.steps
    x = torch.full((1, L), mask_id, dtype=torch.long, device=handle.device)
    x[0, :P] = torch.tensor(prompt_ids, dtype=torch.long)
    rows = handle.module.config.text_vocab_size if spec.text_only else None
    generator = torch.Generator(device=handle.device).manual_seed(spec.seed)
    position = torch.arange(L, device=handle.device)
    tokens = np.zeros((S, L), np.int64)
    decoded_at = np.full(L, -1, np.int64)
    confidence = np.full((S, L), np.nan, np.float32)
    mass, seconds = None, np.zeros(S)
    step = 0
    for b in range(spec.n_blocks):
        start, end = P + b * spec.block_length, P + (b + 1) * spec.block_length
        schedule = transfer_schedule(int((x[0, start:end] == mask_id).sum()), S // spec.n_blocks)
        for n_transfer in schedule:
            t0 = time.perf_counter()
            tokens[step] = x[0].cpu().numpy()
            masked = x[0] == mask_id
            if recorder is not None:
                recorder.start_pass()
            logits = _step_logits(handle, x, P, spec, recorder)
            if recorder is not None:
                step_mass = take_pass(recorder)
                if mass is None:
                    mass = np.empty((S,) + step_mass.shape, np.float32)
                mass[step] = step_mass
            if rows is not None:
                logits = logits[:, :rows]
            x0 = gumbel_argmax(logits, spec.temperature, generator)  # every position, every row: MMaDA's draws
            candidate = masked & (position < end)
            if spec.remasking == "random":
                score = torch.rand(L, generator=generator, device=x.device, dtype=torch.float32).double()
            else:
                score = torch.zeros(L, dtype=torch.float64, device=x.device)
                idx = candidate.nonzero()[:, 0]  # the softmax is per position: only candidates' probabilities matter
                score[idx] = torch.softmax(logits[idx].double(), -1).gather(-1, x0[idx, None])[:, 0]
            score[~candidate] = -float("inf")
            chosen = torch.topk(score, n_transfer).indices
            chosen = chosen[masked[chosen]]  # MMaDA keeps a position's token where it was not masked
            x[0, chosen] = x0[chosen]
            pos = chosen.cpu().numpy()
            decoded_at[pos] = step
            p_chosen = torch.softmax(logits[chosen].double(), -1).gather(-1, x0[chosen, None])[:, 0]
            confidence[step, pos] = p_chosen.float().cpu().numpy()
            seconds[step] = time.perf_counter() - t0
            step += 1
            report(progress, step, S, f"denoising step {step}/{S}")
    return Trajectory(
        tokens=tokens,
        final_tokens=x[0].cpu().numpy(),
        prompt_length=P,
        decoded_at=decoded_at,
        confidence=confidence,
        mass=mass,
        valid_length=np.full(S, L, np.int64),
        step_seconds=seconds,
        causal=False,
        mask_id=int(mask_id),
        spec=spec,
        prompt=prompt_text,
    )
