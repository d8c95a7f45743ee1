"""Side-by-side generation: the dense model against pruned variants, same prompt, spec and seed.

Every run decodes the same prompt with the same :class:`~sap_core.decoding.DecodeSpec` (hence the
same seed), so any difference between two runs comes from the weights alone. For each variant the
comparison reports

* ``text``: the generated continuation (prompt excluded);
* ``divergence_step``: the first step ``s`` after which the variant's sequence differs from the dense
  one's: ``state[s] = tokens[s + 1]`` (or ``final_tokens`` after the last step), compared over all
  positions, so both a different token and a different choice of position to unmask count. ``None``
  when the two trajectories agree at every step;
* ``agreement``: ``bool [gen_length]``, per generated position, whether the final token equals the
  dense model's; ``agreement_rate`` is its mean;
* ``step_agreement``: ``float [S]``, the fraction of generated positions whose state after step ``s``
  equals the dense state after step ``s`` (1.0 up to the divergence step);
* ``step_seconds``: ``float [S]``, the wall time of every step (from the trajectory).

The shared dense model is never mutated here: a :class:`~sap_core.pruning.PrunedVariant` runs
inside ``variant.applied(handle)``, which holds ``handle.lock`` and restores the dense weights on the
way out (also when the progress callback cancels). The dense run holds ``handle.lock`` too, so it
never sees another session's variant swapped in. A separately loaded :class:`ModelHandle` (for
instance a pruned model directory saved with ``prune --save``) is also accepted as a variant.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from sap_core.decoding import DecodeSpec, Trajectory
from sap_core.diffusion import generate
from sap_core.errors import SapError
from sap_core.evaluate import DENSE, EvalSpec, Metric, Perplexity, paired_se_if_known, score_all
from sap_core.models import ModelHandle
from sap_core.progress import Progress, report
from sap_core.pruning import PrunedVariant, numbered
from sap_core.pruning.structured import StructuredVariant

TABLE_COLUMNS = [
    "label",
    "text",
    "divergence_step",
    "agreement_rate",
    "seconds",
    "tokens_per_second",
    "mean_step_ms",
    "median_step_ms",
]


@dataclass
class ComparedRun:
    """One generation in a :class:`Comparison` and how it relates to the dense run."""

    label: str
    text: str
    trajectory: Trajectory
    divergence_step: int | None
    agreement: np.ndarray  # bool [gen_length]
    step_agreement: np.ndarray  # float [S]
    masked: bool = False  # a mask-only variant: the dense model's computation with zeros in it (never the dense run)

    @property
    def agreement_rate(self) -> float:
        return float(self.agreement.mean()) if self.agreement.size else 1.0

    @property
    def step_seconds(self) -> np.ndarray:
        return self.trajectory.step_seconds

    @property
    def seconds(self) -> float:
        return float(self.trajectory.step_seconds.sum())

    @property
    def tokens_per_second(self) -> float:
        """Generated tokens over the generation's wall time (the speed a structured variant gains)."""
        return len(self.trajectory.generated_ids) / self.seconds if self.seconds > 0 else float("nan")

    @property
    def mean_step_ms(self) -> float:
        return 1000.0 * float(np.mean(self.trajectory.step_seconds))

    @property
    def median_step_ms(self) -> float:
        return 1000.0 * float(np.median(self.trajectory.step_seconds))

    @property
    def generated_ids(self) -> list[int]:
        return [int(i) for i in self.trajectory.generated_ids]

    def summary(self) -> dict[str, Any]:
        """JSON-ready summary (no trajectory arrays except the per-step ones)."""
        return {
            "label": self.label,
            "text": self.text,
            "generated_ids": self.generated_ids,
            "divergence_step": self.divergence_step,
            "agreement_rate": self.agreement_rate,
            "agreement": [bool(a) for a in self.agreement],
            "step_agreement": [float(a) for a in self.step_agreement],
            "seconds": self.seconds,
            "tokens_per_second": self.tokens_per_second,
            "mean_step_ms": self.mean_step_ms,
            "median_step_ms": self.median_step_ms,
            "step_seconds": [float(s) for s in self.step_seconds],
        }


@dataclass
class Comparison:
    """The dense run and every variant run, in the order given (dense first)."""

    prompt: str
    spec: DecodeSpec
    runs: list[ComparedRun] = field(default_factory=list)

    @property
    def dense(self) -> ComparedRun:
        return self.runs[0]

    @property
    def variants(self) -> list[ComparedRun]:
        return self.runs[1:]

    def __getitem__(self, label: str) -> ComparedRun:
        for run in self.runs:
            if run.label == label:
                return run
        raise KeyError(label)

    def speed_note(self) -> str:
        """What the tokens/s of masked variants mean, in one sentence ("" without one): a masked variant computes
        exactly what the dense model computes (its zeros are multiplied like any other weight), so its speed differs
        from the dense run's by timing noise only. Quotes their range of tokens/s and the spread of all the runs'
        step times (10th to 90th percentile), which is that noise."""
        masked = [r for r in self.variants if r.masked]
        if not masked:
            return ""
        speeds = [r.tokens_per_second for r in [self.dense, *masked]]
        ms = 1000.0 * np.concatenate([r.step_seconds for r in [self.dense, *masked]])
        lo, hi = np.percentile(ms, [10, 90])
        return (
            f"Tokens/s of the dense model and its masked variants ({min(speeds):.0f}–{max(speeds):.0f} here) differ by timing "
            f"noise only: a masked variant computes exactly what the dense model computes, its zeros multiplied like any "
            f"other weight, and the step times of these runs spread from {lo:.1f} to {hi:.1f} ms (10th–90th percentile). "
            "Only a structured variant, a smaller model, can be faster."
        )

    def table(self) -> pd.DataFrame:
        """One row per run: label, text, divergence_step, agreement_rate, timing."""
        rows = [{k: v for k, v in run.summary().items() if k in TABLE_COLUMNS} for run in self.runs]
        df = pd.DataFrame(rows, columns=TABLE_COLUMNS)
        df["divergence_step"] = df["divergence_step"].astype("Int64")
        return df

    def to_dict(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "spec": asdict(self.spec), "runs": [run.summary() for run in self.runs]}


def states_after_steps(trajectory: Trajectory) -> np.ndarray:
    """``int64 [S, L]``: the sequence after each step (``tokens[s + 1]``; ``final_tokens`` after the last)."""
    return np.concatenate([trajectory.tokens[1:], trajectory.final_tokens[None]], axis=0)


def divergence_step(dense: Trajectory, other: Trajectory) -> int | None:
    """First step after which ``other``'s sequence differs from ``dense``'s; None if they never differ."""
    _check_comparable(dense, other)
    differs = (states_after_steps(dense) != states_after_steps(other)).any(axis=1)
    hits = np.flatnonzero(differs)
    return int(hits[0]) if hits.size else None


def position_agreement(dense: Trajectory, other: Trajectory) -> np.ndarray:
    """``bool [gen_length]``: whether each generated position's final token equals the dense one."""
    _check_comparable(dense, other)
    return dense.generated_ids == other.generated_ids


def step_agreement(dense: Trajectory, other: Trajectory) -> np.ndarray:
    """``float [S]``: fraction of generated positions whose state after each step equals the dense state."""
    _check_comparable(dense, other)
    P = dense.prompt_length
    same = states_after_steps(dense)[:, P:] == states_after_steps(other)[:, P:]
    return same.mean(axis=1) if same.shape[1] else np.ones(same.shape[0])


def _check_comparable(a: Trajectory, b: Trajectory) -> None:
    if a.tokens.shape != b.tokens.shape or a.prompt_length != b.prompt_length:
        raise SapError(
            f"These trajectories cannot be compared: shapes {a.tokens.shape} and {b.tokens.shape} "
            f"(prompt lengths {a.prompt_length} and {b.prompt_length}); decode the same prompt with the same spec."
        )
    if not np.array_equal(a.tokens[0, : a.prompt_length], b.tokens[0, : b.prompt_length]):
        raise SapError("These trajectories start from different prompts; decode the same prompt for both.")


Variant = PrunedVariant | ModelHandle


def _label_of(variant: Variant, index: int) -> str:
    if isinstance(variant, PrunedVariant):
        return variant.spec.label
    if isinstance(variant, ModelHandle):
        return variant.name
    return f"variant {index + 1}"


def labelled_variants(variants: Mapping[str, Variant] | Sequence[Variant]) -> list[tuple[str, Variant]]:
    """``(label, variant)`` pairs: a mapping's own labels, else each variant's (a pruned one's
    :attr:`PruneSpec.label <sap_core.pruning.PruneSpec.label>`, ``#2``, ``#3`` on repeats)."""
    if isinstance(variants, Mapping):
        return list(variants.items())
    labels: list[str] = []
    for i, v in enumerate(variants):
        labels.append(numbered(_label_of(v, i), [DENSE, *labels]))
    return list(zip(labels, variants))


def variant_context(handle: ModelHandle, variant: Variant):
    """The model to run and the context that makes it safe to run."""
    if isinstance(variant, ModelHandle):
        return variant, variant.lock
    if isinstance(variant, PrunedVariant):
        return handle, variant.applied(handle)
    raise SapError(f"Cannot compare against {type(variant).__name__}: give PrunedVariant objects or loaded ModelHandles.")


def compare_generations(
    handle: ModelHandle,
    variants: Mapping[str, Variant] | Sequence[Variant],
    prompt: str | list[int],
    spec: DecodeSpec = DecodeSpec(),
    *,
    progress: Progress | None = None,
) -> Comparison:
    """Generate with the dense ``handle`` and with every variant under the same prompt, spec and seed.

    ``variants`` is a mapping ``label -> variant`` or a sequence (labels are then each variant's
    :attr:`~sap_core.pruning.PruneSpec.label`, ``"wanda 50%"``, numbered ``#2`` on a repeat). A variant is a ``PrunedVariant`` (run through
    ``variant.applied(handle)``) or a separately loaded ``ModelHandle`` with the same tokenizer.
    ``progress(done, total, message)`` counts decoding steps across all runs; raising
    :class:`~sap_core.errors.Cancelled` from it stops the comparison with the dense weights restored.
    """
    items = labelled_variants(variants)
    labels = [DENSE] + [label for label, _ in items]
    if len(set(labels)) != len(labels):
        raise SapError(f"Run labels must be unique (got {labels}); pass a mapping label -> variant.")
    prompt_ids = handle.encode(prompt) if isinstance(prompt, str) else [int(i) for i in prompt]
    n_steps = spec.gen_length if handle.causal else spec.steps
    total = n_steps * len(labels)

    def sub_progress(offset: int, label: str) -> Progress:
        def inner(done: int, _total: int, message: str) -> None:
            report(progress, offset + done, total, f"{label}: {message}")

        return inner

    trajectories: list[Trajectory] = []
    for i, label in enumerate(labels):
        if i == 0:
            model, ctx = handle, handle.lock
        else:
            model, ctx = variant_context(handle, items[i - 1][1])
        with ctx if ctx is not None else contextlib.nullcontext():
            traj = generate(model, prompt_ids, spec, progress=sub_progress(i * n_steps, label))
        traj.prompt = prompt if isinstance(prompt, str) else ""
        trajectories.append(traj)

    dense = trajectories[0]
    runs = []
    masked = [False] + [isinstance(v, PrunedVariant) and not isinstance(v, StructuredVariant) for _, v in items]
    for label, traj, is_masked in zip(labels, trajectories, masked):
        runs.append(
            ComparedRun(
                label=label,
                text=handle.decode(traj.generated_ids),
                trajectory=traj,
                divergence_step=divergence_step(dense, traj),
                agreement=position_agreement(dense, traj),
                step_agreement=step_agreement(dense, traj),
                masked=is_masked,
            )
        )
    return Comparison(prompt=prompt if isinstance(prompt, str) else handle.decode(prompt_ids), spec=spec, runs=runs)


# --- perplexity of the dense model and its variants, with paired errors --------------------------

PERPLEXITY_COLUMNS = ["model", "ppl", "ppl_se", "nll", "nll_se", "delta_ppl", "delta_nll", "se_delta", "paired", "z"]


def perplexity_table(
    handle: ModelHandle,
    variants: Mapping[str, Variant] | Sequence[Variant],
    spec: EvalSpec | None = None,
    *,
    metrics: Sequence[Metric] = (),
    progress: Progress | None = None,
) -> pd.DataFrame:
    """Perplexity of the dense ``handle`` (first row, ``model="dense"``) and of every variant, all on
    the same windows and masking draws (:class:`~sap_core.evaluate.Perplexity` with one
    :class:`~sap_core.evaluate.EvalSpec`, default ``EvalSpec()``: the sweep's settings), and each of the
    further ``metrics`` (:class:`~sap_core.evaluate.Metric`), their columns after :data:`PERPLEXITY_COLUMNS`.

    Per variant: ``delta_ppl = ppl - ppl_dense``, ``delta_nll`` (nats/token) and ``se_delta``, the
    standard error of ``delta_nll``: paired draw by draw (:func:`sap_core.evaluate.paired_se`,
    ``paired=True``) when the per-draw estimates are known (masked-diffusion perplexity), else
    ``sqrt(nll_se² + nll_se_dense²)`` (``paired=False``, conservative). ``z = delta_nll / se_delta``.
    ``progress`` counts evaluation batches across all models, the message naming the model.
    """
    scored = (Perplexity(EvalSpec() if spec is None else spec), *metrics)
    for metric in scored:
        metric.validate()
    items = labelled_variants(variants)
    labels = [DENSE] + [label for label, _ in items]
    if len(set(labels)) != len(labels):
        raise SapError(f"Model labels must be unique (got {labels}); pass a mapping label -> variant.")

    def sub_progress(i: int, label: str) -> Progress:
        def inner(done: int, total: int, message: str) -> None:
            report(progress, i * total + done, len(labels) * total, f"{label} ({i + 1}/{len(labels)}): {message}")

        return inner

    rows, dense, extra = [], None, []
    for i, label in enumerate(labels):
        if i == 0:
            model, ctx = handle, handle.lock
        else:
            model, ctx = variant_context(handle, items[i - 1][1])
        with ctx:
            res = score_all(model, scored, progress=sub_progress(i, label))
        c = res.columns
        row = dict(model=label, ppl=c["ppl"], ppl_se=c["ppl_se"], nll=c["nll"], nll_se=c["nll_se"])
        if dense is None:
            dense = res
            row.update(delta_ppl=0.0, delta_nll=0.0, se_delta=float("nan"), paired=False, z=float("nan"))
        else:
            sp = paired_se_if_known(res.estimates, dense.estimates)
            paired = bool(np.isfinite(sp))
            se = sp if paired else float(np.hypot(c["nll_se"], dense.columns["nll_se"]))
            d = c["nll"] - dense.columns["nll"]
            row.update(
                delta_ppl=c["ppl"] - dense.columns["ppl"],
                delta_nll=d,
                se_delta=se,
                paired=paired,
                z=d / se if se > 0 else float("nan"),
            )
        extra = [k for k in c if k not in row and k != "eval_seconds"]
        rows.append(row | {k: c[k] for k in extra})
    return pd.DataFrame(rows, columns=PERPLEXITY_COLUMNS + extra)


def noise_verdict(table: pd.DataFrame, threshold: float = 2.0) -> str:
    """One plain sentence on a :func:`perplexity_table`: which variants differ from the dense model by
    more than ``threshold`` standard errors of the difference, and which are within noise."""
    rest = table[table["model"] != DENSE]
    if rest.empty:
        return "Only the dense model was scored; pick variants to compare."
    beyond = rest[rest["z"].abs() >= threshold]
    within = rest[~(rest["z"].abs() >= threshold)]
    if beyond.empty:
        return (
            f"Every difference from the dense model is within noise (less than {threshold:g} standard errors); "
            "score more windows or draws to tell them apart."
        )
    worse = [f"{r.model} ({r.z:+.1f} SE)" for r in beyond.itertuples()]
    text = "Beyond noise: " + ", ".join(worse) + " (positive: worse than dense)."
    if not within.empty:
        text += " Within noise: " + ", ".join(within["model"]) + "."
    return text
