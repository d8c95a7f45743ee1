"""Sparsity sweeps: methods × sparsities × patterns, each pruned and scored by perplexity.

:func:`run_sweep` prunes the model once per (method, pattern, sparsity) with
:func:`sap_core.pruning.prune`, evaluates the variant inside ``variant.applied(handle)`` (so the
shared dense model is restored after every job, also on cancellation) and returns a
:class:`pandas.DataFrame`, one row per job, with the columns of :data:`COLUMNS`:

* ``method``, ``sparsity``, ``pattern``: the job (``method`` is the bare method name, e.g.
  ``gated_sink_wanda``; a gated method's variance gate is the ``tau`` column, and both are in the label;
  :func:`series` names a method at one tau, e.g. for a plot's lines);
* ``label``: the run's :attr:`PruneSpec.label <sap_core.pruning.PruneSpec.label>` (``wanda 50%``,
  ``gated_sink_wanda 2:4, tau=0.05``), after a custom :attr:`MethodSetting.label` and a colon when
  there is one; unique in a sweep, the key of the per-draw estimates;
* ``ppl``, ``ppl_se``: perplexity and its standard error (masked-diffusion Monte Carlo perplexity for a
  DLM, exact next-token perplexity for a causal model; see :mod:`sap_core.evaluate`);
* ``prune_seconds``: wall time of the pruning call (calibration included);
* ``nll``, ``nll_se``: mean negative log-likelihood per token (nats) and its standard error;
* ``achieved_sparsity``: the fraction of zeros in the pruned linear layers
  (:attr:`~sap_core.pruning.PrunedVariant.achieved_sparsity`; ``sparsity`` is the target);
* ``eval_seconds``: wall time of the perplexity evaluation;
* ``tau``: the variance gate of a gated method's row (NaN for the other methods).

Calibration is reused across the jobs (:class:`sap_core.pruning.scores.CalibrationCache`): the noised
Wanda family's statistics are computed once per (calibration, sink layers and heads), for sink_wanda,
noised_wanda and gated_sink_wanda at every tau in the same forward passes, and the sink SparseGPT
family's attention mass once; the masks are then cut per sparsity and pattern. Block-sequential
statistics still run per job. ``prune_seconds`` is what each job cost: the job that computed the shared
statistics carries their cost, later jobs only their own work. ``run_sweep(...,
executor=SerialExecutor(reuse_calibration=False))`` recalibrates every job from scratch (same rows;
``bench/sweep_cost.py`` compares the two).

The grid is a list of :class:`SweepJob` (:func:`sweep_jobs`), each run by :func:`run_job`; ``run_sweep``
hands them to an :class:`Executor`: :class:`SerialExecutor` runs them here one after the other (the default
and the reference), :class:`sap_core.distributed.RayExecutor` on Ray workers (same rows). It skips the jobs
already done (``done=``, a resumed sweep) and returns the rows in job order whatever order they finished in.

The dense model is the first row (``method="dense"``, ``sparsity=0``, ``pattern="dense"``) unless
``include_dense=False``. Every evaluation uses the same :class:`EvalSpec` and seed, so all rows are
scored on the same text windows and the same masking draws (common random numbers). ``ppl_se`` is the
Monte Carlo error of one row given those windows (see :mod:`sap_core.evaluate`); it does not include
the text-sampling error nor the variability of calibration. :func:`method_differences` sets methods
against their baselines: with the per-(window, draw) estimates each evaluation records
(``df.attrs["estimates"]``) the error of a difference is computed draw by draw (paired, common random
numbers, :func:`~sap_core.evaluate.paired_se`); ``se_indep = sqrt(nll_se_a**2 + nll_se_b**2)``, which treats the two
errors as independent, is the conservative fallback.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import pandas as pd

from sap_core.errors import SweepSpecError
from sap_core.evaluate import DENSE, EvalSpec, Metric, Perplexity, paired_se_if_known, score_all
from sap_core.files import atomic_write, atomic_write_text, check_output_file, is_special, output_target, signals_held
from sap_core.models import ModelHandle, portable_source
from sap_core.progress import Progress, report
from sap_core.pruning import METHODS, PruneSpec, parse_pattern, prune
from sap_core.pruning.scores import CalibrationCache
from sap_core.pruning.spec import GATED, STRUCTURED, UNGATED_TWIN, check_sparsity
from sap_core.sinks import SinkSpec, parse_taus
from sap_core.text import check_length

COLUMNS = [
    "method",
    "sparsity",
    "pattern",
    "ppl",
    "ppl_se",
    "prune_seconds",
    "nll",
    "nll_se",
    "achieved_sparsity",
    "eval_seconds",
    "label",
    "tau",
]


@dataclass(frozen=True)
class MethodSetting:
    """A pruning method plus settings that differ from its defaults, shown as ``label`` in the sweep.

    ``options`` are extra :class:`~sap_core.pruning.PruneSpec` fields; ``sink`` replaces the sweep's
    :class:`~sap_core.sinks.SinkSpec` for this method (e.g. a variance gate).
    """

    method: str
    label: str | None = None
    sink: Any = None
    options: tuple[tuple[str, Any], ...] = ()

    @property
    def name(self) -> str:
        """The ``method`` column of this setting's rows: the bare method name (tau is a column of its own)."""
        return self.method

    @property
    def key(self) -> tuple:
        """What tells two settings of a sweep apart: the label, else the method and, for a gated method, its tau."""
        if self.label:
            return (self.label,)
        return (self.method, float(self.sink.tau)) if self.method in GATED and self.sink is not None else (self.method,)


@dataclass(frozen=True)
class SweepSpec:
    """The grid: every method × pattern × sparsity, plus the dense reference.

    ``heads``: the fraction of each block's attention heads the structured methods (:data:`~sap_core.pruning.spec.STRUCTURED`)
    also remove, beside their MLP channels (a :class:`MethodSetting` with its own ``heads`` option keeps it).

    ``sink_taus``: a tau sweep; each gated method named by its bare name runs once per tau (the sweep's
    ``sink`` with that tau, its rows' ``tau`` column), preceded by its ungated twin
    (:data:`~sap_core.pruning.spec.UNGATED_TWIN`: ``sink_wanda``, the official rule, the reference every
    tau is compared with) unless the methods list it already; :mod:`sap_core.tau` reads the result.

    ``eval``: the perplexity every row is scored with (the columns of :data:`COLUMNS` and the per-draw
    estimates); ``metrics``: further :class:`~sap_core.evaluate.Metric` objects each row is also scored with,
    their columns after :data:`COLUMNS` (e.g. :class:`sap_core.lmeval.accuracy.TaskAccuracy`: ``acc``,
    ``acc_se``, ``acc_task``).
    """

    methods: tuple[str | MethodSetting, ...]
    sparsities: tuple[float, ...]
    patterns: tuple[str, ...] = ("unstructured",)
    sink: Any = None  # SinkSpec for the sink-aware methods; None: the pruning default
    calibration: Any = None  # CalibrationSpec; None: the pruning default
    eval: EvalSpec = field(default_factory=EvalSpec)
    metrics: tuple[Metric, ...] = ()  # scored beside the perplexity, in this order
    include_dense: bool = True
    sink_taus: tuple[float, ...] = ()  # taus for the gated methods (one row each); (): the sink spec's tau
    heads: float = 0.0  # fraction of attention heads every structured row also removes (PruneSpec.heads)

    def __post_init__(self) -> None:
        taus = parse_taus(self.sink_taus, SweepSpecError)
        object.__setattr__(self, "sink_taus", taus)
        if len(set(taus)) != len(taus):
            raise SweepSpecError(f"sink_taus lists a tau twice ({list(taus)}); list each once.")

    @property
    def settings(self) -> list[MethodSetting]:
        """Every method as a :class:`MethodSetting`; a bare gated method name carries the sweep's sink
        spec (its rows' ``tau``); a tau sweep adds the ungated twins it compares with."""
        listed = {m.key[0] if isinstance(m, MethodSetting) else str(m) for m in self.methods}
        out = []
        for m in self.methods:
            if isinstance(m, MethodSetting):
                out.append(m)
            elif str(m) in GATED and self.sink_taus:
                if UNGATED_TWIN[str(m)] not in listed:
                    out.append(MethodSetting(UNGATED_TWIN[str(m)]))
                out.extend(MethodSetting(str(m), sink=replace(self._sink, tau=t)) for t in self.sink_taus)
            else:
                out.append(MethodSetting(str(m), sink=self.sink if str(m) in GATED else None))
        return out

    @property
    def scored(self) -> tuple[Metric, ...]:
        """Every metric a row is scored with: the perplexity of ``eval`` first, then ``metrics``."""
        return (Perplexity(self.eval), *self.metrics)

    @property
    def _sink(self):
        return self.sink if self.sink is not None else SinkSpec()

    def tau_of(self, setting: MethodSetting) -> float:
        """The variance gate a gated setting prunes with (NaN for a method without a gate)."""
        if setting.method not in GATED:
            return math.nan
        return float((setting.sink if setting.sink is not None else self._sink).tau)

    def label_of(self, setting: MethodSetting, pattern: str, sparsity: float) -> str:
        """The ``label`` of a job's row: its :attr:`PruneSpec.label <sap_core.pruning.PruneSpec.label>`, after
        ``setting.label:`` for a setting with a label of its own."""
        label = _prune_spec(setting, pattern, sparsity, self).label
        return f"{setting.label}: {label}" if setting.label else label

    @property
    def jobs(self) -> list[tuple[MethodSetting, str, float]]:
        """(method setting, pattern, sparsity) per pruning run. An N:M pattern fixes the sparsity at
        ``1 - N/M``, so it runs once per method (at that sparsity) whatever ``sparsities`` holds."""
        out = []
        for m in self.settings:
            for p in self.patterns:
                nm = parse_pattern(p)
                if nm is None:
                    out.extend((m, p, float(s)) for s in self.sparsities)
                else:
                    out.append((m, p, 1.0 - nm[0] / nm[1]))
        return out

    def validate(self) -> None:
        if not self.methods or not self.sparsities or not self.patterns:
            raise SweepSpecError("A sweep needs at least one method, one sparsity and one pattern.")
        unknown = [m.method for m in self.settings if m.method not in METHODS]
        if unknown:
            raise SweepSpecError(f"Unknown pruning method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}.")
        keys = [m.key for m in self.settings]
        if len(set(keys)) != len(keys):
            raise SweepSpecError(f"Method labels must be unique (got {[' '.join(map(str, k)) for k in keys]}).")
        if self.sink_taus and not any(str(m) in GATED for m in self.methods if not isinstance(m, MethodSetting)):
            raise SweepSpecError(
                "sink_taus applies to the gated methods only: add gated_sink_wanda or "
                "gated_sink_sparsegpt to the methods, or drop the taus."
            )
        if isinstance(self.heads, bool) or not isinstance(self.heads, (int, float)) or not 0.0 <= self.heads < 1.0:
            raise SweepSpecError(
                f"heads must be a fraction in [0, 1) (got {self.heads!r}): the share of attention heads removed."
            )
        if self.heads and not any(m.method in STRUCTURED for m in self.settings):
            raise SweepSpecError(
                f"heads={self.heads} removes attention heads, which only the structured methods do; add one of "
                f"{', '.join(sorted(STRUCTURED))} to the methods, or drop heads."
            )
        for s in self.sparsities:
            check_sparsity(s, SweepSpecError)
        for p in self.patterns:
            parse_pattern(p)
        labels = [self.label_of(m, p, s) for m, p, s in self.jobs]
        twice = sorted({label for label in labels if labels.count(label) > 1})
        if twice:
            raise SweepSpecError(
                f"Two runs of the sweep would be the same run ({', '.join(twice)}); list each sparsity and pattern once."
            )
        names = [m.name for m in self.scored]
        if len(set(names)) != len(names):
            raise SweepSpecError(f"A sweep scores each metric once (got {', '.join(names)}); list each metric once.")
        for metric in self.scored:
            metric.validate()


def _prune_spec(setting: MethodSetting, pattern: str, sparsity: float, spec: SweepSpec):
    kwargs: dict[str, Any] = dict(method=setting.method, sparsity=sparsity, pattern=pattern)
    sink = setting.sink if setting.sink is not None else spec.sink
    if sink is not None:
        kwargs["sink"] = sink
    if spec.calibration is not None:
        kwargs["calibration"] = spec.calibration
    if spec.heads and setting.method in STRUCTURED:
        kwargs["heads"] = spec.heads
    kwargs.update(dict(setting.options))
    return PruneSpec(**kwargs)


@dataclass(frozen=True)
class SweepJob:
    """One row of a sweep as a unit of work: ``index`` is its place among the rows (the dense reference
    first), ``label`` its row's label (unique in the sweep), ``prune`` its pruning run (None: dense)."""

    index: int
    label: str
    setting: MethodSetting | None
    pattern: str
    sparsity: float
    prune: PruneSpec | None


def sweep_jobs(spec: SweepSpec) -> list[SweepJob]:
    """Every row of ``spec`` as a :class:`SweepJob`, in row order; each PruneSpec is validated here,
    before any work starts, so a bad combination fails fast."""
    jobs = [SweepJob(0, DENSE, None, DENSE, 0.0, None)] if spec.include_dense else []
    for setting, pattern, sparsity in spec.jobs:
        ps = _prune_spec(setting, pattern, sparsity, spec)
        ps.validate()
        jobs.append(SweepJob(len(jobs), spec.label_of(setting, pattern, sparsity), setting, pattern, sparsity, ps))
    return jobs


def run_job(
    handle: ModelHandle,
    spec: SweepSpec,
    job: SweepJob,
    cache: CalibrationCache | None = None,
    progress: Callable[[str], Progress | None] = lambda phase: None,
) -> tuple[dict, np.ndarray | None]:
    """Prune (unless dense) and score one job; returns its row and its per-draw estimates.
    ``progress(phase)`` gives the callback of the ``"prune"`` and ``"evaluate"`` phases."""
    if job.prune is None:
        with handle.lock:
            score = score_all(handle, spec.scored, progress("evaluate"))
        prune_seconds, achieved, method, tau = 0.0, 0.0, DENSE, math.nan
    else:
        t0 = time.perf_counter()
        variant = prune(handle, job.prune, progress=progress("prune"), cache=cache)
        prune_seconds = float(getattr(variant, "seconds", None) or (time.perf_counter() - t0))
        with variant.applied(handle):
            score = score_all(handle, spec.scored, progress("evaluate"))
        achieved, method, tau = variant.achieved_sparsity, job.setting.name, spec.tau_of(job.setting)
    row = dict(
        method=method,
        sparsity=job.sparsity,
        pattern=job.pattern,
        prune_seconds=prune_seconds,
        achieved_sparsity=achieved,
        label=job.label,
        tau=tau,
    )
    row.update(score.columns)
    return {c: row[c] for c in dict.fromkeys([*COLUMNS, *row])}, score.estimates  # COLUMNS' order, then the metrics'


def sweep_settings(model: str, spec: SweepSpec) -> dict[str, str]:
    """What a resumed sweep must share with the rows it keeps, besides their labels: the model (a directory as its
    absolute path) and each sweep-wide setting that changes a row's numbers, as its repr. Saved with the rows'
    per-draw estimates (:func:`save_sweep`); :func:`run_sweep` refuses ``done`` rows saved under other settings.
    (A :class:`MethodSetting`'s own options are not compared: its label names them.)"""
    return {
        "model": portable_source(str(model)),
        "calibration": repr(spec.calibration),
        "evaluation": repr(spec.eval),
        "metrics": repr(spec.metrics),
        "sink": repr(spec.sink),
        "heads": repr(spec.heads),
    }


Finished = Callable[[dict, np.ndarray | None], None]  # called with each job's row and per-draw estimates as it finishes


@runtime_checkable
class Executor(Protocol):
    """How :func:`run_sweep` runs a sweep's jobs. ``run`` runs every job of ``jobs`` (:class:`SweepJob`, in job
    order) on ``handle``'s model as :func:`run_job` does (the same rows) and calls ``finished(row, estimates)``
    once per job as it finishes, in any order; a job that fails alone may give a row of its identity and an
    ``error`` column with estimates None. ``progress`` (None: silent) reports across the run; a
    :class:`~sap_core.errors.Cancelled` raised from it stops the run with the dense weights restored.
    A new executor is a class with this method (:class:`SerialExecutor`, :class:`sap_core.distributed.RayExecutor`)."""

    def run(
        self, handle: ModelHandle, spec: SweepSpec, jobs: list[SweepJob], progress: Progress | None, finished: Finished
    ) -> None: ...


def run_sweep(
    handle: ModelHandle,
    spec: SweepSpec,
    progress: Progress | None = None,
    *,
    on_row: Callable[[dict], None] | None = None,
    on_result: Callable[[dict, np.ndarray | None], None] | None = None,
    executor: Executor | None = None,
    done: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Prune and score every job of ``spec``; one DataFrame row per job (see the module docstring).

    ``progress(done, total, message)`` runs across the whole sweep (``total`` is fixed up front: 100
    units per pruning call and per evaluation). Raising :class:`~sap_core.errors.Cancelled` from it
    stops the sweep with the dense weights restored. ``on_row(row)`` and ``on_result(row, estimates)``
    are called with each finished row, in the order the rows finish.

    ``executor``: an :class:`Executor`; None is ``SerialExecutor()`` (the jobs here, one after the other:
    the reference); a :class:`sap_core.distributed.RayExecutor` spreads them over Ray workers (same rows).
    ``done``: rows of an interrupted run of the same sweep (:func:`load_sweep` of its partial CSV):
    their jobs are skipped and their rows (and per-draw estimates) kept, unless they were saved under other
    :func:`sweep_settings` (a :class:`SweepSpecError`). Rows come back in job order whatever order they finish
    in; ``df.attrs["settings"]`` holds this sweep's settings.
    """
    executor = SerialExecutor() if executor is None else executor
    if not isinstance(executor, Executor):
        raise SweepSpecError(f"executor={executor!r} is not an executor: pass SerialExecutor() or RayExecutor(...).")
    spec.validate()
    check_length(handle, spec.eval.seqlen, "The evaluation seqlen", SweepSpecError)
    if spec.calibration is not None:
        check_length(handle, spec.calibration.seqlen, "The calibration seqlen", SweepSpecError)
    jobs = sweep_jobs(spec)
    results: dict[str, dict] = {}
    estimates: dict[str, np.ndarray] = {}
    settings = sweep_settings(handle.source, spec)
    if done is not None:
        _check_settings(done.attrs.get("settings"), settings)
        _adopt_done(done, jobs, results, estimates)
    todo = [j for j in jobs if j.label not in results]

    def finished(row: dict, est: np.ndarray | None) -> None:
        results[row["label"]] = row
        if est is not None:
            estimates[row["label"]] = est
        if on_row is not None:
            on_row(row)
        if on_result is not None:
            on_result(row, est)

    executor.run(handle, spec, todo, progress, finished)
    df = _frame([results[j.label] for j in jobs if j.label in results])
    df.attrs["estimates"] = {j.label: estimates[j.label] for j in jobs if j.label in estimates}
    df.attrs["settings"] = settings
    return df


def _check_settings(saved: dict | None, settings: dict) -> None:
    """Refuse rows to resume that were computed under other settings (None: saved without any; nothing to compare)."""
    if saved is None:
        return
    changed = [k for k in settings if saved.get(k) != settings[k]]
    if changed:
        k = changed[0]
        raise SweepSpecError(
            f"The rows to resume were computed with another {', '.join(changed)} ({k}: {saved.get(k)} then, "
            f"{settings[k]} now). Resume with the same settings, or start afresh (another --out, or delete the partial CSV)."
        )


def _adopt_done(done: pd.DataFrame, jobs: list[SweepJob], results: dict, estimates: dict) -> None:
    """Take the finished rows of ``done`` (rows that hold an error are run again)."""
    labels = {j.label for j in jobs}
    failed = done["error"].fillna("").astype(str) != "" if "error" in done.columns else pd.Series(False, index=done.index)
    foreign = sorted(set(done["label"].astype(str)) - labels)
    if foreign:
        raise SweepSpecError(
            f"The rows to resume are from another sweep: {', '.join(foreign[:3])} is not a run of this one. "
            "Resume with the same settings, or start afresh (another --out, or delete the partial CSV)."
        )
    saved = done.attrs.get("estimates") or {}
    for record, bad in zip(done.drop(columns=["error"], errors="ignore").to_dict("records"), failed):
        if bad:
            continue
        results[str(record["label"])] = {c: record.get(c, math.nan) for c in dict.fromkeys([*COLUMNS, *record])}
        if str(record["label"]) in saved:
            estimates[str(record["label"])] = saved[str(record["label"])]


@dataclass(frozen=True)
class SerialExecutor:
    """The reference :class:`Executor`: the jobs in this process, one after the other, in job order, sharing one
    :class:`~sap_core.pruning.scores.CalibrationCache` (``reuse_calibration=False``: every job recalibrates from
    scratch; same rows)."""

    reuse_calibration: bool = True

    def run(
        self, handle: ModelHandle, spec: SweepSpec, jobs: list[SweepJob], progress: Progress | None, finished: Finished
    ) -> None:
        cache = CalibrationCache() if self.reuse_calibration else None
        if cache is not None:
            for job in jobs:
                if job.prune is not None:
                    cache.plan(handle, job.prune)
        unit = 100
        starts, total = [], 0
        for job in jobs:
            starts.append(total)
            total += unit * (1 if job.prune is None else 2)

        def sub(label: str, start: int) -> Progress:
            def inner(done: int, sub_total: int, message: str) -> None:
                frac = min(max(done / sub_total, 0.0), 1.0) if sub_total else 1.0
                report(progress, start + int(round(frac * unit)), total, f"{label}: {message}" if message else label)

            return inner

        report(progress, 0, total, "sweep")
        for job, start in zip(jobs, starts):

            def phase(name: str, job=job, start=start) -> Progress:
                return sub(f"{job.label}: {name}", start + (unit if name == "evaluate" and job.prune is not None else 0))

            row, est = run_job(handle, spec, job, cache, phase)
            finished(row, est)
            report(progress, start + unit * (1 if job.prune is None else 2), total, f"{job.label} done")


def _frame(rows: Sequence[dict]) -> pd.DataFrame:
    """The rows as a sweep DataFrame: :data:`COLUMNS`, then the columns of the sweep's further metrics
    (:attr:`SweepSpec.metrics`, e.g. ``acc``, ``acc_se``, ``acc_task``) in the order the rows give them; an
    ``error`` column (the message of a job that failed on its own input, empty for the others) only when some
    row has one (a distributed sweep)."""
    errors = [str(r.get("error") or "") for r in rows]
    metrics = [c for c in dict.fromkeys(c for r in rows for c in r) if c not in COLUMNS and c != "error"]
    extra = metrics + (["error"] if any(errors) else [])
    df = pd.DataFrame(list(rows), columns=COLUMNS + extra)
    if any(errors):
        df["error"] = errors
    for col in ("sparsity", "ppl", "ppl_se", "prune_seconds", "nll", "nll_se", "achieved_sparsity", "eval_seconds", "tau"):
        df[col] = df[col].astype(float)
    for col in ("method", "pattern", "label"):
        df[col] = df[col].astype(str)
    return df


def _estimates_path(path: Path) -> Path:
    return path.with_name(path.stem + ".estimates.npz")


def estimates_path(path: str | Path) -> Path:
    """Where :func:`save_sweep` puts the per-draw estimates of the sweep CSV ``path`` (beside a link's target)."""
    return _estimates_path(output_target(path))


def partial_path(path: str | Path) -> Path:
    """Where :class:`SweepWriter` keeps the rows of an unfinished sweep whose result goes to ``path``:
    beside it, or in the current directory for a device or FIFO (``/dev/stdout`` → ``./stdout.partial.csv``)."""
    path = Path(path)
    if is_special(path):
        return Path.cwd() / (path.stem + ".partial.csv")
    return path.with_name(path.stem + ".partial" + (path.suffix or ".csv"))


def save_sweep(df: pd.DataFrame, path: str | Path) -> Path:
    """Write the sweep as CSV, atomically (a temporary sibling renamed into place); :func:`load_sweep`
    reads it back with the same columns and dtypes. The per-draw estimates (``df.attrs["estimates"]``),
    when present, go to ``<name>.estimates.npz`` beside it (:func:`estimates_path`) with the sha256 of the
    CSV's bytes and the sweep's settings (``df.attrs["settings"]``, :func:`sweep_settings`), written after the
    CSV: a crash between the two leaves a pair that :func:`load_sweep` recognises as mismatched. A sweep without
    estimates removes an older run's estimates file. A link is
    followed (its target replaced); a device or FIFO (``/dev/stdout``) gets the CSV only."""
    text = df.to_csv(index=False)
    if is_special(path):
        return atomic_write_text(path, text)
    path = atomic_write_text(path, text)
    side = _estimates_path(path)
    estimates = df.attrs.get("estimates") or {}
    if estimates:
        atomic_write(
            side,
            lambda tmp: np.savez_compressed(
                tmp,
                **{f"row{i}": np.asarray(v) for i, v in enumerate(estimates.values())},
                labels=np.array(list(estimates), dtype=str),
                csv_sha256=np.array(_sha256(text.encode("utf-8"))),
                settings=np.array(json.dumps(df.attrs.get("settings") or {}, sort_keys=True)),
            ),
            suffix=".npz",
        )
    elif side.exists() and side.is_file():
        side.unlink()  # an older run's estimates would no longer match the CSV
    return path


def _sha256(data: bytes) -> str:

    return hashlib.sha256(data).hexdigest()


class SweepWriter:
    """Keeps a sweep's finished rows on disk while it runs, without touching the result file.

    ``writer.add(row, estimates)`` (use it as ``run_sweep(..., on_result=writer.add)``; ``on_row=writer.add``
    keeps the rows without their per-draw estimates) rewrites ``partial_path(out)`` (and its estimates)
    with every row so far, atomically; ``writer.finish(df)`` writes ``out`` (replacing an older result
    only now, on success) and removes the partial file. After a failure the rows are in :attr:`partial`.
    ``resume=True`` starts from the rows already in the partial file (those that hold an error are
    dropped, to be run again); :attr:`done` holds them for ``run_sweep(..., done=writer.done)``."""

    def __init__(self, out: str | Path, resume: bool = False, settings: dict | None = None):
        self.settings = settings  # :func:`sweep_settings`, saved with the rows (a later --resume compares them)
        self.out = check_output_file(out, "Sweep CSV")  # a link's target
        self.partial = check_output_file(partial_path(self.out), "Partial sweep CSV")
        for side in (self.out, self.partial):  # the estimates beside each: every name checked before the work
            if not is_special(side):
                check_output_file(_estimates_path(side), "Sweep estimates")
        self.rows: list[dict] = []
        self.estimates: dict[str, np.ndarray] = {}
        self.done: pd.DataFrame | None = None
        if resume and self.partial.exists():
            done = load_sweep(self.partial)
            saved = done.attrs.get("settings")
            if "error" in done.columns:
                keep = done["error"].fillna("").astype(str) == ""
                done = done[keep].drop(columns=["error"]).reset_index(drop=True)
                done.attrs["estimates"] = {
                    k: v for k, v in (done.attrs.get("estimates") or {}).items() if k in set(done["label"])
                }
            if saved is not None:
                done.attrs["settings"] = saved  # for run_sweep to compare with the resumed sweep's
            self.done = done
            self.rows = [{c: r.get(c) for c in dict.fromkeys([*COLUMNS, *r])} for r in done.to_dict("records")]
            self.estimates = dict(done.attrs.get("estimates") or {})

    def add(self, row: dict, estimates: np.ndarray | None = None) -> None:
        rows, kept = [*self.rows, row], dict(self.estimates)
        if estimates is not None:
            kept[row["label"]] = estimates
        df = _frame(rows)
        df.attrs["estimates"] = {r["label"]: kept[r["label"]] for r in rows if r["label"] in kept}
        if self.settings is not None:
            df.attrs["settings"] = self.settings
        with signals_held():  # a row counts once it is on disk: Ctrl-C cannot land between the write and the count
            save_sweep(df, self.partial)
            self.rows, self.estimates = rows, kept

    def finish(self, df: pd.DataFrame) -> Path:
        save_sweep(df, self.out)
        for leftover in (self.partial, _estimates_path(self.partial)):
            if leftover.exists():
                leftover.unlink()
        return self.out


NUMERIC_COLUMNS = ("sparsity", "ppl", "ppl_se", "prune_seconds", "nll", "nll_se", "achieved_sparsity", "eval_seconds", "tau")
# Columns that older SinkScope versions wrote under another name: old -> current.
RENAMED_COLUMNS = {"actual_sparsity": "achieved_sparsity"}


def load_sweep(path: str | Path) -> pd.DataFrame:
    """Read a CSV written by :func:`save_sweep` (and its per-draw estimates beside it, when present);
    the old column names of :data:`RENAMED_COLUMNS` are read under their current names. Anything that is
    not such a CSV (a directory, an empty or binary file, text in a numeric column, a damaged estimates
    file) is a :class:`SweepSpecError`. Estimates whose recorded CSV hash differs from the CSV's (a crash
    between the two writes, or a CSV edited since) are left out with a warning; older estimates files
    without a hash are read as before."""
    path = output_target(path)
    raw = _read_sweep_bytes(path)
    df = _parse_sweep_csv(path, raw)
    estimates, settings = _read_estimates(path, raw)
    if estimates is not None:
        df.attrs["estimates"] = estimates
    if settings:
        df.attrs["settings"] = settings
    return df


def _read_sweep_bytes(path: Path) -> bytes:
    """The CSV's bytes, or a one-line SweepSpecError for a missing path, a directory, an unreadable or empty file."""
    if not path.exists():
        raise SweepSpecError(f"No sweep CSV at '{path}'.")
    if path.is_dir():
        raise SweepSpecError(f"'{path}' is a directory; give the sweep's .csv file.")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise SweepSpecError(f"Cannot read '{path}' ({exc.strerror}).") from None
    if not raw.strip():
        raise SweepSpecError(f"'{path}' is empty: not a sweep CSV.")
    return raw


def _parse_sweep_csv(path: Path, raw: bytes) -> pd.DataFrame:
    """The sweep table from the CSV's bytes: current column names, numeric columns as float, text columns as str."""

    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise SweepSpecError(f"'{path}' is binary, not a sweep CSV (text).") from None
    try:
        df = pd.read_csv(io.StringIO(text), keep_default_na=False, na_values=["", "nan", "NaN"])
    except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError) as exc:
        raise SweepSpecError(f"'{path}' is not a sweep CSV ({' '.join(str(exc).split())[:120]}).") from None
    df = df.rename(columns={old: new for old, new in RENAMED_COLUMNS.items() if new not in df.columns})
    missing = [c for c in COLUMNS[:6] if c not in df.columns]
    if missing:
        raise SweepSpecError(f"'{path}' is not a sweep CSV: it lacks the column(s) {', '.join(missing)}.")
    for col in NUMERIC_COLUMNS:
        if col in df.columns:
            values = pd.to_numeric(df[col], errors="coerce")
            bad = values.isna() & df[col].notna()
            if bad.any():
                row = int(bad.to_numpy().argmax())
                raise SweepSpecError(
                    f"'{path}': column '{col}' holds {df[col].iloc[row]!r} in row {row + 1}, not a number; "
                    "restore the CSV the sweep wrote."
                )
            df[col] = values.astype(float)
    for col in ("method", "pattern", "label"):
        if col in df.columns:
            df[col] = df[col].astype(str)
    return _bare_methods(df)


_OLD_GATED_METHOD = r"^(?P<method>[A-Za-z_]\w*)\(tau=(?P<tau>[^()]*)\)$"


def _bare_methods(df: pd.DataFrame) -> pd.DataFrame:
    """Older sweeps wrote a gated method as ``gated_sink_wanda(tau=0.05)``: read it once, here, as the bare
    method with the number in the ``tau`` column (added when missing; a tau already there is kept)."""
    parts = df["method"].str.extract(_OLD_GATED_METHOD)
    old = parts["method"].notna()
    if not old.any():
        return df
    if "tau" not in df.columns:
        df["tau"] = math.nan
    df.loc[old, "method"] = parts.loc[old, "method"]
    df.loc[old & df["tau"].isna(), "tau"] = pd.to_numeric(parts["tau"], errors="coerce")
    return df


def series(df: pd.DataFrame) -> pd.Series:
    """One name per row for the method at its setting: the method, with ``, tau=0.05`` for a row with a
    tau (a gated method), so that a gated method at several taus gives several lines of a plot."""
    tau = df["tau"] if "tau" in df.columns else pd.Series(math.nan, index=df.index)
    return pd.Series(
        [m if not np.isfinite(t) else f"{m}, tau={t:g}" for m, t in zip(df["method"].astype(str), tau.astype(float))],
        index=df.index,
        dtype=object,
    )


def _read_estimates(path: Path, raw: bytes) -> tuple[dict[str, np.ndarray] | None, dict | None]:
    """The per-draw estimates beside the CSV, by label, and the sweep's settings; (None, None) when there are
    none or they belong to another run (settings None also for files written before they were saved)."""

    side = _estimates_path(path)
    if not side.exists():
        return None, None
    try:
        with np.load(side, allow_pickle=False) as data:
            recorded = str(data["csv_sha256"]) if "csv_sha256" in data.files else None
            estimates = {str(label): np.asarray(data[f"row{i}"], float) for i, label in enumerate(data["labels"])}
            settings = json.loads(str(data["settings"])) if "settings" in data.files else None
            if settings is not None and not isinstance(settings, dict):
                raise ValueError("settings are not a JSON object")
    except Exception as exc:  # zipfile / numpy raise many kinds for a damaged file
        raise SweepSpecError(
            f"'{side}' (the sweep's per-draw estimates) is damaged ({type(exc).__name__}); delete it to read "
            f"'{path.name}' without paired errors."
        ) from None
    if recorded is not None and recorded != _sha256(raw):
        warnings.warn(
            f"'{side.name}' belongs to another run than '{path.name}' (interrupted write or edited CSV); "
            "its per-draw estimates are left out, so paired errors fall back to independent ones.",
            stacklevel=3,
        )
        return None, None
    return estimates, settings


# Sink-aware methods and the baselines they are meant to beat (method, baseline).
DEFAULT_PAIRS: tuple[tuple[str, str], ...] = (
    ("sink_wanda", "wanda"),
    ("sink_sparsegpt", "sparsegpt"),
    ("sink_wanda", "noised_wanda"),
)


def method_differences(df: pd.DataFrame, pairs: Sequence[tuple[str, str]] = DEFAULT_PAIRS) -> pd.DataFrame:
    """One row per (method row, baseline) present in ``df`` at the same pattern and sparsity: both perplexities,
    ``delta_ppl = ppl_method - ppl_baseline`` (negative: the method is better), ``rel_ppl`` (ratio − 1),
    ``delta_nll`` (nats/token), ``se_indep = sqrt(nll_se_m² + nll_se_b²)`` (treats the two Monte Carlo
    errors as independent: conservative), ``se_paired`` (:func:`~sap_core.evaluate.paired_se` on the per-draw estimates in
    ``df.attrs["estimates"]``; NaN without them) and ``z = delta_nll / se`` with the paired error when
    known, else the independent one. A gated method at several taus gives one row per tau (``tau``)."""
    cols = [
        "method",
        "baseline",
        "pattern",
        "sparsity",
        "ppl",
        "ppl_baseline",
        "delta_ppl",
        "rel_ppl",
        "delta_nll",
        "se_indep",
        "se_paired",
        "z",
        "tau",
    ]
    estimates = df.attrs.get("estimates") or {}
    key = ["pattern", "sparsity"]
    rows = []
    for method, baseline in pairs:
        b = df[df["method"] == baseline].drop_duplicates(key).set_index(key)
        for _, ra in df[df["method"] == method].iterrows():
            idx = (ra["pattern"], ra["sparsity"])
            if idx not in b.index:
                continue
            rb = b.loc[idx]
            se = math.sqrt(float(ra["nll_se"]) ** 2 + float(rb["nll_se"]) ** 2)
            ea, eb = estimates.get(str(ra["label"])), estimates.get(str(rb["label"]))
            sp = paired_se_if_known(ea, eb)
            d_nll = float(ra["nll"]) - float(rb["nll"])
            use = sp if np.isfinite(sp) else se
            rows.append(
                dict(
                    method=method,
                    baseline=baseline,
                    pattern=idx[0],
                    sparsity=float(idx[1]),
                    ppl=float(ra["ppl"]),
                    ppl_baseline=float(rb["ppl"]),
                    delta_ppl=float(ra["ppl"]) - float(rb["ppl"]),
                    rel_ppl=float(ra["ppl"]) / float(rb["ppl"]) - 1,
                    delta_nll=d_nll,
                    se_indep=se,
                    se_paired=sp,
                    z=d_nll / use if use > 0 else math.nan,
                    tau=float(ra.get("tau", math.nan)),
                )
            )
    return pd.DataFrame(rows, columns=cols)
