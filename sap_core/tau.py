"""Picking the variance threshold tau: what the pruner's gate sees, and what a tau does to the model.

The gated methods (``gated_sink_wanda``, ``gated_sink_sparsegpt``) down-weight position ``j`` of a
calibration window only when ``j`` is a sink at some sampled timestep and its sink-score variance
over those timesteps ``v_j = Var_t s_t(j)`` is at least ``tau`` (``tau = 0`` opens the gate for every
sink, never for a non-sink; the official rule, every position down-weighted, is the ungated twin
``sink_wanda`` / ``sink_sparsegpt``). :func:`calibration_gate` computes, once, what that gate is applied to:
``v_j`` for every position of every calibration window at the pruner's noised timesteps, with the
same code as :func:`sap_core.pruning.prune` (same windows, same noise, same statistics). Its
:class:`~sap_core.pruning.record.SinkRecord` (the pruner's own record, kept per layer) then answers, for any
tau, in numpy only:

* :meth:`~sap_core.pruning.record.SinkRecord.gate`: which positions the gate opens;
* :meth:`~sap_core.pruning.record.SinkRecord.layer_shares`: per selected layer, the share of that layer's sink
  occurrences (a position is a sink of layer ``l`` at timestep ``t`` when its mass in layer ``l`` alone passes
  the sink rule) that fall on gated positions, and the share of the mass those occurrences receive;
* :meth:`~sap_core.pruning.record.SinkRecord.top_tokens`: the tokens whose sink positions are gated most often,
  with their text.

:func:`tau_table` reads a tau sweep (:class:`sap_core.sweep.SweepSpec` with ``sink_taus``) at one
sparsity and pattern: each gated method's perplexity at every tau, its difference from its ungated
twin (the official rule) with the paired standard error, and the ``wanda`` / ``noised_wanda`` rows as
references; :func:`best_taus`
picks the lowest-perplexity tau of each gated method and says whether it beats the official twin beyond
the noise (2 paired standard errors by default); :func:`best_tau_sentences` says so in words.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from sap_core import sinks
from sap_core.errors import PruneSpecError, SapError
from sap_core.evaluate import EvalSpec, paired_se_if_known
from sap_core.progress import Progress, report
from sap_core.pruning.calibration import tokenize
from sap_core.pruning.record import SinkRecord, record_calibration
from sap_core.pruning.spec import GATED, UNGATED_TWIN, CalibrationSpec
from sap_core.sink_report import SinkReport
from sap_core.sinks import SinkSpec
from sap_core.sweep import SweepSpec


def calibration_gate(
    handle, calibration: CalibrationSpec = CalibrationSpec(), sink: SinkSpec = SinkSpec(), progress: Progress | None = None
) -> SinkRecord:
    """Run the pruner's calibration stage once (:func:`~sap_core.pruning.record.record_calibration`: same
    windows, noise, passes and statistics as :func:`sap_core.pruning.prune`, with the mass kept per layer)
    and return its :class:`~sap_core.pruning.record.SinkRecord`, with each selected layer's own sinks kept (see
    the module docstring). ``sink.tau`` is not used: every tau is answered afterwards by the record. Raises :class:`PruneSpecError` for a model
    without a mask token or impossible settings, before any forward pass; ``progress`` may raise
    :class:`~sap_core.errors.Cancelled`."""
    if handle.mask_id is None:
        raise PruneSpecError(
            "The variance gate works on [MASK]-noised calibration text, but this model has no mask token: pick a diffusion model."
        )
    calibration.validate()
    try:
        sink.resolve(len(handle.module.blocks), handle.n_heads)
    except SapError as exc:
        raise PruneSpecError(f"Sink settings: {exc}") from exc
    token_ids = tokenize(handle, calibration)
    total = calibration.nsamples * len(calibration.timesteps)
    state = {"done": 0}

    def tick(units: int, message: str) -> None:
        state["done"] += units
        report(progress, state["done"], total, message)

    report(progress, 0, total, "calibration gate")
    return record_calibration(handle, calibration, sink, token_ids, tick, per_layer=True)


def trajectory_gate_inputs(report: SinkReport) -> tuple[np.ndarray, np.ndarray]:
    """``(frequency, variance)`` ``float64 [L]`` of a generation's positions over its trajectory: what the gate
    would compare with tau there (the calibration windows' are the record's ``frequency`` and ``variance``)."""
    return np.asarray(report.positions.frequency, np.float64), np.asarray(report.positions.variance, np.float64)


# --- tau sweeps -----------------------------------------------------------------------------------

REFERENCES = ("wanda", "noised_wanda")


def _row(kind: str, family: str, r, tau: float, ref=None, estimates=None) -> dict:
    """One table row from sweep row ``r``; ``ref``: the sweep row its paired difference is taken against."""
    d = se = math.nan
    if ref is not None:
        d = float(r["nll"]) - float(ref["nll"])
        se = paired_se_if_known(estimates.get(str(r["label"])), estimates.get(str(ref["label"])))
    return dict(
        kind=kind,
        family=family,
        method=str(r["method"]),
        tau=tau,
        ppl=float(r["ppl"]),
        ppl_se=float(r["ppl_se"]),
        nll=float(r["nll"]),
        nll_se=float(r["nll_se"]),
        delta_nll=d,
        se_paired=se,
        z=d / se if se > 0 else math.nan,
        label=str(r["label"]),
    )


def tau_table(df: pd.DataFrame, sparsity: float, pattern: str = "unstructured") -> pd.DataFrame:
    """Rows of a tau sweep at one ``sparsity`` and ``pattern`` (an N:M pattern ignores the sparsity).

    Per gated method (``family``), first its ungated twin (``kind="official"``: ``sink_wanda`` for
    ``gated_sink_wanda``, the official rule, every position down-weighted, tau NaN), then one row per tau
    (``kind="gated"``; tau = 0 is an ordinary point: every sink gated, no non-sink) with ``ppl``,
    ``ppl_se``, ``nll``, ``delta_nll`` (nats/token against the official twin; negative: better),
    ``se_paired`` (its paired Monte Carlo error, :func:`sap_core.evaluate.paired_se`; NaN without the
    per-draw estimates or without the twin's row) and ``z``; then the ``wanda`` and ``noised_wanda``
    rows (``kind="reference"``, tau NaN, no difference)."""
    if "tau" not in df.columns:
        raise SapError("This sweep has no tau column; run it again with this version (e.g. --sink-taus 0,0.05).")
    rows = df[df["pattern"] == pattern]
    if pattern == "unstructured":
        rows = rows[np.isclose(rows["sparsity"].astype(float), float(sparsity))]
    estimates = df.attrs.get("estimates") or {}
    cols = ["kind", "family", "method", "tau", "ppl", "ppl_se", "nll", "nll_se", "delta_nll", "se_paired", "z", "label"]
    out = []
    gated = rows[rows["method"].isin(GATED)]
    for family, group in gated.groupby("method", sort=True):
        twin = rows[rows["method"] == UNGATED_TWIN[family]]
        official = twin.iloc[0] if len(twin) else None
        if official is not None:
            out.append(_row("official", family, official, math.nan))
        for _, r in group.sort_values("tau").iterrows():
            out.append(_row("gated", family, r, float(r["tau"]), official, estimates))
    for ref in REFERENCES:
        for _, r in rows[rows["method"] == ref].iterrows():
            out.append(_row("reference", "", r, math.nan))
    return pd.DataFrame(out, columns=cols)


def reference_bands(table: pd.DataFrame, df: pd.DataFrame) -> pd.DataFrame:
    """The error band of each reference row of a :func:`tau_table` (``wanda``, ``noised_wanda``): its
    difference from the ungated twin of the first gated method (``against``; the baseline every gated row is
    paired with) and that difference's paired standard error, from the sweep ``df``'s per-draw estimates.
    Columns ``method``, ``ppl``, ``against``, ``delta_nll``, ``se_paired`` (NaN without the estimates or the
    twin). A gated point or twin inside ``ppl · exp(±2 se_paired)`` is within the noise of the reference."""
    estimates = df.attrs.get("estimates") or {}
    official = table[table["kind"] == "official"]
    twin = official.iloc[0] if len(official) else None
    out = []
    for _, r in table[table["kind"] == "reference"].iterrows():
        se = d = math.nan
        if twin is not None:
            d = float(r["nll"]) - float(twin["nll"])
            se = paired_se_if_known(estimates.get(str(r["label"])), estimates.get(str(twin["label"])))
        out.append(
            dict(method=r["method"], ppl=r["ppl"], against=None if twin is None else twin["method"], delta_nll=d, se_paired=se)
        )
    return pd.DataFrame(out, columns=["method", "ppl", "against", "delta_nll", "se_paired"])


def best_taus(table: pd.DataFrame, df: pd.DataFrame | None = None, threshold: float = 2.0) -> pd.DataFrame:
    """The lowest-perplexity tau of each gated method in a :func:`tau_table`, with its difference from
    the official ungated twin (``official``, ``official_ppl``, ``delta_nll``, ``se_paired``, ``z``),
    ``beats_official``: whether that difference is below ``-threshold`` paired standard errors (the
    lowest perplexity alone is no evidence: with differences inside the noise it is a coin toss; False
    without a paired error), and, given the sweep ``df`` (for the per-draw estimates), the difference
    from each reference: ``delta_<ref>`` and ``se_<ref>`` (paired)."""
    threshold = float(threshold)
    if not (math.isfinite(threshold) and threshold >= 0):
        raise SapError(f"The threshold is a number of standard errors >= 0 (got {threshold}), e.g. 2.")

    estimates = (df.attrs.get("estimates") or {}) if df is not None else {}
    gated = table[table["kind"] == "gated"]
    official = table[table["kind"] == "official"].set_index("family")
    refs = table[table["kind"] == "reference"].set_index("method")
    out = []
    for family, group in gated.groupby("family", sort=True):
        best = group.loc[group["nll"].idxmin()]
        row = dict(
            method=family,
            tau=best["tau"],
            ppl=best["ppl"],
            official=UNGATED_TWIN[family],
            official_ppl=float(official.loc[family, "ppl"]) if family in official.index else math.nan,
            delta_nll=best["delta_nll"],
            se_paired=best["se_paired"],
            z=best["z"],
            beats_official=bool(np.isfinite(best["z"]) and best["z"] < -threshold),
        )
        for ref in REFERENCES:
            if ref in refs.index:
                r = refs.loc[ref]
                row[f"delta_{ref}"] = float(best["nll"]) - float(r["nll"])
                row[f"se_{ref}"] = paired_se_if_known(estimates.get(str(best["label"])), estimates.get(str(r["label"])))
        out.append(row)
    return pd.DataFrame(out)


def best_tau_sentences(best: pd.DataFrame) -> list[str]:
    """One Markdown sentence per row of :func:`best_taus`: the best tau and its perplexity when it beats the
    official twin beyond the noise, else that none is marked best; then the paired difference from the twin
    and from each reference (:data:`REFERENCES`) the row has."""
    sentences = []
    for _, b in best.iterrows():
        diff = (
            f"Δnll = {b['delta_nll']:+.4f} ± {b['se_paired']:.4f} nats/token (paired SE, z = {b['z']:+.1f}) against "
            f"{b['official']} (official rule, no gate; {b['official_ppl']:.2f})"
        )
        if b["beats_official"]:
            line = f"**{b['method']}**: best tau = {b['tau']:g}, perplexity {b['ppl']:.2f}; {diff}"
        else:
            line = (
                f"**{b['method']}**: no tau beats {b['official']} beyond 2 paired standard errors, so none is marked best; "
                f"the lowest perplexity, {b['ppl']:.2f} at tau = {b['tau']:g}, is within the noise: {diff}"
            )
        for ref in REFERENCES:
            if f"delta_{ref}" in b and b[f"delta_{ref}"] == b[f"delta_{ref}"]:  # present and not NaN
                line += f"; against {ref} {b[f'delta_{ref}']:+.4f} ± {b[f'se_{ref}']:.4f}"
        sentences.append(line + ".")
    return sentences


def tau_sweep_spec(methods, sparsity: float, pattern: str, taus, sink: SinkSpec, calibration=None, eval=None):
    """The :class:`~sap_core.sweep.SweepSpec` of a "which tau?" run: the gated ``methods`` at every tau,
    each with its ungated twin (the official rule the errors are taken against), plus ``wanda`` and
    ``noised_wanda``, at one sparsity and pattern, without the dense row."""
    taus = tuple(sorted(set(sinks.parse_taus(taus, SapError))))
    if not taus:
        raise SapError("List at least one tau for the tau sweep, e.g. 0, 0.01, 0.05.")
    methods = tuple(methods)
    if not methods or any(m not in GATED for m in methods):
        raise SapError(f"Choose gated methods for a tau sweep ({', '.join(sorted(GATED))}); got {list(methods)}.")
    return SweepSpec(
        methods=REFERENCES + methods,
        sparsities=(float(sparsity),),
        patterns=(pattern,),
        sink=sink,
        sink_taus=taus,
        calibration=calibration,
        eval=eval if eval is not None else EvalSpec(),
        include_dense=False,
    )
