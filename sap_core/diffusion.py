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
from dataclasses import dataclass, replace

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
    take_rows,
    transfer_schedule,
)
from sap_core.dream_sampler import generate_dream
from sap_core.errors import Cancelled, DecodeSpecError, SapError
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
    prompt_ids, spec = prepare(handle, prompt, spec, recorder, allow_large_capture)
    text = prompt if isinstance(prompt, str) else ""
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


@dataclass(frozen=True)
class Request:
    """One generation of a batch (:func:`generate_batch`): its prompt (text or ids), settings, recorder (None:
    no capture; only its presence and ``chunk_size`` matter, the batch records every row) and progress."""

    prompt: str | list[int]
    spec: DecodeSpec = DecodeSpec()
    recorder: AttentionRecorder | None = None
    progress: Progress | None = None


def batch_key(handle: ModelHandle, prompt_ids: list[int], spec: DecodeSpec, recorder: AttentionRecorder | None):
    """What two requests must share to be decoded in one batch, or None for one that is always decoded alone.

    Batched: the LLaDA sampler on a masked-diffusion model, with the same total length ``L = prompt + gen_length``
    (no padding: every position attends to every other, so a pad would change every number), the same ``steps``
    (the rows advance together) and the same capture (with a recorder attention runs the recording kernel, without
    it fused SDPA, whose last bits differ) and chunk size. Per row: prompt, block length, remasking, temperature,
    CFG and seed. Never batched: causal models, the Dream and MMaDA samplers, a recorder that keeps a full map.
    ``spec`` has its sampler resolved (:func:`prepare`)."""
    if handle.causal or spec.sampler != "llada" or spec.text_only:
        return None
    if recorder is not None and recorder.full_map is not None:
        return None
    return (len(prompt_ids) + spec.gen_length, spec.steps, None if recorder is None else recorder.chunk_size)


@torch.inference_mode()
def generate_batch(handle: ModelHandle, requests: list[Request], *, allow_large_capture: bool = False) -> list:
    """Decode ``requests`` together: the ones :func:`batch_key` puts together in one forward pass per step (their
    conditional rows, then an unconditional row for each with CFG), the others alone, in order. Returns one
    :class:`Trajectory` per request, or the :class:`~sap_core.errors.SapError` that request raised (its checks,
    made before any work, or :class:`~sap_core.errors.Cancelled` from its progress, which takes it out of the
    batch at that step); the others run on. Each gets the tokens and recorded mass :func:`generate` gives it alone
    (tokens identical, mass equal up to float32 rounding: tests/test_scheduler.py)."""
    out: list = [None] * len(requests)
    groups: dict = {}
    for i, r in enumerate(requests):
        try:
            prompt_ids, spec = prepare(handle, r.prompt, r.spec, r.recorder, allow_large_capture)
        except SapError as exc:
            out[i] = exc
            continue
        key = batch_key(handle, prompt_ids, spec, r.recorder)
        groups.setdefault(("alone", i) if key is None else key, []).append((i, prompt_ids, spec))
    try:
        for key, members in groups.items():
            if key[0] == "alone":
                i, r = members[0][0], requests[members[0][0]]
                try:
                    out[i] = generate(handle, r.prompt, r.spec, r.recorder, r.progress, allow_large_capture=allow_large_capture)
                except SapError as exc:
                    out[i] = exc
                continue
            rows = [_Row(ids, spec, requests[i]) for i, ids, spec in members]
            _decode_llada(handle, rows)
            for (i, _, _), row in zip(members, rows):
                out[i] = row.error or row.trajectory()
    finally:
        if any(r.recorder is not None for r in requests):
            release_freed()
    return out


def prepare(
    handle: ModelHandle, prompt, spec: DecodeSpec, recorder: AttentionRecorder | None = None, allow_large_capture: bool = False
) -> tuple[list[int], DecodeSpec]:
    """The prompt's ids and the spec with the sampler that will run (``spec.sampler`` set), after every check
    :func:`generate` makes before work starts (:class:`~sap_core.errors.SapError` for what cannot run)."""
    prompt_ids = prompt_token_ids(handle, prompt)
    spec.validate(handle.causal, len(prompt_ids), handle.max_length, handle.family)
    spec = replace(spec, sampler=spec.sampler_for(handle.family))  # the trajectory records the sampler that ran
    if spec.text_only or spec.sampler == "mmada":
        check_mmada_spec(handle, spec)
    steps = spec.gen_length if handle.causal else spec.steps  # every allocation of the run, before any is made
    check_capture(handle, len(prompt_ids) + spec.gen_length, steps, allow=allow_large_capture, capture=recorder is not None)
    return prompt_ids, spec


class _Row:
    """One request's state in a LLaDA batch: its schedule, generator and record."""

    def __init__(self, prompt_ids: list[int], spec: DecodeSpec, request: Request):
        self.prompt_ids, self.spec, self.progress = prompt_ids, spec, request.progress
        self.chunk = None if request.recorder is None else request.recorder.chunk_size
        self.text = request.prompt if isinstance(request.prompt, str) else ""
        P, S = len(prompt_ids), spec.steps
        self.P, self.L = P, P + spec.gen_length
        self.tokens = np.zeros((S, self.L), np.int64)
        self.decoded_at = np.full(self.L, -1, np.int64)
        self.confidence = np.full((S, self.L), np.nan, np.float32)
        self.mass, self.seconds = None, np.zeros(S)
        self.final, self.mask = None, None  # set by _decode_llada
        self.error: SapError | None = None
        per_block = S // spec.n_blocks
        self.plan = [  # (lo, hi, tokens unmasked) of every step
            (P + b * spec.block_length, P + (b + 1) * spec.block_length, n)
            for b in range(spec.n_blocks)
            for n in transfer_schedule(spec.block_length, per_block)
        ]

    def unmask(self, x: torch.Tensor, block_logits: torch.Tensor, step: int, generator, mask_id: int) -> None:
        """Step ``step`` of this row: sample the current block's tokens from ``block_logits`` (``[hi-lo, V]``, taken to
        float64 as the official sampler does) and unmask the planned number of still-masked positions of ``x`` (this
        row's sequence, changed in place)."""
        lo, hi, n_transfer = self.plan[step]
        masked = (x[lo:hi] == mask_id).nonzero()[:, 0]  # [n] the block's positions still masked
        # sampled and scored at the masked positions only (a decoded one is never chosen); the draws of the whole
        # block are made, so every number is the full computation's (the official sampler's)
        logits = block_logits[masked].double()  # [n, V]
        x0 = torch.zeros(hi - lo, dtype=torch.long, device=x.device)  # [hi-lo] the sample, at masked positions
        x0[masked] = gumbel_argmax(block_logits, self.spec.temperature, generator, rows=masked)
        x0_p = torch.zeros(hi - lo, dtype=torch.float64, device=x.device)  # [hi-lo] its probability
        x0_p[masked] = torch.softmax(logits, -1).gather(-1, x0[masked][:, None])[:, 0]
        score = torch.full((hi - lo,), -float("inf"), dtype=torch.float64, device=x.device)  # decoded: never chosen
        if self.spec.remasking == "random":
            score[masked] = torch.rand(hi - lo, generator=generator, device=x.device, dtype=torch.float64)[masked]
        elif self.spec.remasking == "entropy":
            p = torch.softmax(logits / self.spec.temperature if self.spec.temperature > 0 else logits, -1)
            score[masked] = torch.special.xlogy(p, p).sum(-1)  # sum p log p, with 0 log 0 = 0
        else:
            score[masked] = x0_p[masked]
        chosen = torch.topk(score, n_transfer).indices  # the same full-length vector as the official code's
        x[lo + chosen] = x0[chosen]
        pos = (lo + chosen).cpu().numpy()
        self.decoded_at[pos] = step
        self.confidence[step, pos] = x0_p[chosen].float().cpu().numpy()

    def keep_mass(self, step: int, mass: np.ndarray) -> None:
        """This row's recorded mass of ``step`` (``[layers, heads, L]``), into the record preallocated at the
        first step: no list of per-step arrays, no final stack copy."""
        if self.mass is None:
            self.mass = np.empty((self.spec.steps,) + mass.shape, np.float32)
        self.mass[step] = mass

    def trajectory(self) -> Trajectory:
        return Trajectory(
            tokens=self.tokens,
            final_tokens=self.final,
            prompt_length=self.P,
            decoded_at=self.decoded_at,
            confidence=self.confidence,
            mass=self.mass,
            valid_length=np.full(self.spec.steps, self.L, np.int64),
            step_seconds=self.seconds,
            causal=False,
            mask_id=self.mask,
            spec=self.spec,
            prompt=self.text,
        )


def _generate_diffusion(handle, prompt_ids, spec, recorder, progress, prompt_text) -> Trajectory:
    row = _Row(prompt_ids, spec, Request(prompt_text, spec, recorder, progress))
    _decode_llada(handle, [row])
    if row.error is not None:
        raise row.error
    return row.trajectory()


def _decode_llada(handle, rows: list[_Row]) -> None:
    """The LLaDA sampler on rows of one :func:`batch_key`, filling each row's record; every choice is the row's own."""
    mask_id, L, S = handle.mask_id, rows[0].L, rows[0].spec.steps
    x = torch.full((len(rows), L), mask_id, dtype=torch.long, device=handle.device)
    generators = []
    for b, row in enumerate(rows):
        x[b, : row.P] = torch.tensor(row.prompt_ids, dtype=torch.long)
        generators.append(torch.Generator(device=handle.device).manual_seed(row.spec.seed))
    recorder = None if rows[0].chunk is None else AttentionRecorder(chunk_size=rows[0].chunk)
    active = list(range(len(rows)))
    for step in range(S):
        if not active:
            break
        t0 = time.perf_counter()
        xs = x[active] if len(active) < len(rows) else x
        for k, b in enumerate(active):
            rows[b].tokens[step] = xs[k].cpu().numpy()
        both, guided, step_mass = _forward(handle, xs, [rows[b] for b in active], recorder)
        for k, b in enumerate(active):
            row, (lo, hi, _) = rows[b], rows[b].plan[step]
            if step_mass is not None:
                row.keep_mass(step, step_mass[k])
            if row.spec.cfg_scale > 0:
                cond, un = both[k, lo:hi], both[len(active) + guided.index(k), lo:hi]
                row.unmask(x[b], un + (row.spec.cfg_scale + 1) * (cond - un), step, generators[b], mask_id)
            else:
                row.unmask(x[b], both[k, lo:hi], step, generators[b], mask_id)
        seconds = time.perf_counter() - t0
        for b in list(active):
            rows[b].seconds[step] = seconds
            try:
                report(rows[b].progress, step + 1, S, f"denoising step {step + 1}/{S}")
            except Cancelled as exc:  # this row leaves the batch; the others run on
                rows[b].error = exc
                active.remove(b)
    for b, row in enumerate(rows):
        row.final = x[b].cpu().numpy()
        row.mask = int(mask_id)


def _forward(handle, xs: torch.Tensor, rows: list[_Row], recorder: AttentionRecorder | None):
    """One pass for the active rows ``xs`` (``[B, L]``), with an unconditional row (prompt masked) after them for
    each row with CFG. Returns the logits ``[B + guided, L, V]``, the indices of the guided rows among ``rows``,
    and the recorded mass of every pass row (``[B + guided, layers, heads, L]``) or None without a recorder."""
    guided = [k for k, row in enumerate(rows) if row.spec.cfg_scale > 0]
    if recorder is not None:
        recorder.start_pass()
    if guided:
        uncond = xs[guided].clone()
        for j, k in enumerate(guided):
            uncond[j, : rows[k].P] = handle.mask_id
        both = handle.logits(torch.cat([xs, uncond]), recorder)
    else:
        both = handle.logits(xs, recorder)
    return both, guided, take_rows(recorder) if recorder is not None else None


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
