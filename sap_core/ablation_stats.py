"""What happens if the sinks are removed? Perplexity and task accuracy with and without sink ablation.

:func:`run_ablation` scores each model twice on the same windows (and, for a DLM, the same masks): as it is,
and with :func:`sap_core.ablation.ablated` (the sinks of the chosen layers removed as keys at every pass).
Perplexity is the masked-diffusion bound for a DLM and next-token perplexity for a causal model
(:func:`sap_core.evaluate.perplexity`); the change ``Δ NLL`` (nats per token, ablated − plain) has the paired
standard error over windows, ``sd_w(nll_ablated(w) - nll_plain(w)) / sqrt(W)`` (for a DLM each window's NLL is
its draws' mean, so this SE holds the Monte Carlo error and the text's variability; ``se_mc`` is the Monte Carlo
part alone, :func:`sap_core.evaluate.paired_se`). Accuracy (with a task) is per document, paired likewise
(:func:`sap_core.lmeval.accuracy.paired_row`). ``beyond_2se``: ``|Δ| > 2 SE``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

from sap_core.ablation import SinkAblation, ablated
from sap_core.evaluate import EvalSpec, paired_se_if_known, perplexity
from sap_core.lmeval.accuracy import TaskAccuracy, paired_row
from sap_core.progress import Progress, report
from sap_core.sink_report import json_records
from sap_core.sinkstats import mean_se

COLUMNS = ("model", "kind", "measure", "n", "plain", "ablated", "delta", "se_delta", "se_mc", "beyond_2se")


@dataclass(frozen=True, eq=False)
class AblationStats:
    """``rows``: one per (model, measure) with :data:`COLUMNS` (``measure``: ``nll``, nats per token, or ``acc``;
    ``n``: windows or documents; ``kind``: ``"diffusion"`` or ``"causal"``)."""

    ablation: SinkAblation
    eval: EvalSpec
    task: str | None
    rows: pd.DataFrame
    seconds: float

    def table(self) -> pd.DataFrame:
        """Readable: plain, ablated and ``Δ ± SE`` per (model, measure); perplexity shown as ``exp(nll)``."""
        out = []
        for r in self.rows.to_dict("records"):
            f = math.exp if r["measure"] == "nll" else float
            out.append(
                {
                    "model": r["model"],
                    "measure": "perplexity" if r["measure"] == "nll" else f"accuracy ({self.task})",
                    "n": r["n"],
                    "plain": f"{f(r['plain']):.4g}",
                    "ablated": f"{f(r['ablated']):.4g}",
                    "Δ (NLL nats/token, or accuracy) ± paired SE": f"{r['delta']:+.4f} ± {r['se_delta']:.4f}",
                    "beyond 2 SE": "yes" if r["beyond_2se"] else "no",
                }
            )
        return pd.DataFrame(out)

    def to_dict(self) -> dict:
        return {
            "format": "sinkscope.sink_ablation/1",
            "ablation": {
                "layers": None if self.ablation.layers is None else list(self.ablation.layers),
                "sink": self.ablation.sink.to_dict(),
            },
            "eval": {k: v for k, v in asdict(self.eval).items() if k != "text"},
            "task": self.task,
            "seconds": self.seconds,
            "rows": json_records(self.rows),
        }


def _row(model: str, kind: str, measure: str, plain: np.ndarray, abl: np.ndarray, se_mc: float = math.nan) -> dict:
    d = np.asarray(abl, float) - np.asarray(plain, float)
    delta, se = mean_se(d)
    beyond = bool(np.isfinite(se) and abs(delta) > 2 * se) or bool(se == 0 and delta != 0)
    return dict(
        model=model,
        kind=kind,
        measure=measure,
        n=int(d.size),
        plain=float(np.mean(plain)),
        ablated=float(np.mean(abl)),
        delta=delta,
        se_delta=se,
        se_mc=se_mc,
        beyond_2se=beyond,
    )


def run_ablation(
    handles: Sequence,
    ablation: SinkAblation = SinkAblation(),
    eval_spec: EvalSpec = EvalSpec(),
    accuracy: TaskAccuracy | None = None,
    progress: Progress | None = None,
) -> AblationStats:
    """Perplexity (and ``accuracy``'s task) of every handle, plain and ablated, paired. Ablation layers a model
    lacks, impossible evaluation settings and an unknown task: one line before any work."""
    for h in handles:
        ablation.check(h)
    eval_spec.validate()
    if accuracy is not None:
        accuracy.validate()
    rows, start = [], time.perf_counter()
    jobs = len(handles) * (2 if accuracy is None else 4)
    done = 0
    for h in handles:
        kind = "causal" if h.causal else "diffusion"
        both = []
        for subject in (h, ablated(h, ablation)):
            both.append(perplexity(subject, eval_spec).result)
            done += 1
            report(progress, done, jobs, f"{h.name}: perplexity")
        plain, abl = both
        rows.append(
            _row(h.name, kind, "nll", plain.window_nll, abl.window_nll, paired_se_if_known(abl.estimates, plain.estimates))
        )
        if accuracy is not None:
            docs = []
            for subject in (h, ablated(h, ablation)):
                docs.append(accuracy.per_document(subject))
                done += 1
                report(progress, done, jobs, f"{h.name}: accuracy")
            paired = paired_row(docs[1], docs[0])
            row = _row(h.name, kind, "acc", docs[0], docs[1])
            row.update(se_delta=paired["se_delta"], beyond_2se=paired["beyond_2se"])
            rows.append(row)
    frame = pd.DataFrame(rows, columns=list(COLUMNS))
    return AblationStats(ablation, eval_spec, accuracy.task if accuracy else None, frame, time.perf_counter() - start)


__all__ = ["AblationStats", "run_ablation"]
