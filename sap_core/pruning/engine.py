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
from sap_core.pruning.calibration import CalibrationRecord, calibration_ids, noised_ids, tokenize
from sap_core.pruning.masks import select_mask
from sap_core.pruning.sparsegpt import Hessian, sparsegpt_prune_group
from sap_core.pruning.spec import CalibrationSpec, PruneSpec
from sap_core.pruning.variant import PrunedVariant, fingerprint, param_names, target_linears

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
    from sap_core.evaluate import check_length

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
    timings = {"calibration": t_cal, "pruning": seconds - t_cal}
    return PrunedVariant(spec, weights, modules, seconds, timings, passes, record, handle.source, dense_fingerprint=dense)


def shares_calibration(spec: PruneSpec) -> bool:
    """Whether ``spec``'s run reads statistics a :class:`~sap_core.pruning.scores.CalibrationCache` keeps
    (the noised Wanda family's column norms, the sink SparseGPT family's attention mass)."""
    row = spec.row
    return row.statistic != "magnitude" and (not row.sequential or row.sink_weighting == "mean")


def calibration_key(spec: PruneSpec) -> tuple:
    """What the cached statistics of ``spec`` depend on: (calibration, sink layers, sink heads)."""
    return (spec.calibration, spec.sink.layers, spec.sink.heads)


def calibrate(handle, specs: list[PruneSpec], cache: sc.CalibrationCache) -> None:
    """Fill ``cache`` with the sparsity-independent statistics of ``specs`` (those that
    :func:`shares_calibration`), exactly as the first :func:`prune` of each would compute them, so the
    pruning runs that follow only cut masks. Runs the same checks as :func:`prune` first."""
    specs = [s for s in specs if shares_calibration(s)]
    for spec in specs:
        spec.validate()
        cache.plan(handle, spec)
    taps = None
    for spec in specs:
        token_ids = _check_against_model(handle, spec)
        cal = spec.calibration
        clean, generator = calibration_ids(token_ids, cal)
        noised = noised_ids(clean, cal, handle.mask_id, generator)
        taps = taps if taps is not None else sc.make_taps(handle)
        with torch.no_grad():
            if not spec.row.sequential:
                cache.noised_wanda(handle, noised, cal, spec.sink, spec.row.factors, None, taps)
            else:
                cache.mass(handle, noised, cal, spec.sink, None, taps)


def _run(handle, taps, spec: PruneSpec, token_ids, tick, cache=None):
    """The run as ``spec.row`` says; returns ``({(block, name): weight}, record, passes, calibration seconds)``."""
    row, nm, sparsity = spec.row, spec.nm, spec.sparsity
    cal = spec.calibration
    if row.statistic == "magnitude":
        new = {}
        for i, tap in enumerate(taps):
            for name, lin in tap.linears.items():
                new[(i, name)] = _apply_mask(lin.weight, lin.weight.abs().float(), sparsity, nm)
            tick(1, f"block {i + 1}/{len(taps)} pruned")
        return new, None, 0, 0.0

    clean, generator = calibration_ids(token_ids, cal)
    record = CalibrationRecord(ids=clean.numpy(), timesteps=cal.timesteps if row.needs_noise else [])
    t0 = time.perf_counter()

    if not row.sequential:  # Wanda statistics of the dense model on noised inputs, weighted per step
        noised = noised_ids(clean, cal, handle.mask_id, generator)
        if cache is None:
            stats = sc.noised_wanda_stats(handle, noised, spec.sink, row.factors, cal.batch_size, tick, taps)
        else:
            stats = cache.noised_wanda(handle, noised, cal, spec.sink, row.factors, tick, taps)
        t_cal = time.perf_counter() - t0
        _describe(record, handle, spec, noised, stats.mass, stats.scored)
        record.token_weights = stats.token_weights
        new = {}
        for i, tap in enumerate(taps):
            for names, norms in stats.norms[i].items():
                for name in names:
                    W = tap.weight(name)
                    new[(i, name)] = _apply_mask(W, W.abs().float() * norms.to(W.device)[None, :], sparsity, nm)
            tick(1, f"block {i + 1}/{len(taps)} pruned")
        return new, record, stats.passes, t_cal

    token_weights = None
    passes = 0
    if row.sink_weighting == "mean":  # one factor per token: 1 − (g·) mean_t s_t(j) from noised passes
        noised = noised_ids(clean, cal, handle.mask_id, generator)
        if cache is None:
            mass = sc.sink_mass(handle, noised, spec.sink, cal.batch_size, tick, taps)
            passes += int(np.ceil(len(cal.timesteps) / cal.batch_size)) * cal.nsamples
        else:
            mass, run = cache.mass(handle, noised, cal, spec.sink, tick, taps)
            passes += run
        scored = [sc.score_sample(m, spec.sink, handle.causal) for m in mass]  # once per sample
        token_weights = np.stack([sc.mean_weights(s, spec.sink, row.factors) for s in scored])
        _describe(record, handle, spec, noised, mass, (np.stack([s for s, _ in scored]), np.stack([f for _, f in scored])))
        record.token_weights = token_weights

    if row.statistic == "wanda":

        def make_stat(cols, device):
            return sc.ColumnSquares(cols, device)

        def prune_group(i, names, weights, stat):
            norms = stat.norm()
            return [_apply_mask(W, W.abs().float() * norms.to(W.device)[None, :], sparsity, nm) for W in weights]
    else:  # hessian

        def make_stat(cols, device):
            return Hessian(cols, device)

        def prune_group(i, names, weights, stat):
            if sparsity == 0 and nm is None:
                return [W.detach() for W in weights]
            return sparsegpt_prune_group(
                weights, stat.matrix(), sparsity, nm, spec.blocksize, spec.percdamp, spec.sparsegpt_selection
            )

    new = sc.sequential_sweep(handle, clean, make_stat, prune_group, cal.batch_size, token_weights, tick, taps)
    passes += 2 * int(np.ceil(cal.nsamples / cal.batch_size))  # block-sequential: stats pass + pruned pass
    return new, record, passes, time.perf_counter() - t0


def _apply_mask(W: torch.Tensor, score: torch.Tensor, sparsity: float, nm) -> torch.Tensor:
    """A new tensor: ``W`` with the lowest-scoring weights of each row (or N:M group) set to zero."""
    if sparsity == 0 and nm is None:
        return W.detach()
    return W.masked_fill(select_mask(score, sparsity, nm).to(W.device), 0)


def _describe(
    record: CalibrationRecord,
    handle,
    spec: PruneSpec,
    noised: torch.Tensor,
    mass: np.ndarray,
    scored: tuple[np.ndarray, np.ndarray],
) -> None:
    d = sc.describe_sinks(mass, spec.sink, handle.causal, scored)
    record.noised = noised.numpy()
    record.mass = d.mass
    record.sink_scores = d.scores
    record.variance = d.variance
    record.labels = d.labels
    factors = spec.row.factors  # explicit: the variance gate for a gated row, every position (official) or none
    record.gate = d.gate if factors == "gated" else np.full(d.gate.shape, factors == "official")
