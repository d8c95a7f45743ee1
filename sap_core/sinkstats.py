"""Do DLM sinks move more than AR sinks? Sink statistics across many prompts, with error bars.

One prompt is an anecdote. :func:`run_sinkstats` decodes ``N`` prompts with a masked-diffusion model
(DLM) and a causal model (AR) under the same :class:`~sap_core.decoding.DecodeSpec`, analyses each
trajectory with :func:`sap_core.sink_report.analyze` under one :class:`~sap_core.sinks.SinkSpec`, and
keeps, per prompt, model and layer (``-1`` = all selected layers, the Sink stability page's
aggregate), the statistics of :data:`STATISTICS`:

* ``dominant_var``: ``Var_t(d_t)``, the variance over steps of the dominant position (tokens²),
  exactly :attr:`sap_core.sink_report.Instability.dominant_var`;
* ``distinct_dominant``: the number of different positions ``d_t`` takes over the steps;
* ``first_token_share``: the share of steps with ``d_t = 0`` (the first token, BOS for the
  built-in models);
* ``top_k_share``: :attr:`sap_core.sink_report.Instability.top_k_share`, the share of the mean mass held
  by the ``SinkSpec.top_k`` largest positions.

:meth:`SinkStats.summary` gives, per layer and statistic, the mean over prompts and its standard
error ``SE = sd / sqrt(N)`` (sample standard deviation, ``ddof = 1``) for each model, and the paired
difference DLM − AR (per prompt, then averaged) with its SE. ``significant`` marks a difference
whose mean is more than two SE from 0 (about a two-sided 95% test for ``N >= 30``).

A causal model decodes one token per step, so its step count is ``gen_length`` whatever
``DecodeSpec.steps`` says; both models always decode the same prompt for the same number of tokens.

Cost: the models are loaded once by the caller and reused for every prompt; each prompt's
trajectory is reduced to its statistics at once and dropped, so memory does not grow with ``N``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from sap_core.attention import AttentionRecorder
from sap_core.decoding import DecodeSpec, take_pass
from sap_core.diffusion import generate
from sap_core.errors import SapError
from sap_core.evaluate import load_text, windows
from sap_core.files import atomic_write_text
from sap_core.progress import Progress, report
from sap_core.sink_report import SinkReport, analyze, json_records
from sap_core.sinks import AGGREGATE, SinkSpec

STATISTICS = {
    "dominant_var": "Var(dominant position) (tokens²)",
    "distinct_dominant": "Distinct dominant positions",
    "first_token_share": "Steps with the dominant sink on the first token (share)",
    "top_k_share": "Top-k mass share",
}
DIFFERENCE = "DLM − AR"
SIGNIFICANCE_SE = 2.0  # |mean difference| > 2 SE: about a two-sided 95% test for N >= 30


class SinkStatsError(SapError):
    """Impossible settings for the across-prompt statistics."""


def report_statistics(report: SinkReport) -> list[dict]:
    """One row per layer (first: the aggregate, ``layer = -1``) with the :data:`STATISTICS` of one report."""
    rows = []
    dominants = [report.dominant] + [report.layer_dominant[:, i] for i in range(len(report.layers))]
    figures = [report.aggregate] + list(report.per_layer)
    for figure, dom in zip(figures, dominants):
        rows.append(
            {
                "layer": int(figure.layer),
                "dominant_var": float(figure.dominant_var),
                "distinct_dominant": int(np.unique(dom).size),
                "first_token_share": float(np.mean(dom == 0)),
                "top_k_share": float(figure.top_k_share),
            }
        )
    return rows


def evaluation_prompts(handle, n: int, prompt_tokens: int = 16, text: str | None = None) -> list[str]:
    """``n`` prompts of ``prompt_tokens`` tokens each: windows spread evenly over ``text`` (default:
    the shipped evaluation text, read as :mod:`sap_core.evaluate` reads it), decoded back to text so
    that models with other tokenizers get the same words."""
    if n < 2:
        raise SinkStatsError(f"Give at least 2 prompts (got {n}): a standard error needs two.")
    if prompt_tokens < 1:
        raise SinkStatsError(f"prompt_tokens must be at least 1 (got {prompt_tokens}).")
    head = len(handle.encode(""))
    rows, P = windows(handle, load_text(text), head + prompt_tokens, n, None)
    return [handle.decode(row[P:].tolist()) for row in rows]


def prompts_from_lines(text: str, n: int | None = None) -> list[str]:
    """The first ``n`` non-empty lines of a user's prompt file (one prompt a line); all when ``n`` is None."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if n is not None and len(lines) < n:
        raise SinkStatsError(
            f"The prompt file has {len(lines)} non-empty lines, fewer than the {n} prompts asked for; "
            f"add prompts (one a line) or ask for at most {len(lines)}."
        )
    lines = lines if n is None else lines[:n]
    if len(lines) < 2:
        raise SinkStatsError("Give at least 2 prompts (one a line): a standard error needs two.")
    return lines


@dataclass(frozen=True, eq=False)
class SinkStats:
    """Per-prompt sink statistics of a DLM and an AR model (see the module docstring).

    ``per_prompt``: one row per (prompt index, model label, layer) with the :data:`STATISTICS`;
    ``labels``: ``(dlm_label, ar_label)``; ``seconds``: wall time of the whole run.
    """

    labels: tuple[str, str]
    prompts: tuple[str, ...]
    decode: DecodeSpec
    sink: SinkSpec
    per_prompt: pd.DataFrame
    seconds: float

    @property
    def n_prompts(self) -> int:
        return len(self.prompts)

    def summary(self) -> pd.DataFrame:
        """Long table: one row per (layer, statistic, group) with ``mean``, ``se``, ``n`` and, for the
        paired difference (group :data:`DIFFERENCE`), ``significant``. Groups: the DLM label, the AR
        label, :data:`DIFFERENCE`. Layer ``-1`` is the aggregate over all selected layers."""
        dlm, ar = self.labels
        f = self.per_prompt
        rows = []
        layers = [AGGREGATE] + sorted(x for x in f["layer"].unique() if x != AGGREGATE)
        for layer in layers:
            part = f[f["layer"] == layer]
            a = part[part["model"] == dlm].set_index("prompt").sort_index()
            b = part[part["model"] == ar].set_index("prompt").sort_index()
            for stat in STATISTICS:
                groups = {dlm: a[stat].to_numpy(float), ar: b[stat].to_numpy(float)}
                both = a.index.intersection(b.index)
                groups[DIFFERENCE] = a.loc[both, stat].to_numpy(float) - b.loc[both, stat].to_numpy(float)
                for group, values in groups.items():
                    mean, se = mean_se(values)
                    row = {"layer": int(layer), "statistic": stat, "group": group, "mean": mean, "se": se, "n": int(values.size)}
                    if group == DIFFERENCE:
                        row["significant"] = bool(np.isfinite(se) and abs(mean) > SIGNIFICANCE_SE * se)
                    rows.append(row)
        out = pd.DataFrame(rows)
        out["significant"] = out["significant"].astype(object).where(out["group"] == DIFFERENCE, None)
        return out

    def table(self, layer: int = AGGREGATE) -> pd.DataFrame:
        """Readable table of one layer: a row per statistic, ``mean ± SE`` per group, and the significance."""
        s = self.summary()
        s = s[s["layer"] == layer]
        rows = []
        for stat, title in STATISTICS.items():
            part = s[s["statistic"] == stat].set_index("group")
            row = {"Statistic": title}
            for group in (*self.labels, DIFFERENCE):
                row[group] = f"{part.loc[group, 'mean']:.3g} ± {part.loc[group, 'se']:.2g}"
            row["Difference significant (|mean| > 2 SE)"] = "yes" if part.loc[DIFFERENCE, "significant"] else "no"
            rows.append(row)
        return pd.DataFrame(rows)

    def to_dict(self) -> dict:
        return {
            "format": "sinkscope.sink_stats/1",
            "labels": {"dlm": self.labels[0], "ar": self.labels[1]},
            "n_prompts": self.n_prompts,
            "seconds": self.seconds,
            "decode": asdict(self.decode),
            "sink": self.sink.to_dict(),
            "prompts": list(self.prompts),
            "summary": json_records(self.summary()),
            "per_prompt": json_records(self.per_prompt),
        }

    def save(self, path: str | Path) -> list[Path]:
        """Write ``.json`` (everything) or ``.csv`` (the summary, and the per-prompt rows next to it as
        ``<stem>.prompts.csv``). Each file goes to a temporary sibling first and is renamed into place."""
        path = Path(path)
        suffix = path.suffix.lower()
        if suffix not in (".json", ".csv"):
            raise SinkStatsError(f"Write to a .json or .csv file (got '{path.name}').")
        path.parent.mkdir(parents=True, exist_ok=True)
        if suffix == ".json":
            atomic_write_text(path, json.dumps(self.to_dict(), indent=1, allow_nan=False))
            return [path]
        prompts = path.with_name(f"{path.stem}.prompts.csv")
        atomic_write_text(path, self.summary().to_csv(index=False))
        atomic_write_text(prompts, self.per_prompt.to_csv(index=False))
        return [path, prompts]


def mean_se(values: np.ndarray) -> tuple[float, float]:
    """Mean and standard error of the mean (``sd / sqrt(n)``, ``ddof = 1``); SE is NaN for fewer than 2 values."""
    values = np.asarray(values, float)
    if values.size == 0:
        return float("nan"), float("nan")
    mean = float(values.mean())
    se = float(values.std(ddof=1) / np.sqrt(values.size)) if values.size > 1 else float("nan")
    return mean, se


def run_sinkstats(
    first,
    second,
    prompts: Sequence[str],
    decode: DecodeSpec = DecodeSpec(),
    sink: SinkSpec = SinkSpec(),
    labels: Sequence[str] | None = None,
    progress: Progress | None = None,
) -> SinkStats:
    """Decode every prompt with both models (one masked-diffusion, one causal, in either order) under
    ``decode`` and collect the per-prompt statistics under ``sink``.

    ``labels``: names for (first, second), default their ``handle.name``. Every setting is checked
    before any decoding. ``progress(done, total, message)`` is called once per generation step of
    each run; raising :class:`~sap_core.errors.Cancelled` from it stops the run (nothing is changed).
    """
    if bool(first.causal) == bool(second.causal):
        kind = "causal" if first.causal else "masked-diffusion"
        raise SinkStatsError(f"Both models are {kind}; compare one masked-diffusion model (DLM) with one causal model (AR).")
    names = [str(x) for x in (labels if labels is not None else (first.name, second.name))]
    if len(names) != 2 or names[0] == names[1]:
        raise SinkStatsError(f"labels must be two different names (got {names}).")
    if not isinstance(sink, SinkSpec):
        raise SinkStatsError(f"sink must be a SinkSpec (got {type(sink).__name__}).")
    prompts = [str(p) for p in prompts]
    if len(prompts) < 2:
        raise SinkStatsError("Give at least 2 prompts: a standard error needs two.")
    (dlm, dlm_label), (ar, ar_label) = sorted(zip((first, second), names), key=lambda x: bool(x[0].causal))
    encoded = {}
    for handle in (dlm, ar):  # check every prompt against both models before any work
        sink.resolve(handle.n_layers, handle.n_heads)
        ids = [handle.encode(p) for p in prompts]
        for i, p_ids in enumerate(ids):
            if not p_ids:
                raise SinkStatsError(f"Prompt {i + 1} is empty for {handle.name}; drop it.")
            decode.validate(handle.causal, len(p_ids), handle.max_length, handle.family)
        encoded[id(handle)] = ids
    runs = [(dlm, dlm_label), (ar, ar_label)]
    steps = {id(dlm): decode.steps, id(ar): decode.gen_length}
    total = len(prompts) * sum(steps.values())
    done = 0
    rows = []
    start = time.perf_counter()
    for i, _ in enumerate(prompts):
        for handle, label in runs:

            def inner(step: int, _total: int, _message: str, base=done, label=label, i=i) -> None:
                report(progress, base + step, total, f"prompt {i + 1}/{len(prompts)}, {label}")

            traj = generate(
                handle,
                encoded[id(handle)][i],
                decode,
                recorder=AttentionRecorder(),
                progress=inner if progress is not None else None,
            )
            done += steps[id(handle)]
            for row in report_statistics(analyze(traj, sink)):
                rows.append({"prompt": i, "model": label, **row})
            del traj
    frame = pd.DataFrame(rows).astype({"prompt": np.int64, "layer": np.int64, "distinct_dominant": np.int64})
    return SinkStats((dlm_label, ar_label), tuple(prompts), decode, sink, frame, time.perf_counter() - start)


@dataclass(frozen=True)
class SinkStatsCost:
    """What :func:`run_sinkstats` will cost, said before it runs. ``passes``: forward passes in all (per prompt,
    the DLM's ``steps`` and the AR model's ``gen_length``, one a token); ``step_seconds``: one pass with the
    attention recorded, timed here, of (DLM, AR) at the run's mean length; ``seconds``: the estimate,
    ``n_prompts × (steps × dlm + gen_length × ar)`` (the statistics themselves take little beside)."""

    n_prompts: int
    prompt_tokens: int
    decode: DecodeSpec
    passes: int
    step_seconds: tuple[float, float]
    seconds: float


def pass_seconds(handle, length: int, rows: int = 1) -> float:
    """Seconds of one forward pass of ``handle`` on ``rows`` sequences of ``length`` tokens with the attention
    recorded (after a warm-up)."""
    ids = torch.randint(4, max(5, min(handle.vocab_size or 100, 100)), (max(rows, 1), max(length, 2)))
    recorder = AttentionRecorder()
    with torch.inference_mode():
        times = []
        for _ in range(2):  # the first is the warm-up
            t0 = time.perf_counter()
            recorder.start_pass()
            handle.logits(ids, recorder)
            take_pass(recorder)
            times.append(time.perf_counter() - t0)
    return times[-1]


def estimate_cost(first, second, n_prompts: int, prompt_tokens: int, decode: DecodeSpec = DecodeSpec()) -> SinkStatsCost:
    """The cost of :func:`run_sinkstats` on ``n_prompts`` prompts of about ``prompt_tokens`` tokens (the
    :func:`evaluation_prompts` windows) under ``decode``, from a timed pass of each model (two passes each: a
    second or so for the built-in models). The models are ``first`` and ``second`` in either order."""
    if bool(first.causal) == bool(second.causal):
        kind = "causal" if first.causal else "masked-diffusion"
        raise SinkStatsError(f"Both models are {kind}; compare one masked-diffusion model (DLM) with one causal model (AR).")
    dlm, ar = sorted((first, second), key=lambda h: bool(h.causal))
    head = len(dlm.encode(""))
    full = head + prompt_tokens + decode.gen_length
    dlm_step = pass_seconds(dlm, full)
    ar_step = pass_seconds(ar, full - decode.gen_length // 2)  # its sequence grows a token a step: the mean length
    per_prompt = decode.steps * dlm_step + decode.gen_length * ar_step
    return SinkStatsCost(
        int(n_prompts),
        int(prompt_tokens),
        decode,
        int(n_prompts) * (decode.steps + decode.gen_length),
        (dlm_step, ar_step),
        int(n_prompts) * per_prompt,
    )


__all__ = [
    "STATISTICS",
    "DIFFERENCE",
    "SinkStats",
    "SinkStatsError",
    "SinkStatsCost",
    "estimate_cost",
    "pass_seconds",
    "run_sinkstats",
    "evaluation_prompts",
    "prompts_from_lines",
    "report_statistics",
    "mean_se",
]
