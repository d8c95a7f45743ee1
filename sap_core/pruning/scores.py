"""Layer-input statistics and importance scores.

Definitions (``W``: ``[out, in]`` weight of a linear layer inside a transformer block; ``X``: its
inputs, one row per token; column ``c`` of ``X`` feeds column ``c`` of ``W``):

* magnitude: ``score = |W|``.
* wanda: ``score = |W| · ‖X_c‖₂`` with the norm over every token of the clean calibration windows,
  taken block by block on the outputs of the already-pruned blocks (:func:`sequential_sweep`).
* noised Wanda family (:func:`noised_wanda_stats`, dense model, noised inputs): for each calibration
  sample ``n`` and sampled timestep ``t``, with per-token factors ``w_{n,t}(j)``,
  ``a_c = Σ_{n,t} ‖ (w_{n,t}(j) · X_{n,t}[j, c])_j ‖₂`` (a sum over sequences of per-sequence L2
  norms, as the official ``SinkActivationStats`` accumulates at its default batch size 1) and
  ``score = |W| · a``. ``w = 1 − s_t(j)`` for sink_wanda, ``1 − g_j·s_t(j)`` for
  gated_sink_wanda (``g``: the variance gate, :func:`sap_core.sinks.variance_gate`; factors :func:`sap_core.sinks.step_factors`), ``1`` for
  noised_wanda.

All statistics are float32. Every forward runs through a :class:`~sap_core.pruning.taps.BlockTap`
(:mod:`sap_core.pruning.taps`), so nothing here writes to the shared model.

One pass instead of two (the official code runs the model twice per sample and timestep, once to
collect the attention mass, once more with hooks to collect the ``(1 − s)``-scaled activations):
the sink score needs the mass summed over *all* layers, but the activations of the second pass are
exactly those of the first (same dense model, same input), so :func:`noised_wanda_stats` keeps a
reference to each block's layer inputs during the recorded pass and reduces them once the pass has
ended and the scores are known. The price is memory: the inputs of every block for one forward
batch (``batch_size · seqlen · Σ_blocks Σ_groups in_features`` values in the model dtype; for the
gated variant the whole sample's timesteps, since the gate needs all of them).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from sap_core.pruning.record import SinkRecord, TokenFactors, Weighting, record_calibration, scoring_spec, weighting
from sap_core.pruning.spec import METHOD_ROWS
from sap_core.pruning.taps import BlockTap, Group, Tick, chunks, embed, make_taps
from sap_core.sinks import SinkSpec

# --- noised Wanda family: column norms from the calibration record's passes ---------------------


def _accumulate(acc: dict[Group, torch.Tensor], groups: list[tuple[Group, torch.Tensor]], w: np.ndarray) -> None:
    """``a += Σ_b ‖w_b ⊙ x_b‖₂`` per column, as ``sqrt(w_b² · x_b²)`` (one batched matmul over the
    tokens: ~10x faster on CPU than a strided norm reduction, same value up to rounding)."""
    for names, x in groups:
        wt = torch.from_numpy(np.ascontiguousarray(w)).to(x.device)
        xf = x.float()
        norms = torch.bmm((wt * wt)[:, None, :], xf * xf)[:, 0].sqrt().sum(0)
        prev = acc.get(names)
        acc[names] = norms if prev is None else prev + norms


@dataclass
class NoisedStats:
    """``norms[i][group]``: ``float32 [in_features]`` accumulated column norms of block ``i``;
    ``token_weights``: ``float32 [N, S, L]`` the factors the inputs were scaled by."""

    norms: list[dict[Group, torch.Tensor]]
    token_weights: np.ndarray


class WandaNorms(TokenFactors):
    """The ``on_pass`` callback of :func:`~sap_core.pruning.record.record_calibration` that accumulates the
    noised Wanda family's column norms for several weightings from the same passes (each chunk's inputs scaled
    by the weighting's token factors, :class:`~sap_core.pruning.record.TokenFactors`)."""

    def __init__(self, weightings: list[Weighting], n_blocks: int):
        super().__init__(weightings)
        self.norms: list[list[dict[Group, torch.Tensor]]] = [[{} for _ in range(n_blocks)] for _ in self.weightings]

    def consume(self, k: int, inputs: list, w: np.ndarray) -> None:
        for acc, groups in zip(self.norms[k], inputs):
            _accumulate(acc, groups, w)

    def result(self, k: int) -> NoisedStats:
        return NoisedStats(self.norms[k], self.token_weights[k])


@torch.no_grad()
def noised_wanda_stats(
    handle,
    calibration,
    sink: SinkSpec,
    token_ids: list[int],
    weightings: list[Weighting],
    tick: Tick | None = None,
    taps: list[BlockTap] | None = None,
) -> tuple[SinkRecord, list[NoisedStats]]:
    """The calibration record and the noised Wanda statistics of each of ``weightings`` on the dense model,
    from one set of recorded passes (:func:`~sap_core.pruning.record.record_calibration` with a
    :class:`WandaNorms` callback). Each result equals what a run with that weighting alone gives."""
    taps = make_taps(handle) if taps is None else taps
    norms = WandaNorms(weightings, len(taps))
    record = record_calibration(handle, calibration, sink, token_ids, tick, taps, on_pass=norms)
    return record, [norms.result(k) for k in range(len(weightings))]


# --- block-sequential sweep (wanda, sparsegpt and the sink SparseGPT family) --------------------


class ColumnSquares:
    """Wanda's statistic: ``Σ_tokens x_c²`` per input column (float32); ``norm()`` = ``‖X_c‖₂``."""

    def __init__(self, columns: int, device: torch.device):
        self.sum = torch.zeros(columns, dtype=torch.float32, device=device)

    def add(self, x: torch.Tensor, token_weights: torch.Tensor | None = None) -> None:
        xf = x.float()
        if token_weights is not None:
            xf = xf * token_weights.to(xf.device, torch.float32)[..., None]
        self.sum += xf.pow(2).sum(dim=tuple(range(xf.dim() - 1)))

    def norm(self) -> torch.Tensor:
        return self.sum.sqrt()


@torch.no_grad()
def sequential_sweep(
    handle,
    clean: torch.Tensor,
    make_stat: Callable[[int, torch.device], object],
    prune_group: Callable[[int, Group, list[torch.Tensor], object], list[torch.Tensor]],
    batch_size: int,
    token_weights: np.ndarray | None = None,
    tick: Tick | None = None,
    taps: list[BlockTap] | None = None,
) -> dict[tuple[int, str], torch.Tensor]:
    """Block-by-block pruning on calibration windows ``clean`` ``int64 [N, L]``.

    The hidden states of all windows for the current block are held (``N · L · d_model`` values),
    the block runs on its :class:`BlockTap` (``taps``, taken now if not given); each input group's statistic (``make_stat(in_features,
    device)``, anything with ``add(x, token_weights)``) sees the inputs, scaled per token by
    ``token_weights`` ``[N, L]`` if given; ``prune_group(block, names, dense_weights, stat)`` returns
    the new weights of the group's linears (those that read the same input, so share ``stat``); the tap takes the new weights and the hidden states move on through the pruned
    block. Returns ``{(block, linear name): new weight}``.
    """
    N = clean.shape[0]
    taps = make_taps(handle) if taps is None else taps
    batches = chunks(N, batch_size)
    hidden = [embed(handle, clean[a:b]) for a, b in batches]
    tw = None if token_weights is None else torch.from_numpy(np.ascontiguousarray(token_weights, dtype=np.float32))
    out: dict[tuple[int, str], torch.Tensor] = {}
    n_blocks = len(taps)
    for i, tap in enumerate(taps):
        stats: dict[Group, object] = {}
        for (a, b), h in zip(batches, hidden):
            tap(h)
            for names, x in tap.take_inputs():
                if names not in stats:
                    stats[names] = make_stat(x.shape[-1], x.device)
                stats[names].add(x, None if tw is None else tw[a:b])
        for names, stat in stats.items():
            for name, new in zip(names, prune_group(i, names, [tap.weight(name) for name in names], stat)):
                tap.set_weight(name, new)
                out[(i, name)] = new
        del stats
        for k in range(len(hidden)):  # in place: one copy of the hidden states at a time
            hidden[k] = tap(hidden[k], capture=False)
        if tick is not None:
            tick(1, f"block {i + 1}/{n_blocks} pruned")
    return out


# --- records and statistics shared by the runs of a sweep ----------------------------------------


class CalibrationCache:
    """Calibration records and statistics that do not depend on sparsity, pattern or tau, computed once and
    reused by every :func:`sap_core.pruning.prune` call given this cache (a sweep makes one).

    Keyed by (model, :class:`~sap_core.pruning.CalibrationSpec`, the sink scoring settings
    (:func:`~sap_core.pruning.record.scoring_spec`)):

    * the :class:`~sap_core.pruning.record.SinkRecord` of the noised passes (what the sink SparseGPT family's
      factors are read from);
    * the noised Wanda family's column norms (:class:`NoisedStats`) per weighting: sink_wanda
      (``official``), noised_wanda (``none``) and gated_sink_wanda at each tau (``gated``). Weightings
      announced with :meth:`plan` before the first run of a key are computed in the same forward passes;
      one asked for later costs its own passes.

    The block-sequential statistics (wanda, sparsegpt, sink SparseGPT family) depend on the
    already-pruned blocks, hence on sparsity and pattern: they are not cached. Every cached value is
    what an uncached run computes, by the same code in the same order, so rows do not change.
    """

    def __init__(self) -> None:
        self._planned: dict[tuple, list[Weighting]] = {}
        self._records: dict[tuple, SinkRecord] = {}
        self._stats: dict[tuple, dict[Weighting, NoisedStats]] = {}
        self.hits = 0

    @staticmethod
    def _key(handle, cal, sink: SinkSpec) -> tuple:
        return (id(handle.module), cal, scoring_spec(sink))

    def plan(self, handle, spec) -> None:
        """Announce a coming run of :class:`~sap_core.pruning.PruneSpec` ``spec``: a noised Wanda
        method's weighting is then computed in the first pass of its key (other methods: no-op)."""
        row = METHOD_ROWS[spec.method]
        if not row.reads_noised_norms:  # block-sequential rows, magnitude and the structured rows (own calibration)
            return
        planned = self._planned.setdefault(self._key(handle, spec.calibration, spec.sink), [])
        w = weighting(row.factors, spec.sink.tau)
        if w not in planned:
            planned.append(w)

    def _reused(self, cal, tick: Tick | None, message: str) -> None:
        self.hits += 1
        if tick is not None:
            tick(cal.nsamples * len(cal.timesteps), message)

    def record(self, handle, cal, sink: SinkSpec, token_ids, tick: Tick | None = None, taps=None) -> SinkRecord:
        """:func:`~sap_core.pruning.record.record_calibration`, run on the first call of a key; a reused
        record has ``passes`` 0."""
        key = self._key(handle, cal, sink)
        if key in self._records:
            self._reused(cal, tick, "calibration record reused")
            return dataclasses.replace(self._records[key], passes=0)
        self._records[key] = record_calibration(handle, cal, sink, token_ids, tick, taps)
        return self._records[key]

    def noised_wanda(
        self, handle, cal, sink: SinkSpec, token_ids, factors: str, tick: Tick | None = None, taps=None
    ) -> tuple[SinkRecord, NoisedStats]:
        """:func:`noised_wanda_stats` for one row's ``factors`` at ``sink.tau``, computed (with every planned
        weighting of the same key) on the first call; the record's ``passes`` is 0 when nothing had to run."""
        key, w = self._key(handle, cal, sink), weighting(factors, sink.tau)
        done = self._stats.setdefault(key, {})
        if w in done:
            self._reused(cal, tick, "calibration statistics reused")
            return dataclasses.replace(self._records[key], passes=0), done[w]
        todo = [x for x in self._planned.get(key, []) if x not in done]
        if w not in todo:
            todo.insert(0, w)
        record, results = noised_wanda_stats(handle, cal, sink, token_ids, todo, tick, taps)
        done.update(zip(todo, results))
        self._records.setdefault(key, record)
        return record, done[w]

    def export(self, handle) -> dict[tuple, tuple[SinkRecord | None, dict[Weighting, NoisedStats]]]:
        """What is cached for ``handle``'s model, keyed by (calibration, scoring spec) without the model
        (:func:`sap_core.pruning.engine.calibration_key`): ``{key: (record or None, noised Wanda statistics
        per weighting)}``. Another process holding the same weights takes it with :meth:`adopt` (a
        distributed sweep computes each calibration once and ships it to every worker)."""
        own = id(handle.module)
        keys = {k for k in (*self._records, *self._stats) if k[0] == own}
        return {k[1:]: (self._records.get(k), dict(self._stats.get(k, {}))) for k in keys}

    def adopt(self, handle, entries: dict[tuple, tuple[SinkRecord | None, dict[Weighting, NoisedStats]]]) -> None:
        """Add :meth:`export` ed records and statistics for ``handle``'s model (the same weights they were computed on)."""
        own = id(handle.module)
        for key, (record, stats) in entries.items():
            if record is not None:
                self._records.setdefault((own, *key), record)
            self._stats.setdefault((own, *key), {}).update(stats)
