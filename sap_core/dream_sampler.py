"""Dream's own sampler (``DecodeSpec(sampler="dream")``), recorded as a :class:`~sap_core.decoding.Trajectory`.

The algorithm of ``diffusion_generate`` in ``generation_utils.py`` shipped with the Dream-v0 checkpoints
(Dream-org/Dream-v0-{Base,Instruct}-7B), reimplemented here:

* the sequence is ``prompt + [MASK] * gen_length``; every ``[MASK]`` of it is decoded (one written in the
  prompt too, as Dream's code does). One unpadded sequence: attention is full (Dream's attention mask
  and shifted position ids only come in with a left-padded batch);
* times ``t_i = linspace(1, eps, steps + 1)[i]`` (float32, on the model's device); step ``i`` goes from
  ``t = t_i`` to ``s = t_{i+1}``; the logits are the handle's (shifted for Dream: index i predicts i);
* the distribution at a masked position: ``logits / temperature`` (when ``temperature > 0``), then
  nucleus filtering (``top_p < 1``: keep the most probable tokens up to and including the one that
  passes ``top_p``), then ``top_k`` (``> 0``), then softmax ``p``. The token: a draw from ``p``
  (``multinomial`` on ``p`` renormalised, as ``torch.distributions.Categorical``), or ``argmax p`` at
  temperature 0;
* ``alg="origin"``: each masked position is unmasked with probability ``1 − s/t`` (1 at the last step),
  its token drawn as above;
* ``maskgit_plus`` / ``topk_margin`` / ``entropy``: every masked position gets a token and a confidence
  (``p`` of the token; top-1 minus top-2 of ``p``; ``Σ p log(p + 1e-10)``); ``int(n_masked · (1 − s/t))``
  positions are unmasked (all that remain at the last step): the most confident ones, or, with
  ``alg_temp > 0``, a draw without replacement from ``softmax(confidence / alg_temp)``.

The arithmetic is Dream's (the logits' dtype, float32 times and counts, the same ``topk``/``multinomial``
calls), so the tokens are Dream's: ``tests/test_dream_sampler.py`` checks them against a transcription of
Dream's loop. The random draws come from ``torch.Generator(device).manual_seed(spec.seed)`` in Dream's
order (per step: the origin coins, the token draws, the position draw), the same stream as Dream's code
after ``torch.manual_seed(seed)`` on a CPU. ``Trajectory.confidence`` holds, as for the LLaDA sampler, the
softmax probability (temperature 1, unfiltered) of each decoded token.
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F

from sap_core.attention import AttentionRecorder
from sap_core.decoding import DEFAULT_SAMPLER, DecodeSpec, Trajectory, take_pass
from sap_core.models import ModelHandle
from sap_core.progress import Progress, report


def filtered_probs(logits: torch.Tensor, spec: DecodeSpec) -> torch.Tensor:
    """``[N, V]`` distribution each token is drawn from: temperature, then top-p, then top-k, then softmax."""
    if spec.temperature > 0:
        logits = logits / spec.temperature
    floor = torch.finfo(logits.dtype).min
    if spec.top_p < 1:
        ranked, order = torch.sort(logits, descending=True)
        beyond = torch.cumsum(torch.softmax(ranked, -1), -1) > spec.top_p
        beyond = torch.cat([torch.zeros_like(beyond[..., :1]), beyond[..., :-1]], -1)  # keep the token that crosses top_p
        logits = logits.masked_fill(torch.zeros_like(beyond).scatter(-1, order, beyond), floor)
    if spec.top_k > 0:
        kth = torch.topk(logits, min(spec.top_k, logits.shape[-1])).values[..., -1:]
        logits = logits.masked_fill(logits < kth, floor)
    return torch.softmax(logits, -1)


def draw_tokens(probs: torch.Tensor, spec: DecodeSpec, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``(token, p(token))`` per row of ``probs``: a draw at ``temperature > 0``, else the most probable."""
    if spec.temperature > 0 and probs.shape[0] > 0:
        tokens = torch.multinomial(probs / probs.sum(-1, keepdim=True), 1, True, generator=generator)[:, 0]
        return tokens, probs.gather(-1, tokens[:, None])[:, 0]
    top, tokens = probs.max(-1)
    return tokens, top


def confidence_of(alg: str, probs: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """The score positions are unmasked by: ``p`` of the drawn token, the top-2 margin, or negative entropy."""
    if alg == "topk_margin":
        best = torch.topk(probs, 2).values
        return best[:, 0] - best[:, 1]
    if alg == "entropy":
        return (probs * torch.log(probs + 1e-10)).sum(-1)
    return top


def unmask_step(
    x: torch.Tensor, logits: torch.Tensor, i: int, times: torch.Tensor, spec: DecodeSpec, mask_id: int, generator
) -> None:
    """One step of Dream's loop on ``x`` (``[1, L]``, changed in place) from its aligned ``logits`` ``[1, L, V]``."""
    masked = x == mask_id
    masked_logits = logits[masked]
    ratio = 1 - times[i + 1] / times[i]  # 1 - s/t, float32 as Dream's
    last = i == spec.steps - 1
    if spec.alg == "origin":
        coins = torch.rand(masked_logits.shape[0], generator=generator, device=x.device)
        moved = coins < (1 if last else ratio)
        fill = torch.full_like(coins, mask_id, dtype=torch.long)
        fill[moved] = draw_tokens(filtered_probs(masked_logits[moved], spec), spec, generator)[0]
        x[masked] = fill
        return
    probs = filtered_probs(masked_logits, spec)
    tokens, top = draw_tokens(probs, spec, generator)
    count = masked.sum() / masked.shape[0]  # float32, as Dream's
    n = int(count) if last else int(count * ratio)
    if n == 0:
        return
    score = torch.full(x.shape, -torch.inf, dtype=logits.dtype, device=x.device)
    score[masked] = confidence_of(spec.alg, probs, top)
    if spec.alg_temp == 0:
        chosen = torch.topk(score, n).indices
    else:
        chosen = torch.multinomial(F.softmax(score / spec.alg_temp, -1), n, generator=generator)
    proposal = torch.full_like(x, mask_id)
    proposal[masked] = tokens
    x[0, chosen[0]] = proposal[0, chosen[0]]


def generate_dream(
    handle: ModelHandle,
    prompt_ids: list[int],
    spec: DecodeSpec,
    recorder: AttentionRecorder | None,
    progress: Progress | None,
    prompt_text: str,
) -> Trajectory:
    """Decode with Dream's sampler (``spec`` validated by :func:`sap_core.diffusion.generate`, which calls this)."""
    P, G, mask_id = len(prompt_ids), spec.gen_length, handle.mask_id
    L, S = P + G, spec.steps
    x = torch.full((1, L), mask_id, dtype=torch.long, device=handle.device)
    x[0, :P] = torch.tensor(prompt_ids, dtype=torch.long)
    generator = torch.Generator(device=handle.device).manual_seed(spec.seed)
    times = torch.linspace(1, spec.eps, S + 1, device=handle.device)
    tokens = np.zeros((S, L), np.int64)
    decoded_at = np.full(L, -1, np.int64)
    confidence = np.full((S, L), np.nan, np.float32)
    mass, seconds = None, np.zeros(S)
    for i in range(S):
        t0 = time.perf_counter()
        tokens[i] = x[0].cpu().numpy()
        if recorder is not None:
            recorder.start_pass()
        logits = handle.logits(x, recorder)
        if recorder is not None:
            step_mass = take_pass(recorder)
            if mass is None:
                mass = np.empty((S,) + step_mass.shape, np.float32)
            mass[i] = step_mass
        before = x[0] == mask_id
        unmask_step(x, logits, i, times, spec, mask_id, generator)
        filled = torch.nonzero(before & (x[0] != mask_id))[:, 0]
        if len(filled):
            probs = torch.softmax(logits[0, filled].double(), -1)
            pos = filled.cpu().numpy()
            decoded_at[pos] = i
            confidence[i, pos] = probs.gather(-1, x[0, filled][:, None])[:, 0].float().cpu().numpy()
        seconds[i] = time.perf_counter() - t0
        report(progress, i + 1, S, f"denoising step {i + 1}/{S}")
    own = DEFAULT_SAMPLER.get(handle.family) == "dream"
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
        note="" if own else f"Dream's sampler (diffusion_generate's algorithm) on a {handle.family} model.",
    )
