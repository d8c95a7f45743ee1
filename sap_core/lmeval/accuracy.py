"""Benchmark accuracy of the dense model and its variants, paired document by document.

:func:`accuracy_table` scores the dense model and every variant on the same lm-eval tasks through
:class:`sap_core.lmeval.model.SinkScopeLM`, with the same documents (``limit``) and the same Monte Carlo masks
(each request's masks come from the spec's seed and its own tokens, :func:`sap_core.lmeval.model.request_seed`),
so a variant's accuracy difference from the dense model gets a paired standard error from the per-document
results: ``se_delta = std(acc_variant − acc_dense) / sqrt(n)`` over the ``n`` documents, not two independent
error bars. Variants run through ``variant.applied(handle)`` (the dense weights come back bit for bit, also
on cancel) or are separately loaded handles. :class:`TaskAccuracy` is one task's accuracy as a
:class:`~sap_core.evaluate.Metric` (a sweep's ``acc`` columns).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import lm_eval
import numpy as np
import pandas as pd
import torch
from lm_eval.utils import handle_non_serializable

from sap_core.compare import labelled_variants, variant_context
from sap_core.errors import SapError, SweepSpecError
from sap_core.evaluate import DENSE, Score
from sap_core.files import atomic_write_text
from sap_core.lmeval.model import BenchSpec, make_lm
from sap_core.lmeval.tasks import load_tasks, manager_for, offline
from sap_core.models import ModelHandle
from sap_core.progress import Progress, report

COLUMNS = ["task", "model", "metric", "n", "acc", "acc_se", "delta", "se_delta", "z", "beyond_2se"]


@dataclass
class AccuracyResult:
    """``table``: one row per (task, model), :data:`COLUMNS`; ``results``: lm-eval's results per model (its
    ``results``, ``configs``, ``versions``, ``n-samples``), ``per_doc``: ``{(task, model): float [n]}``."""

    table: pd.DataFrame
    results: dict = field(repr=False)
    per_doc: dict = field(repr=False)
    spec: BenchSpec = BenchSpec()
    limit: int | None = None

    def to_json(self) -> str:
        data = {
            "spec": self.spec.__dict__,
            "limit": self.limit,
            "table": json.loads(self.table.to_json(orient="records")),
            "per_doc": {task: {m: acc.tolist() for (t, m), acc in self.per_doc.items() if t == task} for task, _ in self.per_doc},
            "lm_eval": self.results,
        }
        return json.dumps(data, indent=1, default=handle_non_serializable)


def _metric(samples: list[dict], task: str) -> str:
    keys = [k for k in ("acc", "exact_match", "acc_norm") if samples and k in samples[0]]
    if not keys:
        raise SapError(
            f"Task '{task}' gives no per-document accuracy (acc or exact_match); pick a multiple-choice or generation task."
        )
    return keys[0]


def _per_doc(samples: list[dict], metric: str) -> np.ndarray:
    return np.array([float(s[metric]) for s in sorted(samples, key=lambda s: s["doc_id"])], dtype=np.float64)


def paired_row(acc: np.ndarray, dense: np.ndarray | None) -> dict:
    """Accuracy ± SE of ``acc`` (per document, 0/1 or scores), and its difference from ``dense`` with the
    paired standard error (None: this is the dense row)."""
    n = len(acc)
    row = dict(
        n=n, acc=float(acc.mean()) if n else float("nan"), acc_se=float(acc.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
    )
    if dense is None:
        return row | dict(delta=0.0, se_delta=float("nan"), z=float("nan"), beyond_2se=False)
    d = acc - dense
    se = float(d.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
    delta = float(d.mean())
    z = delta / se if se > 0 else (0.0 if delta == 0 else float("inf") * np.sign(delta))
    return row | dict(delta=delta, se_delta=se, z=float(z), beyond_2se=bool(abs(z) >= 2))


def check_limit(limit) -> int | None:
    if limit is None:
        return None
    if isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit < 1:
        raise SapError(f"limit must be a whole number >= 1 documents per task (got {limit!r}), or none for all.")
    return int(limit)


def accuracy_table(
    handle: ModelHandle,
    variants: Mapping[str, object] | Sequence[object] = (),
    tasks: Sequence[str] = ("sinkscope_nextline",),
    spec: BenchSpec = BenchSpec(),
    *,
    limit: int | None = None,
    include_path: str | None = None,
    progress: Progress | None = None,
) -> AccuracyResult:
    """Accuracy of the dense ``handle`` (``model="dense"``) and every variant on ``tasks`` (lm-eval task names;
    the built-in ``sinkscope_nextline`` by default), ``limit`` documents per task, with paired errors.
    Unknown tasks, missing task data, impossible specs and too long requests raise one-line errors before
    any model work; ``progress`` counts Monte Carlo rows (or requests) across models; raising
    :class:`~sap_core.errors.Cancelled` from it stops with the dense weights restored."""
    limit = check_limit(limit)
    tasks = [t.strip() for t in tasks if t and t.strip()]
    manager = manager_for(tasks, include_path)
    load_tasks(tasks, manager)  # unknown names and missing data fail here, before any model work
    items = labelled_variants(variants)
    labels = [DENSE] + [label for label, _ in items]
    if len(set(labels)) != len(labels):
        raise SapError(f"Model labels must be unique (got {labels}); pass a mapping label -> variant.")
    for _, v in items:
        variant_context(handle, v)  # a PrunedVariant or a loaded ModelHandle, else one line now
        if hasattr(v, "dense_fingerprint"):
            with handle.lock:
                v._params(handle.module)  # a variant of another model: one line now, not after the dense run

    def sub(i: int, label: str) -> Progress:
        def inner(done: int, total: int, message: str) -> None:
            report(progress, i * total + done, len(labels) * total, f"{label} ({i + 1}/{len(labels)}): {message}")

        return inner

    results, per_doc, rows = {}, {}, []
    for i, label in enumerate(labels):
        variant = None if i == 0 else items[i - 1][1]
        lm = make_lm(handle, variant, spec, progress=sub(i, label))
        with offline():
            out = lm_eval.simple_evaluate(
                model=lm, tasks=list(tasks), task_manager=manager, limit=limit, log_samples=True, verbosity="ERROR"
            )
        samples = out.pop("samples")
        results[label] = {k: out[k] for k in ("results", "configs", "versions", "n-samples") if k in out}
        for task in tasks:
            metric = _metric(samples.get(task, []), task)
            acc = _per_doc(samples[task], metric)
            per_doc[(task, label)] = acc
            dense = per_doc[(task, DENSE)] if i else None
            if dense is not None and len(dense) != len(acc):
                raise SapError(f"Task '{task}' gave {len(acc)} documents for {label} but {len(dense)} for dense; rerun.")
            rows.append(dict(task=task, model=label, metric=metric) | paired_row(acc, dense))
    table = pd.DataFrame(rows, columns=COLUMNS)
    return AccuracyResult(table, results, per_doc, spec, limit)


ACCURACY_COLUMNS = ("acc", "acc_se", "acc_task")


@dataclass(frozen=True)
class TaskAccuracy:
    """Accuracy on one lm-eval ``task`` as a :class:`~sap_core.evaluate.Metric`: the columns ``acc``, ``acc_se``
    and ``acc_task`` of a model as it is now (dense, or with a variant applied; ``sweep --metric acc:TASK``).
    ``limit`` documents (None: all), ``mc_num`` Monte Carlo rows per request in one stratified group, the masks
    seeded by ``seed`` (:class:`~sap_core.lmeval.model.BenchSpec`)."""

    task: str
    limit: int | None = None
    mc_num: int = 32
    seed: int = 0

    @property
    def name(self) -> str:
        return f"acc:{self.task}"

    def validate(self) -> None:
        if not isinstance(self.task, str) or not self.task.strip():
            raise SweepSpecError(f"Name the lm-eval task to score accuracy on, e.g. acc:sinkscope_nextline (got {self.task!r}).")
        check_limit(self.limit)
        self.bench_spec()
        load_tasks([self.task])  # an unknown task or missing data: one line now, before any pruning

    def bench_spec(self) -> BenchSpec:
        return BenchSpec(mc_num=self.mc_num, batch_size=self.mc_num, seed=self.seed)

    def per_document(self, handle: ModelHandle, progress: Progress | None = None) -> np.ndarray:
        """``float64 [documents]``: each document's accuracy (0/1, or the task's score) for ``handle`` as it is now."""
        with offline():
            out = lm_eval.simple_evaluate(
                model=make_lm(handle, spec=self.bench_spec(), progress=progress),
                tasks=[self.task],
                task_manager=manager_for([self.task]),
                limit=check_limit(self.limit),
                log_samples=True,
                verbosity="ERROR",
            )
        samples = out["samples"][self.task]
        return _per_doc(samples, _metric(samples, self.task))

    def score(self, handle: ModelHandle, progress: Progress | None = None) -> Score:
        row = paired_row(self.per_document(handle, progress), None)
        return Score(dict(zip(ACCURACY_COLUMNS, (row["acc"], row["acc_se"], self.task))))


def save_accuracy(result: AccuracyResult, out: str | Path) -> tuple[Path, Path]:
    """``out`` (JSON: spec, table, per-document scores and lm-eval's results per model) and ``<stem>.csv`` (the table) beside it,
    each written atomically (:mod:`sap_core.files`)."""
    out = Path(out)
    csv = out.with_suffix(".csv") if out.suffix.lower() != ".csv" else out.with_name(out.stem + ".table.csv")
    atomic_write_text(csv, result.table.to_csv(index=False))
    return atomic_write_text(out, result.to_json() + "\n"), csv


def format_table(table: pd.DataFrame) -> pd.DataFrame:
    """The table as text columns: ``acc ± SE`` and ``Δ vs dense ± paired SE`` (marked ``*`` beyond 2 SE)."""

    def pm(a, b, pct=True, sign=False):
        if a is None or (isinstance(a, float) and math.isnan(a)):
            return ""
        f = 100 if pct else 1
        s = f"{a * f:+.1f}" if sign else f"{a * f:.1f}"
        return s + ("" if b is None or math.isnan(b) else f" ± {b * f:.1f}")

    rows = []
    for r in table.itertuples():
        dense = r.model == DENSE
        rows.append(
            {
                "task": r.task,
                "model": r.model,
                "n": r.n,
                "acc % ± SE": pm(r.acc, r.acc_se),
                "Δ vs dense ± paired SE (pp)": ""
                if dense
                else pm(r.delta, r.se_delta, sign=True) + (" *" if r.beyond_2se else ""),
            }
        )
    return pd.DataFrame(rows)


@dataclass(frozen=True)
class Cost:
    """What a run of :func:`accuracy_table` costs: ``requests`` per model, ``passes`` (``requests × mc_num /
    batch_size`` forward passes per model, as the official class counts them; one per request for a causal
    model), ``models``, and ``seconds``: the estimate on this device from a timed forward pass."""

    requests: int
    passes: int
    models: int
    seconds: float


def estimate_cost(handle: ModelHandle, tasks: Sequence[str], spec: BenchSpec, limit: int | None, models: int) -> Cost:
    """The cost of scoring ``models`` models (dense + variants) on ``tasks``: lm-eval's requests are built (no
    model work), and one forward pass of ``batch_size`` rows of their mean length is timed here."""
    limit = check_limit(limit)
    loaded = load_tasks(tasks, manager_for(list(tasks)))
    requests, tokens = 0, 0
    for task in loaded.values():
        task.build_all_requests(limit=limit, rank=0, world_size=1)
        for inst in task.instances:
            requests += 1
            tokens += sum(len(a) for a in inst.args if isinstance(a, str)) // 3 + 1  # about 3 characters a token
    length = max(2, min(tokens // max(requests, 1), handle.max_length or 4096))
    rows = 1 if handle.causal else spec.batch_size
    batch = torch.randint(4, min(handle.vocab_size or 100, 100), (rows, length))
    with torch.inference_mode():
        handle.logits(batch[:, :2])  # warm-up
        t0 = time.perf_counter()
        handle.logits(batch)
        per_pass = time.perf_counter() - t0
    passes = requests if handle.causal else spec.forward_passes(requests)
    return Cost(requests, passes, models, passes * models * per_pass)
