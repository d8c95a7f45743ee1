"""The sink report of one generation, and the AR-vs-DLM comparison, built from :mod:`sap_core.sinks`.

:func:`analyze` reads a trajectory into a :class:`SinkReport` (per-step scores and sink sets, dominant
positions and centroids, :class:`Instability` per layer, per-position stability and labels, position
states), with its JSON and CSV exports (:meth:`SinkReport.to_json`, :meth:`SinkReport.to_csv`,
:func:`read_csv`); :func:`compare` sets the reports of a causal model and a DLM side by side
(:class:`SinkComparison`). Every statistic is defined once in :mod:`sap_core.sinks` (its module
docstring gives the formulas); this module only assembles and exports them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from sap_core.decoding import decoding_words
from sap_core.detectors import default_detectors, parse_detector, rank_heads
from sap_core.errors import SinkSpecError
from sap_core.sinks import (
    AGGREGATE,
    STATES,
    PositionStats,
    SinkSpec,
    StepMass,
    as_numpy,
    detector_counts,
    detector_scores,
    mass_view,
    position_stats,
    reduce_mass,
    scored,
    valid_mask,
    viewed,
)

# --- what a download is of ---------------------------------------------------------------------


@dataclass(frozen=True)
class Provenance:
    """What an exported file is of, so that it stands alone: the run's model, prompt and settings, in words
    (:func:`provenance` builds it; the JSON export carries it as ``"run"``, the CSV exports as columns)."""

    model: str  # "tiny-dlm · llada · 3.4M parameters"
    prompt: str
    decoding: str  # :func:`run_words`
    sinks: str  # :func:`sink_words`

    def rows(self) -> list[tuple[str, str]]:
        """(name, text) rows, for a page's header."""
        return [("Model", self.model), ("Prompt", self.prompt), ("Decoding", self.decoding), ("Sinks", self.sinks)]

    def line(self, limit: int = 160) -> str:
        """One line (a GIF's caption): model, prompt (newlines as ⏎) and decoding, at most ``limit`` characters."""
        prompt = self.prompt.replace("\n", "⏎")
        text = f"{self.model.split(' · ')[0]} · “{prompt if len(prompt) <= 40 else prompt[:39] + '…'}” · {self.decoding}"
        return text if len(text) <= limit else text[: limit - 1] + "…"


def run_words(spec: Any, causal: bool = False) -> str:
    """A run's decoding spec (:class:`~sap_core.decoding.DecodeSpec`) for people: length, the sampler's settings
    (:func:`~sap_core.decoding.decoding_words`), temperature and seed."""
    return f"{spec.gen_length} tokens · {decoding_words(spec, causal)} · temperature {spec.temperature:g} · seed {spec.seed}"


def rule_words(spec: SinkSpec) -> str:
    """What finds the sinks, for people: the detector, or the official code's rule, with its parameters."""
    if spec.detector != "official":
        return f"{spec.sink_detector.title}, ε = {spec.sink_detector.param:g}"
    if spec.rule == "official":
        return f"official rule, k = {spec.k:g}, alpha = {spec.alpha:g}"
    return f"leave_one_out, ε = {spec.epsilon:g}"


def sink_words(spec: SinkSpec) -> str:
    """A sink spec for people: :func:`rule_words`, tau, the mass view, the layers and heads analysed."""
    return (
        f"{rule_words(spec)}, tau = {spec.tau:g}, {spec.normalize} mass, layers {'all' if spec.layers is None else list(spec.layers)}, "
        f"heads {'all' if spec.heads is None else list(spec.heads)}"
    )


def provenance(handle: Any, trajectory: Any, spec: SinkSpec, variant: str | None = None) -> Provenance:
    """The :class:`Provenance` of a run: ``handle`` (a :class:`~sap_core.models.ModelHandle`: name, family,
    causal, n_params), its trajectory (prompt, decoding spec), the sink settings of the export and, for a pruned
    variant's run, the ``variant`` it is of (its name and how it ran: "wanda 50%, replayed")."""
    causal = bool(handle.causal)
    model = f"{handle.name} · {handle.family}{' (causal)' if causal else ''} · {handle.n_params / 1e6:.1f}M parameters"
    if variant is not None:
        model += f" · pruned variant {variant}"
    return Provenance(model, str(trajectory.prompt), run_words(trajectory.spec, causal), sink_words(spec))


def with_provenance(frame: pd.DataFrame, run: Provenance) -> pd.DataFrame:
    """``frame`` with the run's provenance as its last columns (``model``, ``prompt``, ``decoding``, ``sinks``,
    the same in every row): a CSV that says what it is in any reader."""
    out = frame.copy()
    for name, value in asdict(run).items():
        out[name] = value
    return out


# --- the report ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Instability:
    """Trajectory instability and spatial concentration of one layer (``layer = -1``: aggregate)."""

    layer: int
    dominant_var: float  # Var_t d_t, tokens^2
    dominant_var_norm: float  # Var_t (d_t / L)
    centroid_var: float  # Var_t c_t over steps with a sink, tokens^2 (NaN if none)
    centroid_var_norm: float  # Var_t (c_t / L)
    sink_steps: int  # steps with at least one sink
    entropy: float  # nats, of the mean (viewed) mass distribution
    entropy_norm: float  # entropy / ln(positions)
    top_k_share: float  # share of the mean mass held by the top_k positions


@dataclass(frozen=True, eq=False)
class SinkReport:
    """Everything :func:`analyze` computes (see the module docstring for each definition).

    Per step: ``mass`` ``float32 [S, L]`` (raw mass summed over the selection), ``scores``
    ``float32 [S, L]`` (NaN where a position does not exist), ``is_sink`` ``bool [S, L]``,
    ``dominant`` ``int64 [S]``, ``centroid`` ``float64 [S]`` (NaN: no sink), ``state`` ``int8
    [S, L]`` (index into :data:`STATES`), ``valid`` ``bool [S, L]``. Per layer: ``layer_mass``,
    ``layer_scores`` ``float32 [S, Lsel, L]``, ``layer_is_sink`` ``bool [S, Lsel, L]``,
    ``layer_dominant`` ``int64 [S, Lsel]``, ``layer_centroid`` ``float64 [S, Lsel]`` (column ``i``
    is model layer ``layers[i]``). Per position: ``positions`` (:class:`PositionStats`),
    ``weights`` ``float32 [L]`` (the gated ``w_j``), ``mean_mass`` ``float64 [L]`` (viewed, over the steps at
    which ``j`` exists). Instability: ``aggregate`` and ``per_layer`` (:class:`Instability`).
    """

    spec: SinkSpec
    layers: tuple[int, ...]
    heads: tuple[int, ...]
    causal: bool
    prompt_length: int
    final_tokens: np.ndarray
    decoded_at: np.ndarray
    valid_length: np.ndarray
    valid: np.ndarray
    state: np.ndarray
    mass: np.ndarray
    layer_mass: np.ndarray
    scores: np.ndarray
    is_sink: np.ndarray
    dominant: np.ndarray
    centroid: np.ndarray
    layer_scores: np.ndarray
    layer_is_sink: np.ndarray
    layer_dominant: np.ndarray
    layer_centroid: np.ndarray
    mean_mass: np.ndarray
    positions: PositionStats
    aggregate: Instability
    per_layer: tuple[Instability, ...]
    head_mass: Any = field(default=None, repr=False)  # the trajectory's per-head mass (not a copy), for gu; None from a file

    # shapes and shortcuts
    @property
    def n_steps(self) -> int:
        return int(self.mass.shape[0])

    @property
    def length(self) -> int:
        return int(self.mass.shape[1])

    @property
    def weights(self) -> np.ndarray:
        return self.positions.weight

    @property
    def labels(self) -> np.ndarray:
        return self.positions.label

    def state_names(self, step: int) -> list[str]:
        """The state of every position at ``step``, as strings."""
        if not 0 <= step < self.n_steps:
            raise SinkSpecError(f"step must be in [0, {self.n_steps - 1}] (got {step}).")
        return [STATES[i] for i in self.state[step]]

    def view(self, normalize: str | None = None) -> np.ndarray:
        """The aggregate mass ``float64 [S, L]`` in a view (default: the spec's); 0 where absent."""
        normalize = self.spec.normalize if normalize is None else normalize
        return mass_view(self.mass, normalize, self.valid_length, self.causal)

    def rescore(self, spec: SinkSpec | None = None, **changes) -> SinkReport:
        """A new report with other scoring settings (``k``, ``alpha``, ``tau``, rule, view...),
        recomputed from the reduced mass without the model or the trajectory. The layer and head
        selection must stay the same: changing it needs :func:`analyze` on the trajectory."""
        spec = replace(spec if spec is not None else self.spec, **changes)
        for name, chosen in (("layers", self.layers), ("heads", self.heads)):
            new, old = getattr(spec, name), getattr(self.spec, name)
            if not (new is None and old is None or new is not None and tuple(new) == chosen):
                raise SinkSpecError(
                    f"Changing the {name} selection needs the full mass: call analyze(trajectory, spec) "
                    f"(this report covers {name} {list(chosen)})."
                )
        sm = StepMass(self.layer_mass, self.mass, self.layers, self.heads, self.valid_length, self.causal, self.head_mass)
        return _build(sm, self.prompt_length, self.final_tokens, self.decoded_at, spec)

    # tables
    def positions_frame(self):
        """One row per position: token, prompt flag, decoded_at, existence, mean mass and stability."""
        p = self.positions
        return pd.DataFrame(
            {
                "position": np.arange(self.length, dtype=np.int64),
                "token": self.final_tokens.astype(np.int64),
                "is_prompt": np.arange(self.length) < self.prompt_length,
                "decoded_at": self.decoded_at.astype(np.int64),
                "valid_steps": p.valid_steps,
                "mean_mass": self.mean_mass.astype(np.float64),
                "frequency": p.frequency.astype(np.float64),
                "mean_score": p.mean_score.astype(np.float64),
                "variance": p.variance.astype(np.float64),
                "label": p.label.astype(str),
                "weight": p.weight.astype(np.float64),
            }
        )

    def steps_frame(self):
        """One row per (step, layer): dominant position, centroid, number of sinks (layer -1 = aggregate)."""
        S, n = self.n_steps, len(self.layers)
        layer_ids = np.array([AGGREGATE] + list(self.layers), dtype=np.int64)
        dom = np.concatenate([self.dominant[:, None], self.layer_dominant], axis=1)
        cen = np.concatenate([self.centroid[:, None], self.layer_centroid], axis=1)
        cnt = np.concatenate([self.is_sink.sum(-1)[:, None], self.layer_is_sink.sum(-1)], axis=1)
        return pd.DataFrame(
            {
                "step": np.repeat(np.arange(S, dtype=np.int64), n + 1),
                "layer": np.tile(layer_ids, S),
                "valid_length": np.repeat(self.valid_length.astype(np.int64), n + 1),
                "dominant": dom.reshape(-1).astype(np.int64),
                "centroid": cen.reshape(-1).astype(np.float64),
                "n_sinks": cnt.reshape(-1).astype(np.int64),
            }
        )

    def layers_frame(self):
        """One row per layer (first row: aggregate, layer -1) with the :class:`Instability` figures."""
        rows = [asdict(self.aggregate)] + [asdict(x) for x in self.per_layer]
        frame = pd.DataFrame(rows)
        return frame.astype({"layer": np.int64, "sink_steps": np.int64})

    def scores_frame(self, layer: int | None = None):
        """Long table of one (step, position) per row: state, raw and viewed mass, score, sink flag.
        ``layer`` = a selected model layer, or None for the aggregate."""
        if layer is None or layer == AGGREGATE:
            mass, scores, sink = self.mass, self.scores, self.is_sink
        else:
            if layer not in self.layers:
                raise SinkSpecError(f"layer {layer} was not analysed; analysed layers: {list(self.layers)}.")
            i = self.layers.index(layer)
            mass, scores, sink = self.layer_mass[:, i], self.layer_scores[:, i], self.layer_is_sink[:, i]
        view = mass_view(mass, self.spec.normalize, self.valid_length, self.causal)
        S, L = mass.shape
        return pd.DataFrame(
            {
                "step": np.repeat(np.arange(S, dtype=np.int64), L),
                "position": np.tile(np.arange(L, dtype=np.int64), S),
                "state": np.asarray(STATES, dtype=object)[self.state.reshape(-1)],
                "mass": mass.reshape(-1).astype(np.float64),
                "view": view.reshape(-1),
                "score": scores.reshape(-1).astype(np.float64),
                "is_sink": sink.reshape(-1),
            }
        )

    def to_frames(self) -> dict:
        """``{"positions", "steps", "layers", "scores"}`` DataFrames."""
        return {
            "positions": self.positions_frame(),
            "steps": self.steps_frame(),
            "layers": self.layers_frame(),
            "scores": self.scores_frame(),
        }

    # files
    def to_csv(self, directory: str | Path) -> Path:
        """Write ``positions.csv``, ``steps.csv``, ``layers.csv``, ``scores.csv`` and ``spec.json``
        to ``directory``; :func:`read_csv` loads them back as DataFrames."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for name, frame in self.to_frames().items():
            frame.to_csv(directory / f"{name}.csv", index=False)
        (directory / "spec.json").write_text(json.dumps(self.spec.to_dict(), indent=1))
        return directory

    def to_json(self, path: str | Path) -> Path:
        """Write :meth:`json_text` to ``path``; :meth:`from_json` reads it back."""
        path = Path(path)
        path.write_text(self.json_text())
        return path

    def json_text(self, run: Provenance | None = None) -> str:
        """The report as JSON text (what :meth:`to_json` writes and the app downloads): the spec, the
        trajectory facts and the reduced mass (from which :meth:`from_json` recomputes every field exactly),
        plus the position and layer tables for readers, and ``run`` (model, prompt, settings) when given.
        ``NaN`` is written as ``null``."""
        doc = {
            "format": "sinkscope.sink_report/1",
            **({"run": asdict(run)} if run is not None else {}),
            "spec": self.spec.to_dict(),
            "layers": list(self.layers),
            "heads": list(self.heads),
            "causal": self.causal,
            "prompt_length": self.prompt_length,
            "final_tokens": self.final_tokens.tolist(),
            "decoded_at": self.decoded_at.tolist(),
            "valid_length": self.valid_length.tolist(),
            "mass": self.mass.tolist(),
            "layer_mass": self.layer_mass.tolist(),
            **self._detector_counts(),
            "tables": {
                "positions": json_records(self.positions_frame()),
                "layers": json_records(self.layers_frame()),
            },
        }
        return json.dumps(doc, allow_nan=False)

    def _detector_counts(self) -> dict:
        """``{"detector_counts": ...}`` for a detector that needs the per-head mass (which the file does not keep)."""
        detector = self.spec.sink_detector
        if not detector.needs_heads:
            return {}
        sm = StepMass(self.layer_mass, self.mass, self.layers, self.heads, self.valid_length, self.causal, self.head_mass)
        return {"detector_counts": detector_counts(sm, detector, self.valid).tolist()}

    @classmethod
    def from_json(cls, path: str | Path) -> SinkReport:
        try:
            doc = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise SinkSpecError(
                f"Cannot read a sink report from {path}: {exc}. Pick a file written by SinkReport.to_json."
            ) from None
        if not isinstance(doc, dict) or doc.get("format") != "sinkscope.sink_report/1":
            raise SinkSpecError(f"{path} is not a sink report written by SinkReport.to_json.")
        sm = StepMass(
            layer_mass=np.asarray(doc["layer_mass"], np.float32),
            mass=np.asarray(doc["mass"], np.float32),
            layers=tuple(doc["layers"]),
            heads=tuple(doc["heads"]),
            valid_length=np.asarray(doc["valid_length"], np.int64),
            causal=bool(doc["causal"]),
            head_counts=np.asarray(doc["detector_counts"], np.int64) if "detector_counts" in doc else None,
        )
        return _build(
            sm,
            int(doc["prompt_length"]),
            np.asarray(doc["final_tokens"], np.int64),
            np.asarray(doc["decoded_at"], np.int64),
            SinkSpec.from_dict(doc["spec"]),
        )


def json_records(frame) -> list:
    out = []
    for row in frame.to_dict(orient="records"):
        out.append(
            {
                k: (None if isinstance(v, float) and not np.isfinite(v) else (v.item() if hasattr(v, "item") else v))
                for k, v in row.items()
            }
        )
    return out


def read_csv(directory: str | Path) -> dict:
    """Load what :meth:`SinkReport.to_csv` wrote: the four DataFrames and ``"spec"`` (a SinkSpec)."""
    directory = Path(directory)
    out: dict = {}
    for name in ("positions", "steps", "layers", "scores"):
        file = directory / f"{name}.csv"
        if not file.exists():
            raise SinkSpecError(f"{file} is missing: pick a folder written by SinkReport.to_csv.")
        frame = pd.read_csv(file, keep_default_na=False, na_values=[""])
        if "label" in frame:
            frame["label"] = frame["label"].astype(str)
        if "state" in frame:
            frame["state"] = frame["state"].astype(object)
        out[name] = frame
    out["spec"] = SinkSpec.from_dict(json.loads((directory / "spec.json").read_text()))
    return out


def _states(decoded_at: np.ndarray, valid: np.ndarray) -> np.ndarray:
    S, L = valid.shape
    t = np.arange(S)[:, None]
    d = decoded_at[None, :]
    state = np.where(d > t, STATES.index("masked"), STATES.index("decoded"))
    state = np.where(~valid, STATES.index("absent"), state)
    state = np.where(d == t, STATES.index("decoding"), state)
    state = np.where(np.broadcast_to(d < 0, (S, L)), STATES.index("prompt"), state)
    return state.astype(np.int8)


def _instability(layer: int, dom: np.ndarray, cen: np.ndarray, mean_view: np.ndarray, L: int, top_k: int) -> Instability:
    dom_var = float(np.var(dom.astype(np.float64)))
    have = ~np.isnan(cen)
    cen_var = float(np.var(cen[have])) if have.any() else float("nan")
    exists = ~np.isnan(mean_view)
    p = np.where(exists, mean_view, 0.0)
    total = p.sum()
    n = int(exists.sum())
    if total > 0:
        p = p / total
        nz = p[p > 0]
        entropy = float(-(nz * np.log(nz)).sum())
        top = float(np.sort(p)[::-1][: min(top_k, n)].sum())
    else:
        entropy, top = float("nan"), float("nan")
    entropy_norm = entropy / np.log(n) if n > 1 else 0.0
    return Instability(
        layer, dom_var, dom_var / L**2, cen_var, cen_var / L**2, int(have.sum()), entropy, float(entropy_norm), top
    )


def _build(sm: StepMass, prompt_length: int, final_tokens: np.ndarray, decoded_at: np.ndarray, spec: SinkSpec) -> SinkReport:
    S, nL, L = sm.layer_mass.shape
    valid = valid_mask(S, L, sm.valid_length)
    # aggregate and every layer in one batch: [S, 1 + Lsel, L]
    m = np.concatenate([sm.mass[:, None, :], sm.layer_mass], axis=1).astype(np.float64)
    v = viewed(m, valid, spec.normalize, sm.causal)
    scores, sink = scored(v, valid, spec) if spec.detector == "official" else detector_scores(sm, spec.sink_detector, valid)
    vm = valid[:, None, :]
    pos = np.arange(L, dtype=np.float64)
    dominant = np.argmax(np.where(vm, v, -np.inf), axis=-1).astype(np.int64)  # [S, G]
    w = np.where(sink, v, 0.0)
    wsum = w.sum(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        centroid = np.where(sink.any(-1), (w * pos).sum(-1) / np.where(wsum > 0, wsum, 1.0), np.nan)
    # a sink set whose viewed mass sums to 0 cannot happen for mass >= 0 above mean + k·std, unless all is 0
    count = vm.sum(0)  # [1, L]
    with np.errstate(divide="ignore", invalid="ignore"):
        mean_view = np.where(count > 0, np.where(vm, v, 0.0).sum(0) / np.maximum(count, 1), np.nan)  # [G, L]
    figures = [
        _instability(AGGREGATE if g == 0 else sm.layers[g - 1], dominant[:, g], centroid[:, g], mean_view[g], L, spec.top_k)
        for g in range(nL + 1)
    ]
    positions = position_stats(scores[:, 0], sink[:, 0], spec)
    arrays = dict(
        valid=valid,
        state=_states(decoded_at, valid),
        mass=np.asarray(sm.mass, np.float32),
        layer_mass=np.asarray(sm.layer_mass, np.float32),
        scores=scores[:, 0].astype(np.float32),
        is_sink=sink[:, 0],
        dominant=dominant[:, 0],
        centroid=centroid[:, 0],
        layer_scores=scores[:, 1:].astype(np.float32),
        layer_is_sink=sink[:, 1:],
        layer_dominant=dominant[:, 1:],
        layer_centroid=centroid[:, 1:],
        mean_mass=mean_view[0],
    )
    return SinkReport(
        spec=spec,
        layers=tuple(sm.layers),
        heads=tuple(sm.heads),
        causal=bool(sm.causal),
        prompt_length=int(prompt_length),
        final_tokens=np.asarray(final_tokens, np.int64),
        decoded_at=np.asarray(decoded_at, np.int64),
        valid_length=np.asarray(sm.valid_length, np.int64),
        positions=positions,
        aggregate=figures[0],
        per_layer=tuple(figures[1:]),
        head_mass=sm.source,
        **arrays,
    )


def analyze(trajectory: Any, spec: SinkSpec = SinkSpec(), detector: Any = None) -> SinkReport:
    """Analyse the sinks of a trajectory (any object with the fields of
    :class:`sap_core.decoding.Trajectory`). Pure computation on its arrays; no model is run. ``detector``
    (``NAME[:PARAM]`` text or a :class:`~sap_core.detectors.Detector`), when given, replaces ``spec.detector``."""
    if not isinstance(spec, SinkSpec):
        raise SinkSpecError(f"spec must be a SinkSpec (got {type(spec).__name__}).")
    if detector is not None:
        spec = replace(spec, detector=detector)
    sm = reduce_mass(trajectory, spec)
    S, _, L = sm.layer_mass.shape
    decoded_at = as_numpy(trajectory.decoded_at, np.int64).reshape(-1)
    final_tokens = as_numpy(trajectory.final_tokens, np.int64).reshape(-1)
    if decoded_at.shape[0] != L or final_tokens.shape[0] != L:
        raise SinkSpecError(f"decoded_at and final_tokens must have {L} entries, one per position of the mass.")
    valid_mask(S, L, sm.valid_length)  # range check with a clear message
    return _build(sm, int(trajectory.prompt_length), final_tokens, decoded_at, spec)


# --- AR vs DLM ----------------------------------------------------------------------------------

COMPARE_METRICS = (
    "dominant_var",
    "dominant_var_norm",
    "centroid_var",
    "centroid_var_norm",
    "sink_steps",
    "entropy_norm",
    "top_k_share",
)
# Readable names of the :class:`Instability` figures, for tables and axes.
METRIC_TITLES = {
    "dominant_var": "Var(dominant position) (tokens²)",
    "dominant_var_norm": "Var(dominant position / length)",
    "centroid_var": "Var(sink centroid) (tokens²)",
    "centroid_var_norm": "Var(sink centroid / length)",
    "sink_steps": "Steps with a sink",
    "entropy_norm": "Normalised entropy of the mean mass",
    "top_k_share": "Top-k mass share",
}


@dataclass(frozen=True, eq=False)
class SinkComparison:
    """Two reports scored the same way (same rule, parameters and view), e.g. AR against DLM."""

    labels: tuple[str, str]
    reports: tuple[SinkReport, SinkReport]
    same_prompt: bool

    def frame(self):
        """Per-layer instability side by side: one row per layer (first: aggregate, layer -1),
        columns ``<label>_<metric>`` for :data:`COMPARE_METRICS`. Layers only one model has are NaN there."""
        parts = []
        for label, report in zip(self.labels, self.reports):
            f = report.layers_frame().set_index("layer")[list(COMPARE_METRICS)]
            parts.append(f.add_prefix(f"{label}_"))
        out = pd.concat(parts, axis=1, join="outer")
        order = [AGGREGATE] + sorted(i for i in out.index if i != AGGREGATE)
        return out.loc[order].reset_index()

    def readable_frame(self):
        """:meth:`frame` with readable column names (``"<label>: <title>"``) and layer ``"all"`` for the aggregate."""
        frame = self.frame()
        names = {"layer": "Layer"}
        for label in self.labels:
            names.update({f"{label}_{m}": f"{label}: {METRIC_TITLES[m]}" for m in COMPARE_METRICS})
        frame["layer"] = ["all" if x == AGGREGATE else str(int(x)) for x in frame["layer"]]
        return frame.rename(columns=names)

    def summary(self) -> dict:
        """The aggregate figures of both reports, keyed by label."""
        return {label: asdict(r.aggregate) for label, r in zip(self.labels, self.reports)}


def compare(
    first: Any,
    second: Any,
    spec: SinkSpec | None = None,
    normalize: str | None = None,
    labels: Sequence[str] = ("AR", "DLM"),
) -> SinkComparison:
    """Compare two trajectories or reports (e.g. AR against DLM on the same prompt).

    Both are scored with ``spec`` (default: the first report's spec, or :class:`SinkSpec`) in the
    view ``normalize`` (default None: ``spec.normalize``, which is ``"raw"`` unless chosen otherwise,
    so each side's figures equal :func:`analyze` of that trajectory under ``spec``: the numbers of
    its own Sink stability page). The normalised views are options; :data:`VIEW_NOTES` says what
    each corrects and distorts. Trajectories are analysed with ``spec``; reports are rescored with
    it and keep their own layer and head selection.
    """
    if len(labels) != 2 or labels[0] == labels[1]:
        raise SinkSpecError("labels must be two different names, e.g. ('AR', 'DLM').")
    if spec is None:
        spec = first.spec if isinstance(first, SinkReport) else SinkSpec()
    if normalize is not None:
        spec = replace(spec, normalize=normalize)
    reports = []
    for item in (first, second):
        if isinstance(item, SinkReport):
            reports.append(item.rescore(replace(spec, layers=item.spec.layers, heads=item.spec.heads)))
        else:
            reports.append(analyze(item, spec))
    a, b = reports
    P = min(a.prompt_length, b.prompt_length)
    same = a.prompt_length == b.prompt_length and bool(np.array_equal(a.final_tokens[:P], b.final_tokens[:P]))
    return SinkComparison((str(labels[0]), str(labels[1])), (a, b), same)


# --- detectors side by side -----------------------------------------------------------------------------------


def ranked_heads(trajectory: Any) -> pd.DataFrame:
    """The heads of a recorded run ranked by their sink score (:func:`sap_core.detectors.rank_heads` over the
    trajectory's per-head mass ``[S, layers, heads, L]``, each step over its valid positions): ``rank``, ``layer``,
    ``head``, ``position`` (where the head's sink is), ``score`` (the mean attention a query gives it there)."""
    if trajectory.mass is None:
        raise SinkSpecError("This trajectory has no attention record; generate it with the attention recorded.")
    S, _, _, L = trajectory.mass.shape
    return rank_heads(trajectory.mass, valid_mask(S, L, trajectory.valid_length))


def detector_agreement(trajectory: Any, spec: SinkSpec = SinkSpec(), detectors: Sequence[Any] | None = None):
    """How far the sink sets of several detectors agree on one run: one row per (layer, first, second)
    detector pair, ``layer`` -1 for the aggregate, ``jaccard`` = |A ∩ B| / |A ∪ B| of their (step, position)
    sink flags in that layer (1 when both are empty: the same, empty set). Symmetric, 1 on the diagonal.
    ``detectors``: ``NAME[:PARAM]`` texts or :class:`~sap_core.detectors.Detector` objects (default: one of
    each published definition, :func:`sap_core.detectors.default_detectors`); names are ``str(detector)``."""
    chosen = [parse_detector(d) for d in (default_detectors() if detectors is None else detectors)]
    names = [str(d) for d in chosen]
    if len(set(names)) != len(names):
        raise SinkSpecError(f"detectors lists one twice ({names}); list each once.")
    flags = []
    for d in chosen:
        report = analyze(trajectory, spec, detector=d)
        flags.append(np.concatenate([report.is_sink[:, None, :], report.layer_is_sink], axis=1))  # [S, 1 + Lsel, L]
    layer_ids = [AGGREGATE] + list(report.layers)
    rows = []
    for g, layer in enumerate(layer_ids):
        for i, a in enumerate(names):
            for j, b in enumerate(names):
                fa, fb = flags[i][:, g], flags[j][:, g]
                union = int((fa | fb).sum())
                rows.append((layer, a, b, (fa & fb).sum() / union if union else 1.0))
    frame = pd.DataFrame(rows, columns=["layer", "first", "second", "jaccard"])
    return frame.astype({"layer": np.int64, "jaccard": np.float64})
