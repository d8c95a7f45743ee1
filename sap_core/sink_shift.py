"""Did pruning move the sinks? The sinks of a pruned variant set step by step against the dense model's.

Two ways to compare, named as the app and the CLI name them (:data:`MODES`):

* ``"replayed"``: the dense model decodes the prompt; the variant is then run on the dense trajectory's
  own input at every step (the same partially masked sequence; for a causal model the same prefix), one
  forward pass per step, and its attention recorded. Any change in where attention goes comes from the
  pruning alone. Cost: one variant forward pass per step, about one generation (``bench/sink_shift_cost.py``).
* ``"free-running"``: each model decodes the prompt itself with the same :class:`~sap_core.decoding.DecodeSpec`
  (same seed); once their tokens differ their inputs differ too, so the comparison mixes the pruning's effect
  on attention with its effect on the text. Cost: one generation of the variant.

For each step ``t`` and each group ``g`` (group 0: the aggregate over the :class:`~sap_core.sinks.SinkSpec`'s
selected layers, summed as :func:`sap_core.sinks.reduce_mass` sums them; then each selected layer) the sink
sets ``A_t`` (dense) and ``B_t`` (variant) are those :func:`sap_core.sink_sets.layer_sink_flags` finds in each
model's per-head mass, and :class:`SinkShift` keeps

* ``jaccard[t, g] = |A ∩ B| / |A ∪ B|`` (1 when both are empty: nothing moved);
* ``same_dominant[t, g]``: whether ``argmax_j m_t(j)`` (first on ties) is the same position in both;
* ``sink_mass_change[t, g]``: the share of the group's mass its own sinks receive, variant minus dense
  (``sum_{j in B} m'_t(j) / sum_j m'_t(j) - sum_{j in A} m_t(j) / sum_j m_t(j)``).

Summed over the trajectory (:meth:`SinkShift.summary`): the mean over steps of each (the share of steps for
``same_dominant``). The variant is applied with ``variant.applied(handle)`` (under the model's lock); a
variant pruned from another model is refused with one line before any work.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from sap_core.attention import AttentionRecorder
from sap_core.decoding import DecodeSpec, Trajectory, take_pass
from sap_core.diffusion import generate
from sap_core.errors import SapError
from sap_core.progress import Progress, report
from sap_core.sink_report import analyze, json_records
from sap_core.sink_sets import layer_sink_flags
from sap_core.sinks import AGGREGATE, SinkSpec
from sap_core.sinkstats import mean_se, report_statistics

REPLAYED, FREE_RUNNING = "replayed", "free-running"
MODES = {
    REPLAYED: "Replayed: the variant reads the dense model's input at every step (the change is the pruning's alone)",
    FREE_RUNNING: "Free-running: each model decodes the prompt itself, same seed and settings",
}
MEASURES = {
    "jaccard": "Sink-set overlap (Jaccard)",
    "same_dominant": "Steps with the same dominant position (share)",
    "sink_mass_change": "Change of the mass share on the sinks (variant − dense)",
}
VARIANCE_CHANGE = "dominant_var_change"  # the paper's statistic, Var_t(d_t) of the aggregate, variant − dense


class SinkShiftError(SapError):
    """Impossible settings for the sink-shift comparison."""


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise SinkShiftError(f"mode must be one of {', '.join(MODES)} (got {mode!r}).")
    return mode


def check_variant(handle, variant) -> None:
    """One line now when ``variant`` cannot be applied to ``handle`` (pruned from another model)."""
    if not hasattr(variant, "applied"):
        raise SinkShiftError(f"A variant is a PrunedVariant (from prune or load_variant), not a {type(variant).__name__}.")
    with variant.applied(handle):  # the fingerprint and shape checks; nothing runs
        pass


def group_mass(mass: np.ndarray, spec: SinkSpec, n_layers: int, n_heads: int) -> tuple[np.ndarray, tuple[int, ...]]:
    """``float64 [S, 1 + Lsel, H, L]``: the per-head mass of the aggregate (the selected layers summed) and of each
    selected layer, and the selected layers."""
    layers, _ = spec.resolve(n_layers, n_heads)
    m = np.asarray(mass, np.float64)[:, list(layers)]
    return np.concatenate([m.sum(1, keepdims=True), m], axis=1), layers


@dataclass(frozen=True, eq=False)
class SinkShift:
    """The comparison of one prompt (see the module docstring). ``groups``: ``(-1, *layers)``; per step and group:
    ``jaccard`` float64 ``[S, G]``, ``same_dominant`` bool ``[S, G]``, ``sink_mass_change`` float64 ``[S, G]``;
    ``dense_flags`` / ``variant_flags``: bool ``[S, G, L]`` (the sink sets); ``dense`` and ``variant``: the two
    trajectories (replayed: the variant's holds the dense tokens and its own mass); ``seconds``: the variant's
    forward passes (replayed) or generation (free-running)."""

    mode: str
    label: str
    groups: tuple[int, ...]
    jaccard: np.ndarray
    same_dominant: np.ndarray
    sink_mass_change: np.ndarray
    dense_flags: np.ndarray
    variant_flags: np.ndarray
    dense: Trajectory
    variant: Trajectory
    seconds: float

    def summary(self) -> pd.DataFrame:
        """One row per group (``layer``; -1 the aggregate): the mean over steps of each of :data:`MEASURES`."""
        rows = []
        for g, layer in enumerate(self.groups):
            rows.append(
                {
                    "layer": int(layer),
                    "jaccard": float(self.jaccard[:, g].mean()),
                    "same_dominant": float(self.same_dominant[:, g].mean()),
                    "sink_mass_change": float(self.sink_mass_change[:, g].mean()),
                }
            )
        return pd.DataFrame(rows)

    def differs(self, step: int, group: int = 0) -> np.ndarray:
        """``bool [L]``: positions that are a sink in one model and not the other at ``step``."""
        return self.dense_flags[step, group] ^ self.variant_flags[step, group]


def replay(handle, trajectory: Trajectory, progress: Progress | None = None) -> np.ndarray:
    """``float32 [S, layers, heads, L]``: the mass of ``handle`` as it is now (run it inside ``variant.applied``)
    on every step's input of ``trajectory`` (the conditional pass), one forward pass per step."""
    S, L = trajectory.tokens.shape
    out = None
    with torch.inference_mode():
        for t in range(S):
            n = int(trajectory.valid_length[t])
            recorder = AttentionRecorder()
            recorder.start_pass()
            handle.logits(torch.as_tensor(trajectory.tokens[t, :n])[None], recorder)
            step = take_pass(recorder)
            if out is None:
                out = np.zeros((S,) + step.shape[:-1] + (L,), np.float32)
            out[t, ..., :n] = step
            report(progress, t + 1, S, f"replayed step {t + 1}/{S}")
    return out


def _measures(dense: Trajectory, variant: Trajectory, spec: SinkSpec, n_layers: int, n_heads: int):
    md, groups = group_mass(dense.mass, spec, n_layers, n_heads)
    mv, _ = group_mass(variant.mass, spec, n_layers, n_heads)
    valid = np.asarray(dense.valid_length)[:, None]  # the same lengths in both (same spec)
    fd = layer_sink_flags(md, spec, valid, dense.causal)
    fv = layer_sink_flags(mv, spec, valid, dense.causal)
    union = (fd | fv).sum(-1)
    jaccard = np.where(union > 0, (fd & fv).sum(-1) / np.maximum(union, 1), 1.0)
    heads = list(spec.heads) if spec.heads is not None else slice(None)
    rd, rv = md[:, :, heads].sum(2), mv[:, :, heads].sum(2)  # [S, G, L], 0 beyond valid_length
    same = rd.argmax(-1) == rv.argmax(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        share_d = np.where(fd, rd, 0).sum(-1) / rd.sum(-1)
        share_v = np.where(fv, rv, 0).sum(-1) / rv.sum(-1)
    return (AGGREGATE, *groups), jaccard, same, np.nan_to_num(share_v - share_d), fd, fv


def sink_shift(
    handle,
    variant,
    prompt,
    decode: DecodeSpec = DecodeSpec(),
    sink: SinkSpec = SinkSpec(),
    mode: str = REPLAYED,
    dense: Trajectory | None = None,
    label: str | None = None,
    progress: Progress | None = None,
) -> SinkShift:
    """Compare ``variant``'s sinks with the dense ``handle``'s on ``prompt`` (text or token ids) in ``mode``.
    ``dense``: the dense trajectory with mass when already decoded (reused, not decoded again). Every setting
    and the variant are checked before any decoding."""
    check_mode(mode)
    sink.resolve(handle.n_layers, handle.n_heads)
    check_variant(handle, variant)
    if dense is None:
        dense = generate(handle, prompt, decode, recorder=AttentionRecorder())
    elif dense.mass is None:
        raise SinkShiftError("The dense trajectory has no attention mass; decode it with a recorder.")
    t0 = time.perf_counter()
    with variant.applied(handle):
        if mode == REPLAYED:
            other = dataclasses.replace(dense, mass=replay(handle, dense, progress))
        else:
            other = generate(handle, prompt, dense.spec, recorder=AttentionRecorder(), progress=progress)
    seconds = time.perf_counter() - t0
    groups, jac, same, change, fd, fv = _measures(dense, other, sink, handle.n_layers, handle.n_heads)
    name = label or getattr(variant, "label", None) or variant.spec.label
    return SinkShift(mode, str(name), groups, jac, same, change, fd, fv, dense, other, seconds)


# --- across prompts -------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class ShiftStats:
    """:func:`run_shift_stats`'s result. ``per_prompt``: one row per (prompt, variant, layer) with :data:`MEASURES`
    and, for the aggregate row (``layer = -1``), ``dominant_var_dense``, ``dominant_var_variant`` and
    :data:`VARIANCE_CHANGE` (the paper's ``Var_t(d_t)``, variant − dense, paired by prompt)."""

    mode: str
    labels: tuple[str, ...]
    prompts: tuple[str, ...]
    decode: DecodeSpec
    sink: SinkSpec
    per_prompt: pd.DataFrame
    seconds: float
    dense_seconds: float
    variant_seconds: float

    @property
    def n_prompts(self) -> int:
        return len(self.prompts)

    def summary(self) -> pd.DataFrame:
        """Long table: one row per (variant, layer, statistic) with ``mean``, ``se`` (over prompts, ``ddof = 1``), ``n``."""
        rows = []
        for (label, layer), part in self.per_prompt.groupby(["variant", "layer"], sort=False):
            for stat in (*MEASURES, "dominant_var_dense", "dominant_var_variant", VARIANCE_CHANGE):
                values = part[stat].dropna().to_numpy(float)
                if values.size:
                    mean, se = mean_se(values)
                    rows.append(
                        {"variant": label, "layer": int(layer), "statistic": stat, "mean": mean, "se": se, "n": int(values.size)}
                    )
        return pd.DataFrame(rows)

    def table(self, layer: int = AGGREGATE) -> pd.DataFrame:
        """Readable: a row per variant, ``mean ± SE`` per statistic of ``layer``."""
        s = self.summary()
        s = s[s["layer"] == layer]
        out = []
        for label in self.labels:
            part = s[s["variant"] == label].set_index("statistic")
            out.append({"variant": label} | {k: f"{part.loc[k, 'mean']:.3g} ± {part.loc[k, 'se']:.2g}" for k in part.index})
        return pd.DataFrame(out)

    def to_dict(self) -> dict:
        return {
            "format": "sinkscope.sink_shift/1",
            "mode": self.mode,
            "variants": list(self.labels),
            "n_prompts": self.n_prompts,
            "seconds": self.seconds,
            "replay_cost": {"dense_generation_s": self.dense_seconds, "variant_s": self.variant_seconds},
            "decode": dataclasses.asdict(self.decode),
            "sink": self.sink.to_dict(),
            "prompts": list(self.prompts),
            "summary": json_records(self.summary()),
            "per_prompt": json_records(self.per_prompt),
        }


def run_shift_stats(
    handle,
    variants: Mapping[str, object],
    prompts: Sequence[str],
    decode: DecodeSpec = DecodeSpec(),
    sink: SinkSpec = SinkSpec(),
    mode: str = REPLAYED,
    progress: Progress | None = None,
) -> ShiftStats:
    """:func:`sink_shift` of every variant on every prompt (the dense trajectory decoded once per prompt and shared),
    reduced to per-prompt rows at once. Everything is checked before any decoding."""
    check_mode(mode)
    if not variants:
        raise SinkShiftError("Give at least one variant (--variant DIR, or --methods with --sparsity).")
    prompts = [str(p) for p in prompts]
    if len(prompts) < 2:
        raise SinkShiftError("Give at least 2 prompts: a standard error needs two.")
    sink.resolve(handle.n_layers, handle.n_heads)
    for v in variants.values():
        check_variant(handle, v)
    for p in prompts:
        decode.validate(handle.causal, len(handle.encode(p)), handle.max_length, handle.family)
    rows, start, dense_s, variant_s = [], time.perf_counter(), 0.0, 0.0
    total = len(prompts) * (1 + len(variants))
    for i, prompt in enumerate(prompts):
        t0 = time.perf_counter()
        dense = generate(handle, prompt, decode, recorder=AttentionRecorder())
        dense_s += time.perf_counter() - t0
        base = report_statistics(analyze(dense, sink))[0]["dominant_var"]
        report(progress, i * (1 + len(variants)) + 1, total, f"prompt {i + 1}/{len(prompts)}: dense")
        for k, (label, v) in enumerate(variants.items()):
            shift = sink_shift(handle, v, prompt, decode, sink, mode, dense=dense, label=label)
            variant_s += shift.seconds
            var = report_statistics(analyze(shift.variant, sink))[0]["dominant_var"]
            for row in shift.summary().to_dict("records"):
                extra = {}
                if row["layer"] == AGGREGATE:
                    extra = {"dominant_var_dense": base, "dominant_var_variant": var, VARIANCE_CHANGE: var - base}
                rows.append({"prompt": i, "variant": label, **row, **extra})
            report(progress, i * (1 + len(variants)) + 2 + k, total, f"prompt {i + 1}/{len(prompts)}: {label}")
    frame = pd.DataFrame(rows)
    return ShiftStats(mode, tuple(variants), tuple(prompts), decode, sink, frame, time.perf_counter() - start, dense_s, variant_s)


__all__ = [
    "FREE_RUNNING",
    "MEASURES",
    "MODES",
    "REPLAYED",
    "VARIANCE_CHANGE",
    "ShiftStats",
    "SinkShift",
    "SinkShiftError",
    "check_variant",
    "replay",
    "run_shift_stats",
    "sink_shift",
]
