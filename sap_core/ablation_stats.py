"""What happens if the sinks are removed? Perplexity and task accuracy with and without sink ablation.

:func:`run_ablation` scores each model twice on the same windows (and, for a DLM, the same masks): as it is,
and with :func:`sap_core.ablation.ablated` (the sinks of the chosen layers removed as keys at every pass).
Perplexity is the masked-diffusion bound for a DLM and next-token perplexity for a causal model
(:func:`sap_core.evaluate.perplexity`); the change ``Δ NLL`` (nats per token, ablated − plain) has the paired
standard error over windows, ``sd_w(nll_ablated(w) - nll_plain(w)) / sqrt(W)`` (for a DLM each window's NLL is
its draws' mean, so this SE holds the Monte Carlo error and the text's variability; ``se_mc`` is the Monte Carlo
part alone, :func:`sap_core.evaluate.paired_se`). Accuracy (with a task) is per document, paired likewise
(:func:`sap_core.lmeval.accuracy.paired_row`). ``beyond_2se``: ``|Δ| > 2 SE``.

:func:`ablation_side_by_side` is the classroom view of the same question on the built-in pair: one prompt decoded
by a DLM and its AR twin, each plain and ablated (four texts), beside :func:`run_ablation`'s perplexity table;
:func:`estimate_side_by_side` says its cost before it runs.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

from sap_core.ablation import AblationError, SinkAblation, ablated
from sap_core.decoding import DecodeSpec, Trajectory
from sap_core.diffusion import generate
from sap_core.evaluate import EvalSpec, paired_se_if_known, perplexity
from sap_core.lmeval.accuracy import TaskAccuracy, paired_row
from sap_core.progress import Progress, report
from sap_core.sink_report import json_records
from sap_core.sinkstats import mean_se, pass_seconds
from sap_core.text import shown_prompt

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


MODELS = ("DLM", "AR")  # the labels of :func:`ablation_side_by_side`'s two models, in its order
SHOWN_CHARACTERS = 400  # a generated text as shown: cut to this many characters (:func:`sap_core.text.shown_prompt`)


@dataclass(frozen=True, eq=False)
class SideBySide:
    """One prompt, DLM and AR, each plain and with the sinks removed. ``runs[(model, ablated)]``: the
    :class:`~sap_core.decoding.Trajectory` of each of the four generations (``model`` in :data:`MODELS`,
    ``ablated`` a bool), decoded under the same ``decode`` settings (the AR model one token a step);
    ``texts[(model, ablated)]``: its generated text as the app shows a prompt (newlines as ``⏎``, cut to
    :data:`SHOWN_CHARACTERS`); ``stats``: the paired change of perplexity (:func:`run_ablation`)."""

    ablation: SinkAblation
    decode: DecodeSpec
    prompt: str
    runs: dict[tuple[str, bool], Trajectory]
    texts: dict[tuple[str, bool], str]
    stats: AblationStats

    def outputs(self) -> pd.DataFrame:
        """One row per model: its name, the generated text plain and with the sinks ablated, and whether they differ."""
        return pd.DataFrame(
            [
                {
                    "model": label,
                    "plain": self.texts[(label, False)],
                    "sinks ablated": self.texts[(label, True)],
                    "same text": self.texts[(label, False)] == self.texts[(label, True)],
                }
                for label in MODELS
            ]
        )


def _pair(dlm, ar, ablation: SinkAblation, eval_spec: EvalSpec) -> None:
    """One line before any work: the models' kinds, the ablation's layers, the evaluation settings."""
    if dlm.causal or not ar.causal:
        raise AblationError(f"Pass a masked-diffusion model (DLM) then a causal one (AR); got {dlm.name}, {ar.name}.")
    ablation.check(dlm)
    ablation.check(ar)
    eval_spec.validate()


def _stage(progress: Progress | None, stage: int, stages: int, message: str) -> Progress | None:
    """``progress`` of one stage of a job of ``stages`` equal parts: its share mapped into the whole (in percent)."""
    if progress is None:
        return None
    return lambda done, total, _msg: progress(100 * stage + 100 * done // max(total, 1), 100 * stages, message)


def ablation_side_by_side(
    dlm,
    ar,
    prompt: str | list[int],
    decode: DecodeSpec = DecodeSpec(),
    ablation: SinkAblation = SinkAblation(),
    eval_spec: EvalSpec = EvalSpec(nsamples=4),
    progress: Progress | None = None,
) -> SideBySide:
    """Decode ``prompt`` with ``dlm`` and ``ar``, each plain and ablated (same ``decode`` settings and seed),
    and score both with :func:`run_ablation` on ``eval_spec``'s windows. Models of the wrong kind, ablation layers
    a model lacks and impossible evaluation settings: one line before any work."""
    _pair(dlm, ar, ablation, eval_spec)
    runs, texts = {}, {}
    for i, (label, handle) in enumerate(zip(MODELS, (dlm, ar))):
        for j, ablate in enumerate((False, True)):
            subject = ablated(handle, ablation) if ablate else handle
            stage = _stage(progress, 2 * i + j, 5, f"{label} {'ablated' if ablate else 'plain'}, generating")
            traj = generate(subject, prompt, decode, progress=stage)
            runs[(label, ablate)] = traj
            texts[(label, ablate)] = shown_prompt(
                handle.decode(traj.final_tokens[traj.prompt_length :].tolist()), SHOWN_CHARACTERS
            )
    stats = run_ablation([dlm, ar], ablation, eval_spec, progress=_stage(progress, 4, 5, "perplexity, plain and ablated"))
    text = prompt if isinstance(prompt, str) else dlm.decode(list(prompt))
    return SideBySide(ablation, decode, text, runs, texts, stats)


@dataclass(frozen=True)
class SideBySideCost:
    """What :func:`ablation_side_by_side` will cost, said before it runs. ``passes``: forward passes in all (the
    DLM's ``steps`` and the AR model's ``gen_length`` per generation, twice each; the perplexity's batches, twice
    per model); ``seconds``: the estimate from passes timed here, plain and ablated (an ablated pass computes each
    ablated layer's attention twice)."""

    passes: int
    seconds: float


DLM_BATCH, AR_BATCH = 32, 16  # rows per forward pass of :func:`sap_core.evaluate.diffusion_perplexity` / causal_perplexity


def estimate_side_by_side(
    dlm,
    ar,
    prompt_tokens: int,
    decode: DecodeSpec = DecodeSpec(),
    ablation: SinkAblation = SinkAblation(),
    eval_spec: EvalSpec = EvalSpec(nsamples=4),
) -> SideBySideCost:
    """The cost of :func:`ablation_side_by_side` on a prompt of ``prompt_tokens`` tokens, from one timed pass of each
    model, plain and ablated, at the generation's length and on one perplexity batch (eight passes: about a
    second on the built-in pair)."""
    _pair(dlm, ar, ablation, eval_spec)
    full = prompt_tokens + decode.gen_length
    plans = (  # (model, generation steps, length of a step, perplexity rows, rows per pass)
        (dlm, decode.steps, full, eval_spec.nsamples * eval_spec.draws, DLM_BATCH),
        (ar, decode.gen_length, full - decode.gen_length // 2, eval_spec.nsamples, AR_BATCH),  # AR: the mean length
    )
    passes, seconds = 0, 0.0
    for handle, steps, length, rows, batch in plans:
        batches = math.ceil(rows / batch)
        passes += 2 * (steps + batches)
        for subject in (handle, ablated(handle, ablation)):
            seconds += steps * pass_seconds(subject, length)
            seconds += batches * pass_seconds(subject, eval_spec.seqlen, min(rows, batch))
    return SideBySideCost(passes, seconds)


__all__ = [
    "MODELS",
    "AblationStats",
    "SideBySide",
    "SideBySideCost",
    "ablation_side_by_side",
    "estimate_side_by_side",
    "run_ablation",
]
