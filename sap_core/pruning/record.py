"""The calibration stage: the noised recorded passes, once, and the record they leave.

:func:`record_calibration` draws the calibration windows (:func:`~sap_core.pruning.calibration.calibration_ids`),
noises them with the family's forward process (:func:`~sap_core.pruning.calibration.noised_ids`) and runs every sample's timesteps through
the dense model's blocks with an :class:`~sap_core.attention.AttentionRecorder`
(:func:`~sap_core.pruning.taps.recorded_passes`). Each chunk of timesteps is reduced over the selected
layers and heads, scored (:func:`sap_core.sinks.score_steps`) as soon as its pass ends, and each sample's
per-position statistics (:func:`sap_core.sinks.position_stats`) are taken at its last chunk. The result,
a :class:`SinkRecord`, does not depend on tau: the variance gate at any tau
(:meth:`SinkRecord.gate`, :func:`sap_core.sinks.variance_gate`), the token factors of any method row
(:meth:`SinkRecord.mean_factors`, :meth:`SinkRecord.window_factors`) and, with ``per_layer``, what the gate
takes of each layer's sinks (:meth:`SinkRecord.layer_shares`) are read from it in numpy.

Who reads a record: the pruning engine (the factors of the sink-aware methods), ``variant.calibration``
(:class:`CalibrationRecord`, a pruning run's view of its record), the sweep's
:class:`~sap_core.pruning.scores.CalibrationCache` (which stores records), :func:`sap_core.tau.calibration_gate`
(the Pick tau page) and the figures (:func:`sap_core.viz.factor_strip`). The weight statistics are callbacks
(``on_pass``) on the same passes that see each chunk's layer inputs once the chunk is scored;
:class:`TokenFactors` weights them by a row's token factors (the noised Wanda family's column norms,
:class:`~sap_core.pruning.scores.WandaNorms`; the structured methods' moments,
:class:`~sap_core.pruning.structured.StructStats`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import pandas as pd
import torch

from sap_core import sinks
from sap_core.errors import SapError
from sap_core.pruning.calibration import attended_keys, calibration_ids, noised_ids, pad_token_id
from sap_core.pruning.spec import CalibrationSpec, PruneSpec
from sap_core.pruning.taps import Tick, make_taps, recorded_passes
from sap_core.sinks import SinkSpec


def scoring_spec(sink: SinkSpec) -> SinkSpec:
    """The part of a :class:`SinkSpec` a record depends on (tau, the stable-frequency label threshold and
    top_k reset to their defaults): records are stored and reused under it."""
    return dataclasses.replace(sink, tau=0.0, stable_min_frequency=0.5, top_k=4)


@dataclass(frozen=True, eq=False)
class SinkRecord:
    """What the noised recorded passes over ``N`` windows of ``L`` tokens at ``S`` timesteps give.

    * ``sink``: the scoring settings (:func:`scoring_spec`); ``calibration``: the windows' spec (its
      ``noising`` set: :meth:`~sap_core.pruning.spec.CalibrationSpec.for_family`); ``causal``:
      the model's attention (the sink rule's baseline depends on it).
    * ``ids``: ``int64 [N, L]`` clean windows; ``noised``: ``int64 [N, S, L]`` model inputs.
    * ``mass``: ``float32 [N, S, L]`` mass each position receives, summed over the selected layers,
      heads and all queries.
    * ``scores``: ``float64 [N, S, L]`` ``s_t(j)`` (NaN where absent); ``flags``: ``bool [N, S, L]`` sinks.
    * ``frequency``, ``mean_score``, ``variance``: ``float64 [N, L]`` per position over the timesteps
      (:func:`sap_core.sinks.position_stats`).
    * ``layers``: the selected model layers. Only when asked for (``per_layer``: the Pick tau page), else None:
      ``layer_occurrences`` ``int64 [Lsel, N, L]``, the timesteps at which ``j`` is a sink of that layer alone
      (the sink rule on the layer's own mass), and ``layer_sink_mass`` ``float64 [Lsel, N, L]``, the mass ``j``
      receives in that layer summed over those timesteps.
    * ``passes``: forward passes run to make it (per batch of timesteps).
    """

    sink: SinkSpec
    calibration: CalibrationSpec
    causal: bool
    ids: torch.Tensor
    noised: torch.Tensor
    mass: np.ndarray
    scores: np.ndarray
    flags: np.ndarray
    frequency: np.ndarray
    mean_score: np.ndarray
    variance: np.ndarray
    layers: tuple[int, ...]
    layer_occurrences: np.ndarray | None
    layer_sink_mass: np.ndarray | None
    passes: int

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.mass.shape)

    # --- the gate and the factors, at any tau ----------------------------------------------------

    def gate(self, tau: float) -> np.ndarray:
        """``bool [N, L]``: the variance gate at ``tau`` (:func:`sap_core.sinks.variance_gate`: the unstable
        sinks, never a non-sink; every sink at tau = 0). :class:`~sap_core.errors.SapError` for a bad tau."""
        return sinks.variance_gate(self.frequency, self.variance, sinks.check_tau(tau, SapError))

    def factor_gate(self, factors: str, tau: float) -> np.ndarray:
        """``bool [N, L]``: positions a method row's ``factors`` down-weight (:func:`sap_core.sinks.factor_gate`)."""
        return sinks.factor_gate(factors, self.gate(tau))

    def mean_factors(self, factors: str, tau: float) -> np.ndarray:
        """``float32 [N, L]`` token factors ``1 − g_j·mean_t s_t(j)`` (the sink SparseGPT family)."""
        gate = self.factor_gate(factors, tau)
        return np.stack([sinks.mean_factors(self.mean_score[n], gate[n]) for n in range(len(gate))])

    def window_factors(self, window: int, tau: float) -> pd.DataFrame:
        """One calibration window, one row per position: ``mean_score`` (``mean_t s_t(j)``), ``official`` (the
        factor ``1 − mean_t s_t(j)`` of the official rule, every position), ``gate`` (the variance gate at
        ``tau``) and ``gated`` (``1 − g_j·mean_t s_t(j)``): what the Prune page's factor strip draws."""
        gate = self.gate(tau)[window]
        score = self.mean_score[window]
        return pd.DataFrame(
            dict(
                mean_score=score,
                official=sinks.mean_factors(score, np.ones_like(gate)),
                gate=gate,
                gated=sinks.mean_factors(score, gate),
            )
        )

    def labels(self, spec: SinkSpec) -> np.ndarray:
        """``str [N, L]`` none / transient / stable / unstable at ``spec.tau`` (:func:`sap_core.sinks.stability_labels`)."""
        return sinks.stability_labels(self.frequency, self.variance, spec)

    # --- what the gate takes, for picking tau ----------------------------------------------------

    @property
    def is_sink(self) -> np.ndarray:
        """``bool [N, L]``: sink at some timestep (only these can be gated)."""
        return self.frequency > 0

    @property
    def sink_variance(self) -> np.ndarray:
        """``v_j`` of every (window, position) that is a sink at some timestep: the values tau cuts."""
        return sinks.sink_variance(self.frequency, self.variance)

    def gated_share(self, tau: float) -> float:
        """Share of the sink positions (:attr:`is_sink`) that the gate opens at ``tau``."""
        return sinks.gated_share(self.frequency, self.variance, sinks.check_tau(tau, SapError))

    def layer_shares(self, tau: float) -> pd.DataFrame:
        """One row per selected layer: ``occurrences`` (sink occurrences of the layer), ``gated`` (those
        on gated positions), ``occurrence_share`` and ``mass_share`` (share of the mass they receive).
        Needs a record made with ``per_layer``."""
        assert self.layer_occurrences is not None, "record_calibration(..., per_layer=True) keeps the per-layer sinks"
        g = self.gate(tau)[None]
        n = len(self.layers)
        occ = self.layer_occurrences.reshape(n, -1).sum(1)
        gated = np.where(g, self.layer_occurrences, 0).reshape(n, -1).sum(1)
        mass = self.layer_sink_mass.reshape(n, -1).sum(1)
        gmass = np.where(g, self.layer_sink_mass, 0).reshape(n, -1).sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return pd.DataFrame(
                dict(
                    layer=list(self.layers),
                    occurrences=occ,
                    gated=gated,
                    occurrence_share=np.where(occ > 0, gated / np.maximum(occ, 1), np.nan),
                    mass_share=np.where(mass > 0, gmass / np.where(mass > 0, mass, 1), np.nan),
                )
            )

    def top_tokens(self, tau: float, decode: Callable[[list[int]], str], n: int = 10) -> pd.DataFrame:
        """The ``n`` tokens with the most gated sink positions at ``tau``: ``token`` id, ``text``,
        ``gated`` (gated sink positions), ``sinks`` (sink positions) and ``gated_share``."""
        ids = self.ids.numpy()
        sink_ids = ids[self.is_sink]
        gated_ids = ids[self.is_sink & self.gate(tau)]
        tokens, counts = np.unique(gated_ids, return_counts=True)
        order = np.lexsort((tokens, -counts))[:n]
        sink_counts = {int(t): int(c) for t, c in zip(*np.unique(sink_ids, return_counts=True))}
        rows = [
            dict(
                token=int(tokens[i]),
                text=decode([int(tokens[i])]),
                gated=int(counts[i]),
                sinks=sink_counts[int(tokens[i])],
                gated_share=counts[i] / sink_counts[int(tokens[i])],
            )
            for i in order
        ]
        return pd.DataFrame(rows, columns=["token", "text", "gated", "sinks", "gated_share"])


@dataclass(frozen=True, eq=False)
class CalibrationRecord:
    """What one pruning run calibrated on (``variant.calibration``): a view of its :class:`SinkRecord` at the
    run's own row and sink settings, nothing copied.

    * ``ids``: ``int64 [nsamples, seqlen]`` clean windows.
    * ``record``: the :class:`SinkRecord` of the noised passes; None for methods without them (wanda,
      sparsegpt, the clean structured methods), whose views below are None (``timesteps``: empty).
    * ``factors``, ``sink``: the run's row factors (``Method.factors``) and sink settings (its tau).
    * ``token_weights``: the factor each token's layer inputs were multiplied by:
      ``float32 [nsamples, n_timesteps, seqlen]`` for the Wanda family and the structured methods (``1 −
      s_t(j)``; gated: ``1 − g_j·s_t(j)``; noised controls: 1) and ``[nsamples, seqlen]`` for the SparseGPT
      family (``1 − mean_t s_t(j)``; gated: ``1 − g_j·mean_t s_t(j)``). None when no token was weighted.

    Views of the record: ``noised`` (``int64 [N, S, L]``), ``mass`` (``float32 [N, S, L]``), ``sink_scores``
    (``float32 [N, S, L]`` ``s_t(j)``), ``variance`` (``float32 [N, L]``), ``labels`` (``str [N, L]`` none /
    transient / stable / unstable at the run's tau) and ``gate`` (``bool [N, L]``: the positions the run's
    factors down-weight: the variance gate for a gated row, every position for sink_wanda / sink_sparsegpt,
    none for the noised controls).
    """

    ids: np.ndarray
    record: SinkRecord | None = None
    factors: str = "none"
    sink: SinkSpec = SinkSpec()
    token_weights: np.ndarray | None = None

    @classmethod
    def of(cls, spec: PruneSpec, clean: torch.Tensor, record: SinkRecord | None, token_weights) -> CalibrationRecord:
        """The view of a run of ``spec`` on windows ``clean`` with its ``record`` (None: no noised passes)."""
        if record is None:
            return cls(ids=clean.numpy())
        return cls(ids=clean.numpy(), record=record, factors=spec.row.factors, sink=spec.sink, token_weights=token_weights)

    @property
    def timesteps(self) -> list[int]:
        return [] if self.record is None else self.record.calibration.timesteps

    @property
    def noised(self) -> np.ndarray | None:
        return None if self.record is None else self.record.noised.numpy()

    @property
    def mass(self) -> np.ndarray | None:
        return None if self.record is None else self.record.mass

    @cached_property
    def sink_scores(self) -> np.ndarray | None:
        return None if self.record is None else self.record.scores.astype(np.float32)

    @cached_property
    def variance(self) -> np.ndarray | None:
        return None if self.record is None else self.record.variance.astype(np.float32)

    @cached_property
    def labels(self) -> np.ndarray | None:
        return None if self.record is None else self.record.labels(self.sink)

    @cached_property
    def gate(self) -> np.ndarray | None:
        return None if self.record is None else self.record.factor_gate(self.factors, self.sink.tau)

    def window_factors(self, window: int) -> pd.DataFrame:
        """:meth:`SinkRecord.window_factors` of one window at the run's tau."""
        assert self.record is not None, "a run without noised passes weighted no token"
        return self.record.window_factors(window, self.sink.tau)


# --- token factors on the recorded passes -------------------------------------------------------

Weighting = tuple[str, float]  # (a method row's factors, tau: read only by "gated")


def weighting(factors: str, tau: float) -> Weighting:
    """The key of a row's token factors: tau only matters to the gated ones."""
    return (factors, float(tau) if factors == "gated" else 0.0)


class TokenFactors:
    """An ``on_pass`` callback of :func:`record_calibration` that hands each chunk's block inputs, with the
    per-step token factors ``1 − g_j·s_t(j)`` of each of ``weightings``, to :meth:`consume`. An ungated
    weighting's factors are known as soon as the chunk is scored; a gated one needs the sample's variance, so
    the sample's chunks (references to the block inputs) are held until its last chunk, then consumed in
    order. ``token_weights``: ``float32 [K, N, S, L]`` the factors used, per weighting."""

    def __init__(self, weightings: list[Weighting]):
        assert weightings, "at least one weighting"
        self.weightings = list(weightings)
        self.token_weights: np.ndarray | None = None
        self._pending: list = []

    def consume(self, k: int, inputs: list, w: np.ndarray) -> None:
        """Add block inputs ``inputs`` (per block, ``[(group, x)]``) weighted by ``w`` ``[B, L]`` to weighting ``k``."""
        raise NotImplementedError

    def __call__(self, n: int, c0: int, c1: int, inputs: list, record: SinkRecord) -> None:
        N, S, L = record.shape
        if self.token_weights is None:
            self.token_weights = np.zeros((len(self.weightings), N, S, L), np.float32)
        gated = [factors == "gated" for factors, _ in self.weightings]
        for k, (factors, _) in enumerate(self.weightings):
            if not gated[k]:
                w = self.token_weights[k, n, c0:c1] = sinks.step_factors(
                    record.scores[n, c0:c1], sinks.factor_gate(factors, np.zeros(L, bool))
                )
                self.consume(k, inputs, w)
        if not any(gated):
            return
        self._pending.append((c0, c1, inputs))
        if c1 < S:
            return
        for k, (factors, tau) in enumerate(self.weightings):  # the sample's last chunk: its variance is known
            if gated[k]:
                w = self.token_weights[k, n] = sinks.step_factors(record.scores[n], record.gate(tau)[n])
                for p0, p1, held in self._pending:
                    self.consume(k, held, w[p0:p1])
        self._pending = []


OnPass = Callable[[int, int, int, list, SinkRecord], None]  # (sample, c0, c1, block inputs, record so far)


@torch.no_grad()
def record_calibration(
    handle,
    calibration: CalibrationSpec,
    sink: SinkSpec,
    token_ids: list[int],
    tick: Tick | None = None,
    taps: list | None = None,
    on_pass: OnPass | None = None,
    per_layer: bool = False,
) -> SinkRecord:
    """Run the noised recorded passes of ``calibration`` on the dense model and return their record.

    ``token_ids``: the tokenized calibration text (:func:`~sap_core.pruning.calibration.tokenize`);
    ``taps``: the blocks' :class:`~sap_core.pruning.taps.BlockTap` (taken now if None). ``on_pass(n, c0,
    c1, inputs, record)``, when given, is called after each chunk of timesteps ``[c0, c1)`` of sample ``n``
    is scored (and, at the sample's last chunk, after its position statistics are set), with each block's
    captured layer inputs; without it no inputs are kept. ``per_layer`` keeps each selected layer's own sinks
    (``layer_occurrences``, ``layer_sink_mass``), reduced at each sample's last chunk.
    ``tick(units, message)`` is called per chunk and may raise :class:`~sap_core.errors.Cancelled`.
    The forward process is the official one of the model's family unless ``calibration.noising`` names
    one; Dream's also masks the windows' pad tokens out of attention as keys (:func:`~sap_core.pruning.calibration.attended_keys`).
    """
    calibration = calibration.for_family(handle.family)
    clean, generator = calibration_ids(token_ids, calibration)
    noised = noised_ids(clean, calibration, handle.mask_id, generator)
    keys = attended_keys(clean, pad_token_id(handle)) if calibration.noising == "dream" else None
    N, S, L = noised.shape
    layers, heads = sink.resolve(len(handle.module.blocks), handle.n_heads)
    taps = make_taps(handle) if taps is None else taps
    record = SinkRecord(
        sink=scoring_spec(sink),
        calibration=calibration,
        causal=bool(handle.causal),
        ids=clean,
        noised=noised,
        mass=np.zeros((N, S, L), np.float32),
        scores=np.zeros((N, S, L)),
        flags=np.zeros((N, S, L), bool),
        frequency=np.zeros((N, L)),
        mean_score=np.zeros((N, L)),
        variance=np.zeros((N, L)),
        layers=tuple(layers),
        layer_occurrences=np.zeros((len(layers), N, L), np.int64) if per_layer else None,
        layer_sink_mass=np.zeros((len(layers), N, L), np.float64) if per_layer else None,
        passes=0,
    )
    layer_mass = np.zeros((len(layers), S, L), np.float32) if per_layer else None  # one sample's, per layer
    # another detector than the official rule reads each layer's heads: one sample's [Lsel, S, H, L]
    layer_heads = np.zeros((len(layers), S, len(heads), L), np.float32) if per_layer and sink.detector != "official" else None
    passes = 0
    for n, c0, c1, attention, inputs in recorded_passes(handle, noised, calibration.batch_size, taps, on_pass is not None, keys):
        passes += 1
        m = record.mass[n, c0:c1] = _selected(attention, layers, heads)
        record.scores[n, c0:c1], record.flags[n, c0:c1] = _scored(attention, m, sink, layers, heads, handle.causal)
        if per_layer:
            chosen = attention[:, list(layers)][:, :, list(heads)].float().numpy()  # [B, Lsel, H, L]
            layer_mass[:, c0:c1] = chosen.sum(2).transpose(1, 0, 2)
            if layer_heads is not None:
                layer_heads[:, c0:c1] = chosen.transpose(1, 0, 2, 3)
        if c1 == S:
            stats = sinks.position_stats(record.scores[n], record.flags[n], sink)
            record.frequency[n], record.mean_score[n], record.variance[n] = stats.frequency, stats.mean_score, stats.variance
            if per_layer:
                _layer_sinks(record, n, layer_mass, layer_heads)
        if on_pass is not None:
            on_pass(n, c0, c1, inputs, record)
        del inputs
        if tick is not None:
            tick(c1 - c0, f"sample {n + 1}/{N}, timesteps {c0 + 1}–{c1} of {S}")
    return dataclasses.replace(record, passes=passes)


def _layer_sinks(record: SinkRecord, n: int, layer_mass: np.ndarray, layer_heads: np.ndarray | None) -> None:
    """Sample ``n``'s sinks of each selected layer alone into the record: the official rule on the layer's summed
    mass (``layer_mass`` ``float32 [Lsel, S, L]``), another detector on the layer's heads (``layer_heads``
    ``float32 [Lsel, S, H, L]``), as :func:`_scored` finds the record's own sinks."""
    for i in range(len(record.layers)):
        if layer_heads is None:
            flags = sinks.sink_flags(layer_mass[i], record.sink, causal=record.causal)
        else:
            flags = record.sink.sink_detector.detect(layer_heads[i][:, None])[1][:, 0]  # [S, 1, H, L] -> [S, L]
        record.layer_occurrences[i, n] = flags.sum(0)
        record.layer_sink_mass[i, n] = np.where(flags, layer_mass[i], 0.0).sum(0)


def _scored(attention: torch.Tensor, m: np.ndarray, sink: SinkSpec, layers, heads, causal: bool):
    """Scores and flags ``[B, L]`` of a chunk: the spec's rule on the summed mass ``m`` (the official reference), or
    the chosen detector (``sink.detector``) on every selected head of the recorder's ``[B, layers, heads, L]`` mass."""
    if sink.detector == "official":
        return sinks.score_steps(m, sink, causal=causal)
    per_head = attention[:, list(layers)][:, :, list(heads)].float().numpy()
    scores, flags = sink.sink_detector.detect(per_head.reshape(per_head.shape[0], 1, -1, per_head.shape[-1]))
    return scores[:, 0], flags[:, 0]


def _selected(attention: torch.Tensor, layers: tuple[int, ...], heads: tuple[int, ...]) -> np.ndarray:
    """The recorder's ``[B, layers, heads, L]`` mass summed over the selected layers and heads: ``float32 [B, L]``."""
    _, n_layers, n_heads, _ = attention.shape
    m = attention
    if layers != tuple(range(n_layers)):
        m = m[:, list(layers)]
    if heads != tuple(range(n_heads)):
        m = m[:, :, list(heads)]
    return m.sum(dim=(1, 2)).numpy().astype(np.float32)
