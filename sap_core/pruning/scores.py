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
  gated_sink_wanda (``g``: the variance gate of :func:`sap_core.sinks.step_downweights`), ``1`` for
  noised_wanda.

All statistics are float32. Nothing here writes to the shared model: every forward runs through a
:class:`BlockTap`, a clone of one block that shares its weights' storage (no copy) but has its own
parameter objects and hooks and can take replacement weights. A tap is a snapshot: a variant that
another thread swaps into the shared model later (:meth:`PrunedVariant.applied` replaces the
parameters' tensors, never their contents) does not reach it, so :func:`make_taps` is the only
step that needs ``handle.lock``.

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

import copy
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from sap_core import sinks
from sap_core.attention import AttentionRecorder
from sap_core.models.placement import execution_device
from sap_core.pruning.spec import METHOD_ROWS
from sap_core.sinks import SinkSpec

Group = tuple[str, ...]  # names of the linears of one block that read the same input tensor
Tick = Callable[[int, str], None]  # (units done in this call, message)


def shadow(module: nn.Module) -> nn.Module:
    """A clone of ``module`` whose parameters are new ``Parameter`` objects over the *same* tensors
    (no weight copy) and whose buffers are shared; it has its own submodule objects, hook
    dictionaries and parameter slots, so hooks and replacement weights never touch ``module``."""
    memo = {id(p): nn.Parameter(p.data, requires_grad=False) for p in module.parameters()}
    memo.update({id(b): b for b in module.buffers()})
    clone = copy.deepcopy(module, memo)
    for m in clone.modules():
        m._forward_hooks.clear()
        m._forward_pre_hooks.clear()
    return clone


class BlockTap:
    """Runs one transformer block on a parameter-sharing clone and captures its linears' inputs.

    ``tap(hidden, recorder)`` is ``block(hidden, recorder)``; afterwards :meth:`take_inputs` returns
    ``[(group, input)]``: each distinct input tensor once with the names of the linears that read it
    (q/k/v share one, gate/up share one). :meth:`set_weight` replaces a linear's weight in the clone
    only. Captured tensors are references, not copies: the block must not modify them in place.
    """

    def __init__(self, block: nn.Module):
        self.module = shadow(block)
        self.linears: dict[str, nn.Linear] = {n: m for n, m in self.module.named_modules() if isinstance(m, nn.Linear)}
        self.capture = True
        self._inputs: dict[str, torch.Tensor] = {}
        for name, lin in self.linears.items():
            lin.register_forward_pre_hook(self._hook(name))
        self.device = execution_device(block)

    def _hook(self, name: str):
        def fn(_module, args):
            if self.capture:
                self._inputs[name] = args[0]

        return fn

    def __call__(self, hidden: torch.Tensor, recorder: AttentionRecorder | None = None, capture: bool = True) -> torch.Tensor:
        self._inputs = {}
        self.capture = capture
        return self.module(hidden.to(self.device), recorder)

    def take_inputs(self) -> list[tuple[Group, torch.Tensor]]:
        groups: list[tuple[Group, torch.Tensor]] = []
        for name in self.linears:
            x = self._inputs[name]
            for i, (names, y) in enumerate(groups):
                if y is x:
                    groups[i] = (names + (name,), y)
                    break
            else:
                groups.append(((name,), x))
        self._inputs = {}
        return groups

    def weight(self, name: str) -> torch.Tensor:
        return self.linears[name].weight

    def set_weight(self, name: str, weight: torch.Tensor) -> None:
        self.linears[name]._parameters["weight"] = nn.Parameter(weight, requires_grad=False)


def make_taps(handle) -> list[BlockTap]:
    """One :class:`BlockTap` per block, taken under ``handle.lock`` (so no variant is swapped in)."""
    with handle.lock:
        return [BlockTap(b) for b in handle.module.blocks]


def embed(handle, ids: torch.Tensor) -> torch.Tensor:
    return handle.module.embed(ids.to(handle.device))


# --- the recorded passes: every block on noised inputs, attention recorded --------------------


def reduce_mass(mass: torch.Tensor, spec: SinkSpec) -> np.ndarray:
    """``[B, layers, heads, L]`` recorder output -> ``float32 [B, L]`` summed over the selected
    layers and heads (all of them by default, as the official code)."""
    _, n_layers, n_heads, _ = mass.shape
    layers, heads = spec.resolve(n_layers, n_heads)
    m = mass
    if layers != tuple(range(n_layers)):
        m = m[:, list(layers)]
    if heads != tuple(range(n_heads)):
        m = m[:, :, list(heads)]
    return m.sum(dim=(1, 2)).numpy().astype(np.float32)


def _chunks(S: int, batch_size: int) -> list[tuple[int, int]]:
    return [(c, min(c + batch_size, S)) for c in range(0, S, batch_size)]


def recorded_passes(handle, noised: torch.Tensor, batch_size: int, taps: list[BlockTap], capture: bool):
    """The one recorded-pass loop: for each sample ``n`` of ``noised`` ``int64 [N, S, L]`` and each
    chunk ``[c0, c1)`` of up to ``batch_size`` timesteps, one forward through every block's tap with an
    :class:`AttentionRecorder`. Yields ``(n, c0, c1, attention, inputs)``: ``attention`` the recorder's
    ``float32 [c1 − c0, layers, heads, L]`` mass per layer and head (:func:`reduce_mass` sums the
    selection), ``inputs`` each block's :meth:`BlockTap.take_inputs` when ``capture`` (else None)."""
    N, S, _ = noised.shape
    for n in range(N):
        for c0, c1 in _chunks(S, batch_size):
            recorder = AttentionRecorder()
            recorder.start_pass()
            h = embed(handle, noised[n, c0:c1])
            inputs = [] if capture else None
            for tap in taps:
                h = tap(h, recorder, capture=capture)
                if capture:
                    inputs.append(tap.take_inputs())
            del h
            yield n, c0, c1, recorder.end_pass(), inputs


@torch.no_grad()
def sink_mass(
    handle,
    noised: torch.Tensor,
    spec: SinkSpec,
    batch_size: int,
    tick: Tick | None = None,
    taps: list[BlockTap] | None = None,
) -> np.ndarray:
    """``float32 [N, S, L]`` reduced attention mass of every noised sequence (dense model, one
    recorded pass per batch, no activations kept): what the SparseGPT family's factors need."""
    N, S, L = noised.shape
    taps = make_taps(handle) if taps is None else taps
    mass = np.zeros((N, S, L), np.float32)
    for n, c0, c1, attention, _ in recorded_passes(handle, noised, batch_size, taps, capture=False):
        mass[n, c0:c1] = reduce_mass(attention, spec)
        if tick is not None:
            tick(c1 - c0, f"sink mass: sample {n + 1}/{N}, timesteps {c0 + 1}–{c1} of {S}")
    return mass


# --- sink weighting of one sample ---------------------------------------------------------------

# A weighting names the token factors of a method row (``Method.factors``): "none" (1), "official" (1 − s,
# every position: the row is not gated) or "gated" (1 − g·s, g the variance gate of the SinkSpec's tau).

Scored = tuple[np.ndarray, np.ndarray]  # one scoring of a sample: float64 scores [S, L] (NaN: absent), bool flags [S, L]


def score_sample(mass: np.ndarray, spec: SinkSpec, causal: bool) -> Scored:
    """The one scoring of a sample's reduced mass ``[S, L]`` (:func:`sap_core.sinks.score_steps`); the
    factors and the record are derived from it. Each step is scored on its own, so scoring a chunk of
    timesteps gives the same rows as scoring the whole sample."""
    return sinks.score_steps(mass, spec, causal=causal)


def _gate_and_mean(scored: Scored, spec: SinkSpec, weighting: str) -> tuple[np.ndarray, np.ndarray]:
    """(positions the factors down-weight ``bool [L]``, ``mean_t s_t(j)`` ``float64 [L]``). The gate is
    explicit: every position for an ungated row ("official"); for a gated row the variance gate of
    :func:`sap_core.sinks.position_stats` at ``spec.tau`` (the unstable sinks, never a non-sink)."""
    scores, flags = scored
    stats = sinks.position_stats(scores, flags, spec)
    gate = np.ones(scores.shape[-1], bool) if weighting == "official" else stats.gate
    return gate, stats.mean_score


def step_weights(scored: Scored, spec: SinkSpec, weighting: str) -> np.ndarray:
    """Per-step token factors ``float32 [S, L]`` of one sample: ``1 − g_j·s_t(j)`` (1 for "none")."""
    scores = scored[0]
    if weighting == "none":
        return np.ones(scores.shape, np.float32)
    gate = np.ones(scores.shape[-1], bool) if weighting == "official" else _gate_and_mean(scored, spec, weighting)[0]
    return (1.0 - np.where(gate[None, :], np.nan_to_num(scores, nan=0.0), 0.0)).astype(np.float32)


def mean_weights(scored: Scored, spec: SinkSpec, weighting: str) -> np.ndarray:
    """Token factors ``float32 [L]`` of one sample for the SparseGPT family: ``1 − g_j·mean_t s_t(j)``."""
    if weighting == "none":
        return np.ones(scored[0].shape[-1], np.float32)
    gate, mean = _gate_and_mean(scored, spec, weighting)
    return (1.0 - np.where(gate, mean, 0.0)).astype(np.float32)


@dataclass
class SampleSinks:
    """Sink statistics of the calibration samples (``N`` samples, ``S`` timesteps, ``L`` positions)."""

    mass: np.ndarray  # float32 [N, S, L], reduced over the selected layers and heads
    scores: np.ndarray  # float32 [N, S, L], s_t(j)
    variance: np.ndarray  # float32 [N, L], Var_t s_t(j)
    labels: np.ndarray  # str [N, L], sap_core.sinks.LABELS
    gate: np.ndarray  # bool [N, L], positions the gated factors down-weight


def describe_sinks(
    mass: np.ndarray, spec: SinkSpec, causal: bool, scored: tuple[np.ndarray, np.ndarray] | None = None
) -> SampleSinks:
    """Scores, variance and labels of every sample from its reduced mass ``[N, S, L]``; ``scored``:
    the samples' scoring already done (``float64 [N, S, L]`` scores, ``bool [N, S, L]`` flags), else
    scored here."""
    scores, var, labels, gate = [], [], [], []
    for n, m in enumerate(mass):
        full, flags = score_sample(m, spec, causal) if scored is None else (scored[0][n], scored[1][n])
        s = full.astype(np.float32)
        stats = sinks.position_stats(s, flags, spec)
        scores.append(s)
        var.append(stats.variance.astype(np.float32))
        labels.append(stats.label)
        gate.append(stats.gate)
    return SampleSinks(mass, np.stack(scores), np.stack(var), np.stack(labels), np.stack(gate))


# --- noised Wanda family: one recorded pass per forward batch ----------------------------------


@dataclass
class NoisedStats:
    """``norms[i][group]``: ``float32 [in_features]`` accumulated column norms of block ``i``;
    ``mass``: ``float32 [N, S, L]``; ``token_weights``: ``float32 [N, S, L]``; ``passes``: model
    forwards run (per batch of sequences); ``scored``: the one scoring of every sample under the
    weighting's sink settings (``float64 [N, S, L]`` scores, ``bool [N, S, L]`` flags)."""

    norms: list[dict[Group, torch.Tensor]]
    mass: np.ndarray
    token_weights: np.ndarray
    passes: int
    scored: tuple[np.ndarray, np.ndarray]


def _accumulate(acc: dict[Group, torch.Tensor], groups: list[tuple[Group, torch.Tensor]], w: np.ndarray) -> None:
    """``a += Σ_b ‖w_b ⊙ x_b‖₂`` per column, as ``sqrt(w_b² · x_b²)`` (one batched matmul over the
    tokens: ~10x faster on CPU than a strided norm reduction, same value up to rounding)."""
    for names, x in groups:
        wt = torch.from_numpy(np.ascontiguousarray(w)).to(x.device)
        xf = x.float()
        norms = torch.bmm((wt * wt)[:, None, :], xf * xf)[:, 0].sqrt().sum(0)
        prev = acc.get(names)
        acc[names] = norms if prev is None else prev + norms


Weighting = tuple[str, SinkSpec]  # (a method row's factors, the sink settings they use)


@torch.no_grad()
def noised_wanda_stats(
    handle,
    noised: torch.Tensor,
    spec: SinkSpec,
    weighting: str,
    batch_size: int,
    tick: Tick | None = None,
    taps: list[BlockTap] | None = None,
) -> NoisedStats:
    """Single-pass statistics of the noised Wanda family on the dense model.

    ``noised``: ``int64 [N, S, L]``. Each forward carries up to ``batch_size`` timesteps of one
    sample through every block with an :class:`AttentionRecorder`; the block inputs stay referenced
    until the pass ends, then are scaled by the sample's factors and reduced.
    """
    return noised_wanda_stats_many(handle, noised, [(weighting, spec)], batch_size, tick, taps)[0]


@torch.no_grad()
def noised_wanda_stats_many(
    handle,
    noised: torch.Tensor,
    weightings: list[Weighting],
    batch_size: int,
    tick: Tick | None = None,
    taps: list[BlockTap] | None = None,
) -> list[NoisedStats]:
    """:func:`noised_wanda_stats` for several weightings from the same forward passes: one
    :class:`NoisedStats` per ``(weighting, spec)``, each equal to what a run with that weighting alone
    gives (same inputs, same reductions in the same order). The specs must select the same layers and
    heads (the reduced mass is shared). A sweep uses it to score sink_wanda, noised_wanda and
    gated_sink_wanda at every tau with one set of forward passes."""
    N, S, L = noised.shape
    if not weightings:
        raise ValueError("noised_wanda_stats_many needs at least one weighting.")
    spec0 = weightings[0][1]
    if any((w[1].layers, w[1].heads) != (spec0.layers, spec0.heads) for w in weightings):
        raise ValueError("weightings computed together must select the same layers and heads.")
    taps = make_taps(handle) if taps is None else taps
    K = len(weightings)
    acc: list[list[dict[Group, torch.Tensor]]] = [[{} for _ in taps] for _ in range(K)]
    mass = np.zeros((N, S, L), np.float32)
    weights = np.zeros((K, N, S, L), np.float32)
    gated = [w == "gated" for w, _ in weightings]
    # one scoring per sample and step for each distinct scoring rule among the weightings
    rule = [(w[1].rule, w[1].k, w[1].alpha, w[1].epsilon, w[1].normalize) for w in weightings]
    scored = {r: (np.zeros((N, S, L)), np.zeros((N, S, L), bool)) for r in rule}
    passes = 0
    pending = []
    for n, c0, c1, attention, inputs in recorded_passes(handle, noised, batch_size, taps, capture=True):
        m = mass[n, c0:c1] = reduce_mass(attention, spec0)
        passes += 1
        for r, (scores, flags) in scored.items():
            spec = weightings[rule.index(r)][1]
            scores[n, c0:c1], flags[n, c0:c1] = score_sample(m, spec, handle.causal)
        for k, (weighting, spec) in enumerate(weightings):
            if not gated[k]:
                sc_k = scored[rule[k]]
                weights[k, n, c0:c1] = step_weights((sc_k[0][n, c0:c1], sc_k[1][n, c0:c1]), spec, weighting)
                for a, groups in zip(acc[k], inputs):
                    _accumulate(a, groups, weights[k, n, c0:c1])
        if any(gated):  # the gate needs every timestep of the sample
            pending.append((c0, c1, inputs))
        del inputs
        if tick is not None:
            tick(c1 - c0, f"sample {n + 1}/{N}, timesteps {c0 + 1}–{c1} of {S}")
        if c1 < S:
            continue
        for k, (weighting, spec) in enumerate(weightings):  # the sample's last chunk: apply the gated factors
            if gated[k]:
                weights[k, n] = step_weights((scored[rule[k]][0][n], scored[rule[k]][1][n]), spec, weighting)
                for p0, p1, held in pending:
                    for a, groups in zip(acc[k], held):
                        _accumulate(a, groups, weights[k, n, p0:p1])
        pending.clear()
    return [NoisedStats(acc[k], mass, weights[k], passes, scored[rule[k]]) for k in range(K)]


@torch.no_grad()
def noised_wanda_stats_two_pass(
    handle,
    noised: torch.Tensor,
    spec: SinkSpec,
    weighting: str,
    batch_size: int,
    tick: Tick | None = None,
    taps: list[BlockTap] | None = None,
) -> NoisedStats:
    """The same statistics with the official code's structure: a recorded pass for the mass, then a
    second, plain pass whose hooked inputs are scaled and reduced at once. Kept as the reference the
    single-pass version is tested and benchmarked against; the pruner does not use it."""
    N, S, L = noised.shape
    taps = make_taps(handle) if taps is None else taps
    acc: list[dict[Group, torch.Tensor]] = [{} for _ in taps]
    mass = np.zeros((N, S, L), np.float32)
    weights = np.zeros((N, S, L), np.float32)
    scores, flags = np.zeros((N, S, L)), np.zeros((N, S, L), bool)
    passes = 0
    for n in range(N):
        for _, c0, c1, attention, _ in recorded_passes(handle, noised[n : n + 1], batch_size, taps, capture=False):
            mass[n, c0:c1] = reduce_mass(attention, spec)  # pass 1: attention mass only
            passes += 1
        scores[n], flags[n] = score_sample(mass[n], spec, handle.causal)
        weights[n] = step_weights((scores[n], flags[n]), spec, weighting)
        for c0, c1 in _chunks(S, batch_size):  # pass 2: activations, weighted as they come
            h = embed(handle, noised[n, c0:c1])
            for a, tap in zip(acc, taps):
                h = tap(h)
                _accumulate(a, tap.take_inputs(), weights[n, c0:c1])
            passes += 1
            if tick is not None:
                tick(c1 - c0, f"sample {n + 1}/{N}, timesteps {c0 + 1}–{c1} of {S}")
    return NoisedStats(acc, mass, weights, passes, (scores, flags))


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
    batches = _chunks(N, batch_size)
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


# --- statistics shared by the runs of a sweep ---------------------------------------------------


class CalibrationCache:
    """Calibration statistics that do not depend on sparsity, pattern or tau, computed once and
    reused by every :func:`sap_core.pruning.prune` call given this cache (a sweep makes one).

    Keyed by (model, :class:`~sap_core.pruning.CalibrationSpec`, selected sink layers and heads):

    * the noised Wanda family's column norms (:class:`NoisedStats`) per weighting: sink_wanda
      (``official``, any tau), noised_wanda (``none``) and gated_sink_wanda at each tau (``gated``).
      Weightings announced with :meth:`plan` before the first run of a key are computed in the same
      forward passes (:func:`noised_wanda_stats_many`); one asked for later costs its own passes.
    * the reduced attention mass ``[N, S, L]`` of the noised windows, which the sink SparseGPT family
      needs for its token factors (taken from the noised Wanda pass when one ran).

    The block-sequential statistics (wanda, sparsegpt, sink SparseGPT family) depend on the
    already-pruned blocks, hence on sparsity and pattern: they are not cached. Every cached value is
    what an uncached run computes, by the same code in the same order, so rows do not change.
    """

    def __init__(self) -> None:
        self._planned: dict[tuple, list[Weighting]] = {}
        self._stats: dict[tuple, dict[tuple, NoisedStats]] = {}
        self._mass: dict[tuple, np.ndarray] = {}
        self.hits = 0

    @staticmethod
    def _key(handle, cal, sink: SinkSpec) -> tuple:
        return (id(handle.module), cal, sink.layers, sink.heads)

    @staticmethod
    def _weighting_key(weighting: str, sink: SinkSpec) -> tuple:
        if weighting == "none":
            return (weighting, None)
        return (weighting, dataclasses.replace(sink, tau=0.0) if weighting == "official" else sink)  # tau unused

    def plan(self, handle, spec) -> None:
        """Announce a coming run of :class:`~sap_core.pruning.PruneSpec` ``spec``: a noised Wanda
        method's weighting is then computed in the first pass of its key (other methods: no-op)."""
        row = METHOD_ROWS[spec.method]
        if row.sequential or row.statistic != "wanda":
            return
        weighting = row.factors
        sink = spec.sink
        planned = self._planned.setdefault(self._key(handle, spec.calibration, sink), [])
        if all(self._weighting_key(*w) != self._weighting_key(weighting, sink) for w in planned):
            planned.append((weighting, sink))

    def noised_wanda(
        self,
        handle,
        noised: torch.Tensor,
        cal,
        sink: SinkSpec,
        weighting: str,
        tick: Tick | None = None,
        taps: list[BlockTap] | None = None,
    ) -> NoisedStats:
        """:func:`noised_wanda_stats` for ``weighting``, computed (with every planned weighting of the
        same key) on the first call; ``passes`` is 0 when nothing had to run."""
        key, wkey = self._key(handle, cal, sink), self._weighting_key(weighting, sink)
        done = self._stats.setdefault(key, {})
        if wkey in done:
            self.hits += 1
            if tick is not None:
                tick(noised.shape[0] * noised.shape[1], "calibration statistics reused")
            return dataclasses.replace(done[wkey], passes=0)
        todo = [w for w in self._planned.get(key, []) if self._weighting_key(*w) not in done]
        if all(self._weighting_key(*w) != wkey for w in todo):
            todo.insert(0, (weighting, sink))
        results = noised_wanda_stats_many(handle, noised, todo, cal.batch_size, tick, taps)
        for w, stats in zip(todo, results):
            done[self._weighting_key(*w)] = stats
        self._mass.setdefault(key, results[0].mass)
        return done[wkey]

    def mass(
        self,
        handle,
        noised: torch.Tensor,
        cal,
        sink: SinkSpec,
        tick: Tick | None = None,
        taps: list[BlockTap] | None = None,
    ) -> tuple[np.ndarray, int]:
        """(:func:`sink_mass`, forward passes run now: 0 when it was cached)."""
        key = self._key(handle, cal, sink)
        if key in self._mass:
            self.hits += 1
            if tick is not None:
                tick(noised.shape[0] * noised.shape[1], "sink mass reused")
            return self._mass[key], 0
        self._mass[key] = sink_mass(handle, noised, sink, cal.batch_size, tick, taps)
        return self._mass[key], len(_chunks(noised.shape[1], cal.batch_size)) * noised.shape[0]

    def export(self, handle) -> dict[tuple, tuple[dict, np.ndarray | None]]:
        """What is cached for ``handle``'s model, keyed by (calibration, sink layers, sink heads) without
        the model: ``{key: (noised Wanda statistics per weighting, reduced mass or None)}``. Another
        process holding the same weights takes it with :meth:`adopt` (a distributed sweep computes each
        calibration once and ships it to every worker)."""
        own = id(handle.module)
        keys = {k for k in (*self._stats, *self._mass) if k[0] == own}
        return {k[1:]: (dict(self._stats.get(k, {})), self._mass.get(k)) for k in keys}

    def adopt(self, handle, entries: dict[tuple, tuple[dict, np.ndarray | None]]) -> None:
        """Add :meth:`export` ed statistics for ``handle``'s model (the same weights they were computed on)."""
        own = id(handle.module)
        for key, (stats, mass) in entries.items():
            self._stats.setdefault((own, *key), {}).update(stats)
            if mass is not None:
                self._mass.setdefault((own, *key), mass)
