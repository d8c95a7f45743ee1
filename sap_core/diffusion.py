"""Masked-diffusion sampler with LLaDA semantics, and the :class:`Trajectory` it records.

A DLM starts from ``prompt + [MASK] * gen_length``. The generated part is split into blocks of
``block_length`` filled left to right (semi-autoregressive); each block gets ``steps / n_blocks``
steps, and its masked positions are split across them as evenly as possible, the first
``n mod steps`` steps taking one more (LLaDA's ``get_num_transfer_tokens``). At each step the model
predicts every position; the predicted token is the Gumbel-max sample ``argmax(logits + T·g)`` in
float64 (greedy at ``T = 0``); among the still-masked positions of the current block the ones with
the highest confidence (``low_confidence`` remasking: softmax probability of the predicted token),
random scores (``random``) or lowest entropy (``entropy``, Dream's ``alg="entropy"``: confidence is
``sum p log p``, the negative entropy of the sampling distribution ``p = softmax(logits / T)``, or
``softmax(logits)`` at ``T = 0``) are unmasked. Decoded tokens are never remasked; the prompt never changes.
With classifier-free guidance, an unconditional pass with the prompt masked gives
``logits = u + (cfg + 1)·(c − u)``; only the conditional pass is recorded.

A causal model decodes token by token through the same API, one step per token, so AR and DLM
trajectories are comparable (``steps`` and ``block_length`` are then not used).

``DecodeSpec.sampler`` picks the algorithm for a masked-diffusion model: ``"llada"`` is the sampler
above; ``"dream"`` is Dream's own ``diffusion_generate`` (:mod:`sap_core.dream_sampler`: the timestep
schedule ``linspace(1, eps, steps + 1)``, the algorithms ``alg``, ``alg_temp``, ``top_p``, ``top_k``;
``block_length``, ``remasking`` and ``cfg_scale`` are not used). Left at None, each family gets its
authors' sampler (:data:`DEFAULT_SAMPLER`: Dream models ``"dream"``, every other ``"llada"``), and the
trajectory records the one that ran. The LLaDA sampler on a Dream model stays available and says in
``Trajectory.note`` that it is not Dream's.
"""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import torch

from sap_core.attention import AttentionRecorder
from sap_core.decoding import (
    DEFAULT_SAMPLER,
    DecodeSpec,
    Trajectory,
    gumbel_argmax,
    prompt_token_ids,
    take_pass,
    transfer_schedule,
)
from sap_core.dream_sampler import generate_dream
from sap_core.errors import DecodeSpecError
from sap_core.memory import check_capture, release_freed
from sap_core.mmada_sampler import check_mmada_spec, generate_mmada
from sap_core.models import ModelHandle
from sap_core.progress import Progress, report


@torch.inference_mode()
def generate(
    handle: ModelHandle,
    prompt: str | list[int],
    spec: DecodeSpec = DecodeSpec(),
    recorder: AttentionRecorder | None = None,
    progress: Progress | None = None,
    *,
    allow_large_capture: bool = False,
) -> Trajectory:
    """Decode ``spec.gen_length`` tokens after ``prompt``; record the trajectory (and mass, with a recorder).

    :func:`sap_core.memory.check_capture` first compares the run's allocations (the per-step token and
    confidence arrays, and with a recorder the attention record) with the free memory and refuses what
    cannot fit (``allow_large_capture=True`` overrides). The record is
    preallocated and filled step by step (the recorder keeps no copy), and freed memory is handed back
    to the system afterwards, so a long-running app does not grow with every capture."""
    prompt_ids = prompt_token_ids(handle, prompt)
    spec.validate(handle.causal, len(prompt_ids), handle.max_length, handle.family)
    spec = replace(spec, sampler=spec.sampler_for(handle.family))  # the trajectory records the sampler that ran
    if spec.text_only or spec.sampler == "mmada":
        check_mmada_spec(handle, spec)
    text = prompt if isinstance(prompt, str) else ""
    steps = spec.gen_length if handle.causal else spec.steps  # every allocation of the run, before any is made
    check_capture(handle, len(prompt_ids) + spec.gen_length, steps, allow=allow_large_capture, capture=recorder is not None)
    try:
        if handle.causal:
            return _generate_causal(handle, prompt_ids, spec, recorder, progress, text)
        if spec.sampler == "mmada":
            return generate_mmada(handle, prompt_ids, spec, recorder, progress, text)
        if spec.sampler == "dream":
            return generate_dream(handle, prompt_ids, spec, recorder, progress, text)
        traj = _generate_diffusion(handle, prompt_ids, spec, recorder, progress, text)
        if handle.family in DEFAULT_SAMPLER:
            traj.note = (
                f"LLaDA-style sampler (blocks, an even split of tokens per step) on a {handle.family} model: "
                f"not {handle.family}'s own; sampler='{DEFAULT_SAMPLER[handle.family]}' decodes as its authors do."
            )
        return traj
    finally:
        if recorder is not None:
            release_freed()


def _generate_diffusion(handle, prompt_ids, spec, recorder, progress, prompt_text) -> Trajectory:
    P, G, mask_id = len(prompt_ids), spec.gen_length, handle.mask_id
    L, S = P + G, spec.steps
    x = torch.full((1, L), mask_id, dtype=torch.long, device=handle.device)
    x[0, :P] = torch.tensor(prompt_ids, dtype=torch.long)
    generator = torch.Generator(device=handle.device).manual_seed(spec.seed)
    tokens = np.zeros((S, L), np.int64)
    decoded_at = np.full(L, -1, np.int64)
    confidence = np.full((S, L), np.nan, np.float32)
    mass, seconds = None, np.zeros(S)
    steps_per_block = S // spec.n_blocks
    step = 0
    for b in range(spec.n_blocks):
        lo, hi = P + b * spec.block_length, P + (b + 1) * spec.block_length
        schedule = transfer_schedule(spec.block_length, steps_per_block)
        for n_transfer in schedule:
            t0 = time.perf_counter()
            tokens[step] = x[0].cpu().numpy()
            masked = x[0, lo:hi] == mask_id
            if recorder is not None:
                recorder.start_pass()
            if spec.cfg_scale > 0:
                uncond = x.clone()
                uncond[0, :P] = mask_id
                both = handle.logits(torch.cat([x, uncond]), recorder)
                cond, un = both[0:1], both[1:2]
                logits = un + (spec.cfg_scale + 1) * (cond - un)
            else:
                logits = handle.logits(x, recorder)
            if recorder is not None:
                step_mass = take_pass(recorder)
                if mass is None:  # preallocated once: no list of per-step arrays, no final stack copy
                    mass = np.empty((S,) + step_mass.shape, np.float32)
                mass[step] = step_mass
            block_logits = logits[0, lo:hi].double()
            x0 = gumbel_argmax(block_logits, spec.temperature, generator)
            x0_p = torch.softmax(block_logits, -1).gather(-1, x0[:, None])[:, 0]
            if spec.remasking == "random":
                score = torch.rand(hi - lo, generator=generator, device=x.device, dtype=torch.float64)
            elif spec.remasking == "entropy":
                p = torch.softmax(block_logits / spec.temperature if spec.temperature > 0 else block_logits, -1)
                score = torch.special.xlogy(p, p).sum(-1)  # sum p log p, with 0 log 0 = 0
            else:
                score = x0_p.clone()
            score[~masked] = -float("inf")
            chosen = torch.topk(score, n_transfer).indices
            x[0, lo + chosen] = x0[chosen]
            pos = (lo + chosen).cpu().numpy()
            decoded_at[pos] = step
            confidence[step, pos] = x0_p[chosen].float().cpu().numpy()
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


def _generate_causal(handle, prompt_ids, spec, recorder, progress, prompt_text) -> Trajectory:
    P, G = len(prompt_ids), spec.gen_length
    L = P + G
    filler = handle.mask_id if handle.mask_id is not None else -1
    seq = torch.tensor(prompt_ids + [0] * G, dtype=torch.long, device=handle.device)
    generator = torch.Generator(device=handle.device).manual_seed(spec.seed)
    tokens = np.full((G, L), filler, np.int64)
    decoded_at = np.full(L, -1, np.int64)
    confidence = np.full((G, L), np.nan, np.float32)
    mass = None
    seconds = np.zeros(G)
    for s in range(G):
        t0 = time.perf_counter()
        n = P + s
        tokens[s, :n] = seq[:n].cpu().numpy()
        if recorder is not None:
            recorder.start_pass()
        logits = handle.logits(seq[None, :n], recorder)[0, -1].double()
        if recorder is not None:
            step_mass = take_pass(recorder)
            if mass is None:
                mass = np.zeros((G,) + step_mass.shape[:-1] + (L,), np.float32)
            mass[s, ..., :n] = step_mass
        token = gumbel_argmax(logits, spec.temperature, generator)
        seq[n] = token
        decoded_at[n] = s
        confidence[s, n] = float(torch.softmax(logits, -1)[token])
        seconds[s] = time.perf_counter() - t0
        report(progress, s + 1, G, f"token {s + 1}/{G}")
    return Trajectory(
        tokens=tokens,
        final_tokens=seq.cpu().numpy(),
        prompt_length=P,
        decoded_at=decoded_at,
        confidence=confidence,
        mass=mass,
        valid_length=P + np.arange(G, dtype=np.int64),
        step_seconds=seconds,
        causal=True,
        mask_id=int(filler),
        spec=spec,
        prompt=prompt_text,
    )


@torch.inference_mode()
def attention_map(handle: ModelHandle, trajectory: Trajectory, step: int, layer: int, head: int) -> np.ndarray:
    """Full query×key attention ``float32 [V, V]`` of one (step, layer, head), ``V = valid_length[step]``,
    recomputed by replaying that step's input (the conditional pass) through the model."""
    if not 0 <= step < trajectory.n_steps:
        raise DecodeSpecError(f"step must be in [0, {trajectory.n_steps - 1}] (got {step}).")
    if not 0 <= layer < handle.n_layers or not 0 <= head < handle.n_heads:
        raise DecodeSpecError(f"layer must be in [0, {handle.n_layers - 1}] and head in [0, {handle.n_heads - 1}].")
    n = int(trajectory.valid_length[step])
    recorder = AttentionRecorder(full_map=(layer, head))
    recorder.start_pass()
    handle.logits(torch.as_tensor(trajectory.tokens[step, :n])[None], recorder)
    recorder.end_pass()
    return recorder.last_map[0].numpy()
