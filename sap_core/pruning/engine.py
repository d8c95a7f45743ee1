"""A pruning run, in the order the work happens: :func:`prune` validates the spec and checks it against
the model (before any forward pass), draws the calibration windows (and noises them), runs the
recorded passes that give the sink scores and weight statistics (:mod:`sap_core.pruning.scores`),
selects the masks (:mod:`sap_core.pruning.masks`, :mod:`sap_core.pruning.sparsegpt`) and returns a
:class:`~sap_core.pruning.variant.PrunedVariant`. What a method does is read from its row of
:data:`~sap_core.pruning.spec.METHOD_TABLE`, never from its name.

The dense model is never written to. Pruning reads the shared weights under ``handle.lock`` (so no
variant is swapped in while they are read) and computes new weight tensors.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import torch

from sap_core.errors import PruneSpecError, SapError
from sap_core.models import placement
from sap_core.progress import Progress, report
from sap_core.pruning import scores as sc
from sap_core.pruning.calibration import calibration_ids, tokenize
from sap_core.pruning.masks import select_mask
from sap_core.pruning.record import CalibrationRecord, record_calibration, scoring_spec
from sap_core.pruning.sparsegpt import Hessian, sparsegpt_prune_group
from sap_core.pruning.spec import CalibrationSpec, PruneSpec
from sap_core.pruning.structured import prune_structured
from sap_core.pruning.variant import PrunedVariant, fingerprint, param_names, target_linears
from sap_core.text import check_length

# --- the run ------------------------------------------------------------------------------------


def _check_against_model(handle, spec: PruneSpec) -> list[int] | None:
    """Model-dependent checks; returns the calibration token ids when the method needs them."""
    module = handle.module
    if not hasattr(module, "blocks"):
        raise PruneSpecError(f"{type(module).__name__} exposes no transformer .blocks; SinkScope cannot prune it.")
    placement.require_resident(module, "prune this model")
    linears = target_linears(module)
    if not linears:
        raise PruneSpecError("The model has no linear layers inside its blocks to prune.")
    nm = spec.nm
    if nm is not None:
        bad = sorted({f"{name} (in_features {lin.in_features})" for _, name, lin in linears if lin.in_features % nm[1]})
        if bad:
            raise PruneSpecError(
                f"Pattern {spec.pattern} needs every input dimension divisible by {nm[1]}, but "
                f"{', '.join(bad)} is not. Choose an M that divides it, or unstructured."
            )
    if not spec.needs_calibration:
        return None
    cal = spec.calibration
    check_length(handle, cal.seqlen, "The calibration seqlen", PruneSpecError)
    if spec.row.needs_noise:
        if handle.mask_id is None:
            raise PruneSpecError(
                f"{spec.method} corrupts calibration text with [MASK], but this model has no mask "
                "token. Use magnitude, wanda or sparsegpt."
            )
        try:
            spec.sink.resolve(len(module.blocks), handle.n_heads)
        except SapError as exc:
            raise PruneSpecError(f"Sink settings: {exc}") from exc
    return tokenize(handle, cal)


def prune(
    handle,
    spec: PruneSpec,
    calibration: CalibrationSpec | str | None = None,
    progress: Progress | None = None,
    cache: sc.CalibrationCache | None = None,
) -> PrunedVariant:
    """Prune ``handle``'s block linears as ``spec`` says; the dense model is left untouched.

    ``calibration`` overrides ``spec.calibration`` (a :class:`CalibrationSpec`, or a string: the
    calibration text). ``progress(done, total, message)`` is called per timestep of the
    calibration passes and per block; raising :class:`~sap_core.errors.Cancelled` in it stops the
    run (nothing to undo: the model was never modified). Every impossible setting raises
    :class:`PruneSpecError` before any forward pass. ``cache`` (a :class:`~sap_core.pruning.scores.CalibrationCache`)
    reuses the statistics of earlier runs that do not depend on sparsity, pattern or tau (sweeps).
    """
    if not isinstance(spec, PruneSpec):
        raise PruneSpecError(f"spec must be a PruneSpec (got {type(spec).__name__}).")
    if isinstance(calibration, str):
        spec = dataclasses.replace(spec, calibration=dataclasses.replace(spec.calibration, text=calibration))
    elif isinstance(calibration, CalibrationSpec):
        spec = dataclasses.replace(spec, calibration=calibration)
    elif calibration is not None:
        raise PruneSpecError(f"calibration must be a CalibrationSpec or a text (got {type(calibration).__name__}).")
    spec.validate()
    token_ids = _check_against_model(handle, spec)
    if spec.row.structure != "weights":  # whole channels / heads cut out: a smaller model
        return prune_structured(handle, spec, token_ids, progress)

    t_start = time.perf_counter()
    n_blocks = len(handle.module.blocks)
    cal = spec.calibration
    n_noised = cal.nsamples * len(cal.timesteps) if spec.row.needs_noise else 0
    total = n_noised + n_blocks
    state = {"done": 0}

    def tick(units: int, message: str) -> None:
        state["done"] += units
        report(progress, state["done"], total, message)

    report(progress, 0, total, f"{spec.label}: starting")
    with handle.lock:  # the only moment the shared model is looked at: snapshot its block weights
        taps = sc.make_taps(handle)
        names = param_names(handle.module)
        modules = [(i, name, names[id(lin.weight)]) for i, name, lin in target_linears(handle.module)]
        dense = fingerprint(handle.module)
    with torch.no_grad():
        new, record, passes, t_cal = _run(handle, taps, spec, token_ids, tick, cache)
    weights = {pname: new[(i, name)] for i, name, pname in modules}
    seconds = time.perf_counter() - t_start
    timings = {"calibration": t_cal, "pruning": seconds - t_cal}  # the block-sequential pass is pruning
    return PrunedVariant(spec, weights, modules, seconds, timings, passes, record, handle.source, dense_fingerprint=dense)


def shares_calibration(spec: PruneSpec) -> bool:
    """Whether ``spec``'s run reads what a :class:`~sap_core.pruning.scores.CalibrationCache` keeps: the
    calibration record of the noised passes (and, for the noised Wanda family, its column norms); the
    structured methods calibrate on their own (:mod:`sap_core.pruning.structured`)."""
    return spec.row.structure == "weights" and spec.row.needs_noise


def calibration_key(spec: PruneSpec) -> tuple:
    """What the cached calibration of ``spec`` depends on: (calibration, the sink scoring settings), the
    cache's own key without the model (:meth:`~sap_core.pruning.scores.CalibrationCache.export`)."""
    return (spec.calibration, scoring_spec(spec.sink))


def calibrate(handle, specs: list[PruneSpec], cache: sc.CalibrationCache) -> None:
    """Fill ``cache`` with the sparsity-independent calibration of ``specs`` (those that
    :func:`shares_calibration`), exactly as the first :func:`prune` of each would compute it, so the
    pruning runs that follow only cut masks. Runs the same checks as :func:`prune` first."""
    specs = [s for s in specs if shares_calibration(s)]
    for spec in specs:
        spec.validate()
        cache.plan(handle, spec)
    taps = None
    for spec in specs:
        token_ids = _check_against_model(handle, spec)
        if taps is None:
            with handle.lock:
                taps = sc.make_taps(handle)
        with torch.no_grad():
            _calibrate(handle, taps, spec, token_ids, None, cache)


def _run(handle, taps, spec: PruneSpec, token_ids, tick, cache=None):
    """The run as ``spec.row`` says; returns ``({(block, name): weight}, record, passes, calibration seconds)``.
    Calibration is the noised recorded passes (:func:`~sap_core.pruning.record.record_calibration`) only;
    the block-sequential pass is pruning."""
    row, cal = spec.row, spec.calibration
    if not row.statistic.needs_inputs:
        return _data_free(taps, spec, tick), None, 0, 0.0
    t0 = time.perf_counter()
    record, stats = _calibrate(handle, taps, spec, token_ids, tick, cache)
    t_cal = 0.0 if record is None else time.perf_counter() - t0  # no noised passes: no calibration time
    passes = 0 if record is None else record.passes
    clean = calibration_ids(token_ids, cal)[0] if record is None else record.ids
    if row.reads_noised_norms:  # Wanda statistics of the dense model on noised inputs, weighted per step
        new = _prune_noised_norms(taps, stats.norms, spec, tick)
        token_weights = stats.token_weights
    else:
        token_weights = record.mean_factors(row.factors, spec.sink.tau) if row.sink_weighting == "mean" else None
        new = _sequential(handle, taps, spec, clean, token_weights, tick)
        passes += 2 * int(np.ceil(cal.nsamples / cal.batch_size))  # block-sequential: stats pass + pruned pass
    return new, CalibrationRecord.of(spec, clean, record, token_weights), passes, t_cal


def _calibrate(handle, taps, spec: PruneSpec, token_ids, tick, cache):
    """The calibration stage of a noised row: ``(SinkRecord, NoisedStats or None)``; ``(None, None)`` otherwise."""
    row, cal, sink = spec.row, spec.calibration, spec.sink
    if not row.needs_noise:
        return None, None
    if row.sequential:
        if cache is None:
            return record_calibration(handle, cal, sink, token_ids, tick, taps), None
        return cache.record(handle, cal, sink, token_ids, tick, taps), None
    if cache is None:
        record, (stats,) = sc.noised_wanda_stats(handle, cal, sink, token_ids, [sc.weighting(row.factors, sink.tau)], tick, taps)
        return record, stats
    return cache.noised_wanda(handle, cal, sink, token_ids, row.factors, tick, taps)


def _data_free(taps, spec: PruneSpec, tick) -> dict:
    """A statistic without inputs (magnitude): each weight scored on its own."""
    stat, new = spec.row.statistic, {}
    for i, tap in enumerate(taps):
        for name, lin in tap.linears.items():
            new[(i, name)] = _apply_mask(lin.weight, stat.weight_scores(lin.weight, None), spec.sparsity, spec.nm)
        tick(1, f"block {i + 1}/{len(taps)} pruned")
    return new


def _prune_noised_norms(taps, norms, spec: PruneSpec, tick) -> dict:
    """Every block scored from the column norms of the dense model on the noised windows."""
    stat, new = spec.row.statistic, {}
    for i, tap in enumerate(taps):
        for names, block_norms in norms[i].items():
            for name in names:
                W = tap.weight(name)
                new[(i, name)] = _apply_mask(W, stat.weight_scores(W, block_norms), spec.sparsity, spec.nm)
        tick(1, f"block {i + 1}/{len(taps)} pruned")
    return new


def _sequential(handle, taps, spec: PruneSpec, clean, token_weights, tick) -> dict:
    """The block-sequential sweep of the row's statistic, inputs scaled by ``token_weights``: a scoring
    statistic masks each weight by its score from the column norms, a reconstructing one (SparseGPT) solves
    the layer again from its Hessian."""
    stat, sparsity, nm = spec.row.statistic, spec.sparsity, spec.nm
    if not stat.reconstructs:

        def make_stat(cols, device):
            return sc.ColumnSquares(cols, device)

        def prune_group(i, names, weights, acc):
            norms = acc.norm()
            return [_apply_mask(W, stat.weight_scores(W, norms), sparsity, nm) for W in weights]
    else:

        def make_stat(cols, device):
            return Hessian(cols, device)

        def prune_group(i, names, weights, acc):
            if sparsity == 0 and nm is None:
                return [W.detach() for W in weights]
            return sparsegpt_prune_group(
                weights, acc.matrix(), sparsity, nm, spec.blocksize, spec.percdamp, spec.sparsegpt_selection
            )

    return sc.sequential_sweep(handle, clean, make_stat, prune_group, spec.calibration.batch_size, token_weights, tick, taps)


def _apply_mask(W: torch.Tensor, score: torch.Tensor, sparsity: float, nm) -> torch.Tensor:
    """A new tensor: ``W`` with the lowest-scoring weights of each row (or N:M group) set to zero."""
    if sparsity == 0 and nm is None:
        return W.detach()
    return W.masked_fill(select_mask(score, sparsity, nm).to(W.device), 0)
