"""The calibration stage: the noised recorded passes, once, and the record they leave.

:func:`record_calibration` draws the calibration windows (:func:`~sap_core.pruning.calibration.calibration_ids`),
noises them (:func:`~sap_core.pruning.calibration.noised_ids`) and runs every sample's timesteps through
the dense model's blocks with an :class:`~sap_core.attention.AttentionRecorder`
(:func:`~sap_core.pruning.taps.recorded_passes`). Each chunk of timesteps is reduced over the selected
layers and heads, scored (:func:`sap_core.sinks.score_steps`) as soon as its pass ends, and each sample's
per-position statistics (:func:`sap_core.sinks.position_stats`) are taken at its last chunk. The result,
a :class:`SinkRecord`, does not depend on tau: the variance gate at any tau
(:meth:`SinkRecord.gate`, :func:`sap_core.sinks.variance_gate`) and the token factors of any method row
(:meth:`SinkRecord.step_factors`, :meth:`SinkRecord.mean_factors`) are read from it in numpy.

Who reads a record: the pruning engine (the factors of the sink-aware methods, and ``variant.calibration``),
the sweep's :class:`~sap_core.pruning.scores.CalibrationCache` (which stores records) and
:func:`sap_core.tau.calibration_gate` (the Pick tau page). The single-pass Wanda statistics are a callback
(``on_pass``) on the same passes: it sees each chunk's layer inputs once the chunk is scored.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from sap_core import sinks
from sap_core.pruning.calibration import calibration_ids, noised_ids
from sap_core.pruning.spec import CalibrationSpec
from sap_core.pruning.taps import Tick, make_taps, recorded_passes
from sap_core.sinks import SinkSpec


def scoring_spec(sink: SinkSpec) -> SinkSpec:
    """The part of a :class:`SinkSpec` a record depends on (tau, the stable-frequency label threshold and
    top_k reset to their defaults): records are stored and reused under it."""
    return dataclasses.replace(sink, tau=0.0, stable_min_frequency=0.5, top_k=4)


@dataclass(frozen=True, eq=False)
class SinkRecord:
    """What the noised recorded passes over ``N`` windows of ``L`` tokens at ``S`` timesteps give.

    * ``sink``: the scoring settings (:func:`scoring_spec`); ``calibration``: the windows' spec.
    * ``ids``: ``int64 [N, L]`` clean windows; ``noised``: ``int64 [N, S, L]`` model inputs.
    * ``mass``: ``float32 [N, S, L]`` mass each position receives, summed over the selected layers,
      heads and all queries.
    * ``scores``: ``float64 [N, S, L]`` ``s_t(j)`` (NaN where absent); ``flags``: ``bool [N, S, L]`` sinks.
    * ``frequency``, ``mean_score``, ``variance``: ``float64 [N, L]`` per position over the timesteps
      (:func:`sap_core.sinks.position_stats`).
    * ``layers``: the selected model layers; ``layer_mass``: ``float32 [Lsel, N, S, L]`` the same mass per
      selected layer (only when asked for: the Pick tau page's per-layer view), else None.
    * ``passes``: forward passes run to make it (per batch of timesteps).
    """

    sink: SinkSpec
    calibration: CalibrationSpec
    ids: torch.Tensor
    noised: torch.Tensor
    mass: np.ndarray
    scores: np.ndarray
    flags: np.ndarray
    frequency: np.ndarray
    mean_score: np.ndarray
    variance: np.ndarray
    layers: tuple[int, ...]
    layer_mass: np.ndarray | None
    passes: int

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.mass.shape)

    def gate(self, tau: float) -> np.ndarray:
        """``bool [N, L]``: the variance gate at ``tau`` (:func:`sap_core.sinks.variance_gate`)."""
        return sinks.variance_gate(self.frequency, self.variance, tau)

    def factor_gate(self, factors: str, tau: float) -> np.ndarray:
        """``bool [N, L]``: positions a method row's ``factors`` down-weight (:func:`sap_core.sinks.factor_gate`)."""
        return sinks.factor_gate(factors, self.gate(tau))

    def step_factors(self, factors: str, tau: float) -> np.ndarray:
        """``float32 [N, S, L]`` per-step token factors ``1 − g_j·s_t(j)`` (the noised Wanda family)."""
        gate = self.factor_gate(factors, tau)
        return np.stack([sinks.step_factors(self.scores[n], gate[n]) for n in range(len(gate))])

    def mean_factors(self, factors: str, tau: float) -> np.ndarray:
        """``float32 [N, L]`` token factors ``1 − g_j·mean_t s_t(j)`` (the sink SparseGPT family)."""
        gate = self.factor_gate(factors, tau)
        return np.stack([sinks.mean_factors(self.mean_score[n], gate[n]) for n in range(len(gate))])

    def labels(self, spec: SinkSpec) -> np.ndarray:
        """``str [N, L]`` none / transient / stable / unstable at ``spec.tau`` (:func:`sap_core.sinks.stability_labels`)."""
        return sinks.stability_labels(self.frequency, self.variance, spec)


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
    captured layer inputs; without it no inputs are kept. ``per_layer`` keeps the mass per selected layer.
    ``tick(units, message)`` is called per chunk and may raise :class:`~sap_core.errors.Cancelled`.
    """
    clean, generator = calibration_ids(token_ids, calibration)
    noised = noised_ids(clean, calibration, handle.mask_id, generator)
    N, S, L = noised.shape
    layers, heads = sink.resolve(len(handle.module.blocks), handle.n_heads)
    taps = make_taps(handle) if taps is None else taps
    record = SinkRecord(
        sink=scoring_spec(sink),
        calibration=calibration,
        ids=clean,
        noised=noised,
        mass=np.zeros((N, S, L), np.float32),
        scores=np.zeros((N, S, L)),
        flags=np.zeros((N, S, L), bool),
        frequency=np.zeros((N, L)),
        mean_score=np.zeros((N, L)),
        variance=np.zeros((N, L)),
        layers=tuple(layers),
        layer_mass=np.zeros((len(layers), N, S, L), np.float32) if per_layer else None,
        passes=0,
    )
    passes = 0
    for n, c0, c1, attention, inputs in recorded_passes(handle, noised, calibration.batch_size, taps, on_pass is not None):
        passes += 1
        m = record.mass[n, c0:c1] = _selected(attention, layers, heads)
        record.scores[n, c0:c1], record.flags[n, c0:c1] = sinks.score_steps(m, sink, causal=handle.causal)
        if per_layer:
            record.layer_mass[:, n, c0:c1] = (
                attention[:, list(layers)][:, :, list(heads)].sum(2).float().numpy().transpose(1, 0, 2)
            )
        if c1 == S:
            stats = sinks.position_stats(record.scores[n], record.flags[n], sink)
            record.frequency[n], record.mean_score[n], record.variance[n] = stats.frequency, stats.mean_score, stats.variance
        if on_pass is not None:
            on_pass(n, c0, c1, inputs, record)
        del inputs
        if tick is not None:
            tick(c1 - c0, f"sample {n + 1}/{N}, timesteps {c0 + 1}–{c1} of {S}")
    return dataclasses.replace(record, passes=passes)


def _selected(attention: torch.Tensor, layers: tuple[int, ...], heads: tuple[int, ...]) -> np.ndarray:
    """The recorder's ``[B, layers, heads, L]`` mass summed over the selected layers and heads: ``float32 [B, L]``."""
    _, n_layers, n_heads, _ = attention.shape
    m = attention
    if layers != tuple(range(n_layers)):
        m = m[:, list(layers)]
    if heads != tuple(range(n_heads)):
        m = m[:, :, list(heads)]
    return m.sum(dim=(1, 2)).numpy().astype(np.float32)
