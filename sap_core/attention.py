"""Attention with capture of the attention mass each key position receives.

Quantities (B batch, H query heads, Hkv key/value heads, T queries, S keys):

* ``mass``: ``Float[Tensor, "B H S"]`` in float32, ``mass[b, h, j] = sum_i softmax(q_i k^T / sqrt(d))[j]``:
  the attention mass key ``j`` *receives*, summed over queries. For every (b, h) it sums to T.
* ``full map``: ``Float[Tensor, "B T S"]`` for one (layer, head), kept only when the recorder asks.

Scores are computed one query chunk at a time, so the peak extra memory is ``O(B·H·chunk·S)``: no
full ``T×S`` map is ever held except the one map a recorder asks for. Without a recorder the models
call fused SDPA and none of this code runs.

**Key ablation** (``AttentionRecorder(ablate_keys=...)``): within a layer's own pass, once the mass of the
layer is known, ``ablate_keys(layer, mass)`` (``mass``: ``[B, H, S]``) may return ``bool [B, S]`` keys to
remove; the layer's attention is then computed again with those keys' scores at ``-inf``, i.e. the
softmax renormalised over the other keys (a query that would see no key at all keeps its attention),
and the mass recorded is that of the ablated attention. ``None`` or no True entry leaves the pass exactly
as without a mask (bit for bit). The flags of the pass are kept in :attr:`AttentionRecorder.removed`.
Cost: the scores of an ablated layer are computed twice (the MLPs once).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

KeyMask = Callable[[int, torch.Tensor], "torch.Tensor | None"]  # (layer, mass [B, H, S]) -> keys to remove, bool [B, S]


class AttentionRecorder:
    """Collects attention mass per forward pass: one ``[B, layers, heads, S]`` float32 tensor each.

    The sampler calls :meth:`start_pass` before a forward and :meth:`end_pass` after it. The model's
    attention layers call :meth:`add`. ``full_map=(layer, head)`` additionally keeps that head's full
    query×key map of the last pass in :attr:`last_map` (``[B, T, S]``, float32). ``key_mask`` (``bool [B, S]``,
    None: every key): the keys the recorded passes may attend to; the others get no attention (their scores
    set to the float32 minimum, as an additive padding mask does), so they receive no mass. ``ablate_keys``:
    the sink ablation of the module docstring (keys removed per layer from the layer's own mass).
    """

    def __init__(
        self,
        chunk_size: int = 128,
        full_map: tuple[int, int] | None = None,
        key_mask: torch.Tensor | None = None,
        ablate_keys: KeyMask | None = None,
    ):
        assert chunk_size >= 1, chunk_size
        assert key_mask is None or (key_mask.dtype == torch.bool and key_mask.dim() == 2), "key_mask: bool [B, S]"
        self.chunk_size = chunk_size
        self.full_map = full_map
        self.key_mask = key_mask
        self.ablate_keys = ablate_keys
        self.passes: list[torch.Tensor] = []
        self.last_map: torch.Tensor | None = None
        self.removed: dict[int, torch.Tensor] = {}  # layer -> bool [B, S]: the keys removed in the last pass
        self._layers: dict[int, torch.Tensor] = {}

    def start_pass(self) -> None:
        self._layers = {}
        self.removed = {}

    def map_head(self, layer: int) -> int | None:
        """The head whose full map is wanted at ``layer``, or None."""
        if self.full_map is not None and self.full_map[0] == layer:
            return self.full_map[1]
        return None

    def add(self, layer: int, mass: torch.Tensor, full_map: torch.Tensor | None = None) -> None:
        self._layers[layer] = mass.detach().to("cpu", torch.float32)
        if full_map is not None:
            self.last_map = full_map.detach().to("cpu", torch.float32)

    def end_pass(self) -> torch.Tensor:
        """Stack the layers of the pass just run into ``[B, layers, heads, S]`` and keep it."""
        assert self._layers, "no attention was recorded in this pass (the model's attention layers call add)"
        out = torch.stack([self._layers[i] for i in sorted(self._layers)], dim=1)
        self.passes.append(out)
        self._layers = {}
        return out


def attention_with_mass(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    recorder: AttentionRecorder,
    layer: int,
    scale: float | None = None,
) -> torch.Tensor:
    """Softmax attention that records key mass.

    ``q``: ``[B, H, T, d]``; ``k``, ``v``: ``[B, Hkv, S, d]`` with ``H % Hkv == 0`` (GQA). Returns the
    attention output ``[B, H, T, d]`` in ``q``'s dtype and calls ``recorder.add(layer, mass)``.
    Causal masking assumes queries are the last ``T`` of the ``S`` key positions.
    """
    B, H, T, d = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    group = H // Hkv
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    # Group query heads with the key/value head they share, without copying k or v.
    qg = q.reshape(B, Hkv, group, T, d)
    kt = k.float().transpose(-1, -2).unsqueeze(2)  # [B, Hkv, 1, d, S]
    vg = v.unsqueeze(2)  # [B, Hkv, 1, S, d]
    out = torch.empty_like(qg)
    mass = torch.zeros(B, Hkv, group, S, dtype=torch.float32, device=q.device)
    want = recorder.map_head(layer)
    full = torch.empty(B, T, S, dtype=torch.float32, device=q.device) if want is not None else None
    keys = torch.arange(S, device=q.device)
    # keys outside the recorder's key mask: [B, 1, 1, 1, S] against the scores' [B, Hkv, g, c, S]
    hidden = None if recorder.key_mask is None else ~recorder.key_mask.to(q.device)[:, None, None, None, :]
    for start in range(0, T, recorder.chunk_size):
        stop = min(start + recorder.chunk_size, T)
        probs = _probs(qg, kt, start, stop, scale, causal, keys, S - T, hidden, None)
        mass += probs.sum(dim=-2)
        out[:, :, :, start:stop] = torch.matmul(probs.to(v.dtype), vg)
        if full is not None:
            full[:, start:stop] = probs.reshape(B, H, stop - start, S)[:, want]
    removed = None if recorder.ablate_keys is None else recorder.ablate_keys(layer, mass.reshape(B, H, S))
    if removed is not None and bool(removed.any()):
        assert removed.shape == (B, S) and removed.dtype == torch.bool, (removed.shape, removed.dtype)
        recorder.removed[layer] = removed.detach().cpu()
        gone = removed.to(q.device)[:, None, None, None, :]  # [B, 1, 1, 1, S]
        mass.zero_()
        for start in range(0, T, recorder.chunk_size):
            stop = min(start + recorder.chunk_size, T)
            probs = _probs(qg, kt, start, stop, scale, causal, keys, S - T, hidden, gone)
            mass += probs.sum(dim=-2)
            out[:, :, :, start:stop] = torch.matmul(probs.to(v.dtype), vg)
            if full is not None:
                full[:, start:stop] = probs.reshape(B, H, stop - start, S)[:, want]
    recorder.add(layer, mass.reshape(B, H, S), full)
    return out.reshape(B, H, T, d)


def _probs(qg, kt, start, stop, scale, causal, keys, offset, hidden, gone) -> torch.Tensor:
    """Softmax probabilities ``[B, Hkv, g, c, S]`` of the queries ``start:stop``; ``hidden`` (bool, broadcast to
    the scores): keys outside the recorder's key mask, scored at the float32 minimum as an additive padding mask;
    ``gone`` (bool, broadcast to the scores) removes keys, renormalising over the rest; a query left with no key
    keeps its full softmax."""
    scores = torch.matmul(qg[:, :, :, start:stop].float(), kt) * scale  # [B, Hkv, g, c, S]
    if causal:
        query_pos = torch.arange(start, stop, device=qg.device) + offset
        scores = scores.masked_fill(keys[None, :] > query_pos[:, None], float("-inf"))
    if hidden is not None:
        scores = scores.masked_fill(hidden, torch.finfo(torch.float32).min)
    probs = torch.softmax(scores, dim=-1)
    if gone is None:
        return probs
    kept = torch.softmax(scores.masked_fill(gone, float("-inf")), dim=-1)
    return torch.where(torch.isnan(kept), probs, kept)
