"""Attention sinks over a generation trajectory: the math (spec, mass views, scores, the variance gate, the pruner's factors).

Every statistic SinkScope shows about sinks is defined here, once; :mod:`sap_core.sink_report` assembles
them into the report of one generation (:class:`~sap_core.sink_report.SinkReport`, :func:`~sap_core.sink_report.analyze`,
its JSON/CSV) and the AR-vs-DLM comparison (:func:`~sap_core.sink_report.compare`). Shapes use ``S`` steps,
``Ly`` layers, ``H`` heads, ``L`` positions (prompt + generation); ``Lsel`` is the number of
selected layers. The input is a :class:`sap_core.decoding.Trajectory` (or any object with the same
fields), whose ``mass[t, l, h, j]`` is the attention mass key ``j`` receives at step ``t`` in layer
``l``, head ``h``: the sum over queries of the softmax probabilities. Only positions
``j < valid_length[t]`` exist at step ``t`` (all of them for a DLM; the tokens fed so far for a
causal model decoding token by token); every statistic below is taken over the valid positions.

Mass
    ``m_t(j) = sum over the selected layers l, heads h and all queries i of A_t^(l,h)[i, j]``
    (:func:`reduce_mass`). With the default selection (all layers, all heads) this is exactly the
    quantity the official Sink-Aware Pruning code sums (``attn_probs.sum(dim=2).sum(dim=1)`` added
    over every block). Per layer, ``m_t^(l)(j)`` is the same sum restricted to layer ``l``.

Views of the mass (``SinkSpec.normalize``); each divides ``m_t(j)`` by a baseline ``b_t(j)``:
    * ``"raw"``: ``b = 1``. The official code's view and the default.
    * ``"uniform"``: ``b_t = (sum_j m_t(j)) / n_t``, the mass every key would get if the total
      were spread evenly over the ``n_t`` valid positions. The value is a multiple of the uniform
      mass (1 = average). Scores and sets under the official rule do not change with a per-step
      scale of the mass *except* through ``alpha``, which multiplies a mass difference.
    * ``"per_query"``: ``b_t(j) = q_t(j) * total_t / n_t**2`` with ``q_t(j)`` the number of queries
      that can attend to key ``j`` (``n_t - j`` for a causal model, ``n_t`` otherwise). The value is
      the mean attention probability ``j`` receives from a query that can see it, as a multiple of
      ``1 / n_t``. For a bidirectional model it equals ``"uniform"``.
    * ``"expected"`` (beyond the issue text): ``b_t(j) = e_t(j) * total_t / n_t`` with
      ``e_t(j) = sum over queries i that see j of 1 / (number of keys i sees)``, i.e. the mass ``j``
      would receive if every query attended uniformly to what it may see; causal:
      ``e_t(j) = H(n_t) - H(j)`` (harmonic numbers). The value is 1 for uniform attention at every
      position, causal or not. ``"per_query"`` alone still favours key 0 by a factor
      ``H(n) ~ ln n`` under uniform causal attention (early queries split their probability over
      fewer keys). :data:`VIEW_NOTES` says, for people, what each view corrects and what it
      distorts; :func:`sap_core.sink_report.compare` uses the spec's view, ``"raw"`` by default, so that an AR-vs-DLM
      comparison shows the very numbers of each model's own analysis.

Sink score and sink set at step t (``SinkSpec.rule``); ``mean_t`` and ``std_t`` are the mean and the
population standard deviation of the (viewed) mass over the valid positions of step ``t``:
    * ``"official"`` (default): ``s_t(j) = sigmoid(alpha * (m_t(j) - (mean_t + k * std_t)))``,
      ``k = 2``, ``alpha = 5``, exactly the official ``_compute_sink_mask``. ``j`` *is a sink at
      step t* when ``s_t(j) > 0.5``, i.e. ``m_t(j) > mean_t + k * std_t`` (up to a rounding
      tolerance of ``1e-6 * mean_t``). Uniform mass gives ``s = 0.5`` everywhere and no sink.
    * ``"leave_one_out"``: the hard rule of the paper's pipeline figure: ``j`` is a sink when
      ``m_t(j) > mean of m_t(i) over the other valid positions i != j + epsilon * u_t``, and
      ``s_t(j)`` is 1 for a sink and 0 otherwise. ``u_t = total_t / n_t`` is the uniform mass: the
      project expresses the margin in units of it so that one ``epsilon`` fits every model, length
      and layer selection (the figure leaves the unit open). The default ``epsilon = 0.5``
      reproduces the figure's example (masses 5, 18, 9, 22, 7: sinks at 18 and 22).
    Scores of positions that do not exist at step ``t`` are NaN.

Dominant sink and centroid (per step, for the aggregate and for each layer)
    ``d_t = argmax_j m_t(j)`` over the valid positions (first on ties), in the chosen view.
    ``c_t = sum_{j in sinks_t} m_t(j) * j / sum_{j in sinks_t} m_t(j)``, the mass-weighted centroid
    of the sink set; NaN at a step with no sink. Per layer, the sink set uses the same rule on
    ``m_t^(l)``.

Trajectory instability (:class:`~sap_core.sink_report.Instability`, per layer and for the aggregate)
    ``dominant_var = Var_t(d_t)`` (population variance over all steps, tokens^2) and
    ``centroid_var = Var_t(c_t)`` over the steps with a sink; ``*_norm`` are the same for the
    relative position ``d_t / L`` (``= Var / L**2``), comparable across lengths. This is what the
    paper means by "the attention-sink position exhibits substantially higher variance over the
    full generation trajectory".

Spatial concentration (in :class:`~sap_core.sink_report.Instability`)
    ``p_j`` is the mean over the steps at which ``j`` exists of its viewed mass, normalised to sum to
    1. ``entropy = -sum_j p_j ln p_j`` (nats), ``entropy_norm = entropy / ln(n)`` over the ``n``
    positions that ever exist (1 = flat, 0 = one position holds everything), and ``top_k_share``,
    the share of ``p`` held by the ``SinkSpec.top_k`` largest positions.

Per-position stability (from the aggregate scores, over the steps at which ``j`` exists)
    ``frequency f_j`` = share of steps at which ``j`` is a sink; ``mean_score`` = ``mean_t s_t(j)``;
    ``variance v_j = Var_t(s_t(j))`` (population). Labels (:data:`LABELS`), with ``tau`` the
    variance threshold and ``phi = SinkSpec.stable_min_frequency`` (0.5: "a sink at most steps"):
        * ``"unstable"``: a sink at some step and ``v_j >= tau``;
        * ``"stable"``: ``f_j >= phi`` and ``v_j < tau``;
        * ``"transient"``: a sink at some step (``0 < f_j < phi``) and ``v_j < tau``;
        * ``"none"``: never a sink.
    The variance gate is the project's extension: the official code computes no variance and
    treats every sink as prunable. ``tau = 0`` makes every sink unstable (``v_j >= 0``); a position that
    is never a sink is ``"none"`` at every tau.

Down-weighting factors for the pruner (:func:`step_factors`, :func:`mean_factors`; the positions they
lower come from :func:`factor_gate` with a method row's ``factors``, explicit and never inferred from ``tau``)
    * official rule (``"official"``: every position): ``w_j = 1 - mean_score_j``, exactly the official
      ``prune_sink_sparsegpt`` weight ``1 - mean over the sampled steps of the soft sink mask``, which
      also down-weights positions whose soft score stays below 0.5 (by that small score); per step,
      ``1 - s_t(j)``, the factor the official Wanda-style ``prune_sink`` multiplies into each step's
      activations.
    * variance gate (``"gated"``, the project's extension): ``w_j = 1 - g_j * mean_score_j`` and
      ``1 - g_j * s_t(j)`` with the gate ``g_j = 1`` exactly when ``j`` is an unstable sink (a sink at
      some step and ``v_j >= tau``, :func:`variance_gate`), 0 otherwise. A non-sink never passes the
      gate, at any tau; at ``tau = 0`` it opens for every sink position, so the gated factors differ from
      the official ones exactly at the positions that are never a sink (where the official rule still
      applies their small soft scores).
    * none (``"none"``: noised_wanda): 1 everywhere.

Position states (:data:`STATES`, ``SinkReport.state[t, j]``), so that views can split by them:
``"prompt"`` (``decoded_at == -1``), ``"decoding"`` (decoded by step ``t``: ``decoded_at == t``;
masked in that step's input for a DLM; for a causal model the position step ``t`` outputs, not yet
fed), ``"absent"`` (``j >= valid_length[t]``), ``"masked"`` (decoded later), ``"decoded"``
(decoded earlier), first match in that order.

Cost: the only pass over the ``[S, Ly, H, L]`` mass is its sum over heads (:func:`reduce_mass`),
cached per (mass array, layer and head selection); changing ``k``, ``alpha``, ``epsilon``, ``tau``,
the rule or the view re-scores the reduced ``[S, Lsel, L]`` arrays only (:meth:`sap_core.sink_report.SinkReport.rescore`).
"""

from __future__ import annotations

import numbers
import threading
import weakref
from collections import OrderedDict
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

from sap_core.detectors import OFFICIAL, Detector, LeaveOneOut, Official, leave_one_out_rule, official_rule, parse_detector
from sap_core.errors import SapError, SinkSpecError

RULES = ("official", "leave_one_out")
VIEWS = ("raw", "uniform", "per_query", "expected")
# Human-readable title and (what it corrects, what it distorts) of each view, for pages and docs.
VIEW_NOTES = {
    "raw": (
        "Raw mass (the paper's view)",
        "Nothing is corrected: this is the mass the official Sink-Aware Pruning code sums, and the view of the "
        "Sink stability page.",
        "A causal model's early keys are seen by more queries, so under the causal triangle key 0 collects the most "
        "mass even without a learned sink.",
    ),
    "uniform": (
        "Multiple of the uniform mass",
        "Divides each step's mass by its mean, so steps with more positions (an AR model's later steps) and "
        "different layer or head selections are on one scale (1 = average). The dominant position does not change.",
        "Nothing about the causal mask is corrected: for an AR model key 0 still looks like a sink by construction.",
    ),
    "per_query": (
        "Mean probability from the queries that see the key",
        "Divides by the number of queries that can attend to each key, which removes most of the causal "
        "triangle's head start of the early keys.",
        "Under uniform causal attention key 0 is still favoured by about ln n (early queries split their "
        "probability over fewer keys).",
    ),
    "expected": (
        "Multiple of the mass expected under uniform attention",
        "Divides by the mass each key would get if every query attended uniformly to what it may see, so a "
        "causal model's key-0 sink is never an artefact of the mask (1 = no preference).",
        "The newest keys of a causal model expect almost no mass (one or two queries see them), so small "
        "absolute mass there is inflated into large multiples: the AR sink seems to follow the newest token.",
    ),
}
LABELS = ("none", "transient", "stable", "unstable")
STATES = ("prompt", "decoded", "decoding", "masked", "absent")
AGGREGATE = -1  # the ``layer`` value of aggregate rows in tables


# --- spec --------------------------------------------------------------------------------------


def check_tau(tau: Any, error: type[SapError] = SinkSpecError) -> float:
    """The one rule for a variance gate ``tau``: a finite number >= 0 (0 gates every sink, never a
    non-sink). Returns it as a float; anything else raises ``error`` with one line."""
    try:
        value = float(tau)
    except (TypeError, ValueError):
        raise error(f"tau must be a number >= 0 such as 0.05 (got {tau!r}).") from None
    if not (np.isfinite(value) and value >= 0):
        raise error(f"tau must be finite and >= 0 (got {value}); 0 gates every sink.")
    return value


def parse_taus(values: Any, error: type[SapError] = SinkSpecError) -> tuple[float, ...]:
    """A list of taus, from comma-separated text (``"0, 0.01, 0.05"``, as the CLI and the app take it) or
    numbers, each checked by :func:`check_tau`; raises ``error`` with one line."""
    items = [x for x in values.split(",") if x.strip()] if isinstance(values, str) else list(values)
    try:
        taus = tuple(float(x) for x in items)
    except (TypeError, ValueError):
        raise error(f"taus must be comma-separated numbers such as 0, 0.01, 0.05 (got {values!r}).") from None
    return tuple(check_tau(t, error) for t in taus)


_REAL_FIELDS = ("k", "alpha", "epsilon", "stable_min_frequency")
# The range of each bounded field, checked in this order: (field, accepts the value, what it must be, the
# message's end after "(got value)").
_RANGES = (
    ("alpha", lambda v: v > 0, "> 0", "; it is the sigmoid slope, 5 by default."),
    ("epsilon", lambda v: v >= 0, ">= 0", "; it is a margin above the others' mean."),
    ("stable_min_frequency", lambda v: 0 < v <= 1, "in (0, 1]", "; 0.5 means 'a sink at most steps'."),
    ("top_k", lambda v: v >= 1, "a whole number >= 1", "."),  # already an integer (checked with the types)
)


def _index_tuple(name: str, value: Any) -> tuple[int, ...]:
    """A ``layers`` / ``heads`` selection as a tuple of distinct ints (one int is a one-item list);
    anything else raises :class:`SinkSpecError` with one line."""
    if isinstance(value, (int, np.integer)):
        value = (value,)
    try:
        items = tuple(value)
    except TypeError:
        items = (None,)
    if isinstance(value, str) or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in items):
        raise SinkSpecError(f"{name} must be a list of integer indices or None for all (got {value!r}).")
    indices = tuple(int(v) for v in items)
    if not indices:
        raise SinkSpecError(f"{name} is empty: select at least one, or None for all.")
    if len(set(indices)) != len(indices):
        raise SinkSpecError(f"{name} lists an index twice ({list(indices)}); list each once.")
    return indices


@dataclass(frozen=True)
class SinkSpec:
    """Settings of the sink analysis. Defaults reproduce the official Sink-Aware Pruning code.

    * ``rule``: ``"official"`` (soft sigmoid score) or ``"leave_one_out"`` (hard rule of the figure).
    * ``k``, ``alpha``: threshold ``mean + k·std`` and sigmoid slope of the official rule.
    * ``epsilon``: margin of the leave-one-out rule, in units of the step's uniform mass.
    * ``tau``: variance threshold of the stability gate (0: every sink is unstable); read only by the gated
      methods; the official rule has no gate (the ungated methods down-weight every position).
    * ``stable_min_frequency``: a stable sink is a sink at least this share of steps.
    * ``layers``, ``heads``: indices to sum over (None = all); the head selection applies to every
      selected layer.
    * ``normalize``: the mass view scored (:data:`VIEWS`).
    * ``top_k``: positions counted by the top-k mass share.
    * ``detector``: which definition of a sink scores (:mod:`sap_core.detectors`, ``NAME[:PARAM]``):
      ``"official"`` (default) is the rule above with ``k``, ``alpha`` or ``epsilon``; ``"official:2.5"`` sets
      ``k``; ``"gu:0.3"``, ``"rulli:3"``, ``"head:0.3"`` replace the rule (kept as their canonical text).
    """

    rule: str = "official"
    k: float = 2.0
    alpha: float = 5.0
    epsilon: float = 0.5
    tau: float = 0.0
    stable_min_frequency: float = 0.5
    layers: tuple[int, ...] | None = None
    heads: tuple[int, ...] | None = None
    normalize: str = "raw"
    top_k: int = 4
    detector: str = "official"

    def __post_init__(self) -> None:
        for name in ("layers", "heads"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, _index_tuple(name, getattr(self, name)))
        chosen = parse_detector(self.detector)
        if isinstance(chosen, Official):
            if self.detector != "official":  # official:K (or an Official object) sets k
                object.__setattr__(self, "k", chosen.param)
            object.__setattr__(self, "detector", "official")
        elif isinstance(chosen, LeaveOneOut):
            raise SinkSpecError("detector must be official, gu, rulli or head; the leave-one-out rule is rule='leave_one_out'.")
        else:
            object.__setattr__(self, "detector", str(chosen))
        self._check_types()
        self._check_values()

    @property
    def sink_detector(self) -> Detector:
        """The chosen :class:`~sap_core.detectors.Detector`: the spec's rule with its parameters for ``"official"``."""
        if self.detector != "official":
            return parse_detector(self.detector)
        if self.rule == "leave_one_out":
            return LeaveOneOut(self.epsilon)
        return OFFICIAL if (self.k, self.alpha) == (OFFICIAL.param, OFFICIAL.alpha) else Official(self.k, self.alpha)

    def _check_types(self) -> None:
        """Text, number and whole-number fields hold values of their type (one line each, in field order)."""
        for name in ("rule", "normalize"):
            if not isinstance(getattr(self, name), str):
                raise SinkSpecError(f"{name} must be text (got {getattr(self, name)!r}).")
        check_tau(self.tau)
        for name in _REAL_FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise SinkSpecError(f"{name} must be a number (got {value!r}).")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, numbers.Integral):
            raise SinkSpecError(f"top_k must be a whole number >= 1 (got {self.top_k!r}).")

    def _check_values(self) -> None:
        """Each field's value is in its range (the fields' types are already checked)."""
        if self.rule not in RULES:
            raise SinkSpecError(f"rule must be one of {', '.join(RULES)} (got '{self.rule}').")
        if self.normalize not in VIEWS:
            raise SinkSpecError(f"normalize must be one of {', '.join(VIEWS)} (got '{self.normalize}').")
        for name in _REAL_FIELDS:
            if not np.isfinite(float(getattr(self, name))):
                raise SinkSpecError(f"{name} must be a finite number (got {getattr(self, name)}).")
        for name, ok, must, end in _RANGES:
            if not ok(getattr(self, name)):
                raise SinkSpecError(f"{name} must be {must} (got {getattr(self, name)}){end}")

    def to_dict(self) -> dict:
        d = asdict(self)
        for name in ("layers", "heads"):
            d[name] = None if d[name] is None else list(d[name])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> SinkSpec:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise SinkSpecError(f"unknown SinkSpec fields {sorted(unknown)}; known: {sorted(known)}.")
        return cls(**d)

    def resolve(self, n_layers: int, n_heads: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The selected (layers, heads) as explicit index tuples; raises for out-of-range indices."""
        out = []
        for name, sel, n in (("layers", self.layers, n_layers), ("heads", self.heads, n_heads)):
            if sel is None:
                out.append(tuple(range(n)))
                continue
            bad = [i for i in sel if not 0 <= i < n]
            if bad:
                raise SinkSpecError(f"{name} {bad} out of range: the model has {n} {name} (indices 0..{n - 1}).")
            out.append(tuple(sel))
        return out[0], out[1]


# --- mass reduction (the only pass over [S, Ly, H, L]) -----------------------------------------


@dataclass(frozen=True, eq=False)
class StepMass:
    """Mass summed over the selected heads: ``layer_mass`` ``float32 [S, Lsel, L]`` and over the
    selected layers too: ``mass`` ``float32 [S, L]`` (raw view), with the trajectory's
    ``valid_length`` ``int64 [S]`` and ``causal`` flag."""

    layer_mass: np.ndarray
    mass: np.ndarray
    layers: tuple[int, ...]
    heads: tuple[int, ...]
    valid_length: np.ndarray
    causal: bool
    source: Any = None  # the trajectory's per-head mass [S, Ly, H, L] (None when read from a file): for gu
    head_counts: np.ndarray | None = None  # gu's counts [S, 1 + Lsel, L] read from a file (detector_counts)


_CACHE: OrderedDict[tuple, tuple[weakref.ref, np.ndarray, np.ndarray]] = OrderedDict()
_CACHE_LOCK = threading.RLock()  # re-entrant: a weakref callback may fire while it is held
_CACHE_SIZE = 8


def as_numpy(x: Any, dtype=None) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor, without importing torch
        x = x.detach().cpu()
        x = x.float().numpy() if x.is_floating_point() else x.numpy()
    return np.asarray(x, dtype=dtype)


def reduce_mass(trajectory: Any, spec: SinkSpec = SinkSpec()) -> StepMass:
    """Sum ``trajectory.mass`` ``[S, Ly, H, L]`` over the selected heads (per layer) and layers.

    The result is cached per (mass object, selection): the cache assumes the mass array is not
    modified in place afterwards. Raises :class:`SinkSpecError` if the trajectory has no mass.
    """
    source, valid_length = _mass_of(trajectory)
    _, Ly, H, _ = source.shape
    layers, heads = spec.resolve(Ly, H)
    key = (id(source), tuple(source.shape), layers, heads)
    hit = _cached(key, source)
    if hit is not None:
        return StepMass(hit[0], hit[1], layers, heads, valid_length, bool(trajectory.causal), source)
    layer_mass, mass = _sum_selection(source, layers, heads)
    _remember(key, source, layer_mass, mass)
    return StepMass(layer_mass, mass, layers, heads, valid_length, bool(trajectory.causal), source)


def _cached(key: tuple, source: Any) -> tuple | None:
    """The cached pair of ``key`` while ``source`` is alive, else None."""
    with _CACHE_LOCK:
        hit = _CACHE.get(key)
        if hit is not None and hit[0]() is source:
            _CACHE.move_to_end(key)
            return hit[1], hit[2]
    return None


def detector_scores(sm: StepMass, detector: Detector, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scores and flags ``[S, 1 + Lsel, L]`` (aggregate first, then each selected layer) of a detector other
    than the spec's own rule: from the head-summed mass, or for ``gu`` from its per-head counts, taken in one
    pass over the selected per-head mass and cached like the reduction (per mass array, selection and ε)."""
    Lsel, H = len(sm.layers), len(sm.heads)
    n_heads = np.array([Lsel * H] + [H] * Lsel)
    if not detector.needs_heads:
        m = np.concatenate([sm.mass[:, None, :], sm.layer_mass], axis=1).astype(np.float64)
        return detector.from_sums(np.where(valid[:, None, :], m, 0.0), n_heads, valid)
    return detector.from_counts(detector_counts(sm, detector, valid), n_heads, valid)


def detector_counts(sm: StepMass, detector: Detector, valid: np.ndarray) -> np.ndarray:
    """``int64 [S, 1 + Lsel, L]``: the heads in which a per-head detector (``gu``) finds a sink at ``j``, over
    every selected head (aggregate) and per selected layer; what a saved report keeps in place of the mass."""
    if sm.head_counts is not None:
        return sm.head_counts
    if sm.source is None:
        raise SinkSpecError(f"The {detector.name} detector needs the per-head mass: analyse the trajectory, not a saved report.")
    key = (detector.name, detector.param, id(sm.source), tuple(sm.source.shape), sm.layers, sm.heads)
    hit = _cached(key, sm.source)
    if hit is None:
        counts = detector.head_counts(_selected_heads(sm.source, sm.layers, sm.heads), valid)
        hit = (np.concatenate([counts.sum(1, keepdims=True), counts], axis=1), None)
        _remember(key, sm.source, *hit)
    return hit[0]


def _mass_of(trajectory: Any) -> tuple[Any, np.ndarray]:
    """The trajectory's mass record ``[S, Ly, H, L]`` and ``valid_length`` ``int64 [S]``, checked."""
    source = getattr(trajectory, "mass", None)
    if source is None:
        raise SinkSpecError("This trajectory has no attention mass: generate it with recorder=AttentionRecorder().")
    shape = tuple(source.shape)
    if len(shape) != 4:
        raise SinkSpecError(f"mass must have shape [steps, layers, heads, positions] (got {list(shape)}).")
    valid_length = as_numpy(trajectory.valid_length, np.int64).reshape(-1)
    if valid_length.shape[0] != shape[0]:
        raise SinkSpecError(f"valid_length has {valid_length.shape[0]} entries for {shape[0]} steps of mass.")
    return source, valid_length


def _sum_selection(source: Any, layers: tuple[int, ...], heads: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """``(float32 [S, Lsel, L]`` summed over the selected heads, ``float32 [S, L]`` over the layers too``)``, read-only."""
    arr = _selected_heads(source, layers, heads)
    layer_mass = arr.sum(axis=2)
    mass = layer_mass.sum(axis=1)
    if not np.isfinite(mass).all():  # NaN and infinity survive the sums: one check of [S, L] covers the record
        raise SinkSpecError(
            "The attention mass holds NaN or infinite values (a forward pass overflowed, e.g. in float16); "
            "regenerate the run, in bfloat16 or float32 if it happens again."
        )
    layer_mass.setflags(write=False)
    mass.setflags(write=False)
    return layer_mass, mass


def _selected_heads(source: Any, layers: tuple[int, ...], heads: tuple[int, ...]) -> np.ndarray:
    """``float32 [S, Lsel, Hsel, L]``: the selected layers and heads of a per-head mass record."""
    arr = as_numpy(source)
    if arr.dtype != np.float32:
        arr = arr.astype(np.float32)
    _, Ly, H, _ = arr.shape
    if layers != tuple(range(Ly)):
        arr = arr[:, list(layers)]
    if heads != tuple(range(H)):
        arr = arr[:, :, list(heads)]
    return arr


def _remember(key: tuple, source: Any, layer_mass: np.ndarray, mass: np.ndarray) -> None:
    """Cache a reduction until ``source`` is collected (not at all when it cannot be weakly referenced)."""

    def forget(_ref, key=key):
        with _CACHE_LOCK:
            if key in _CACHE and _CACHE[key][0] is _ref:
                del _CACHE[key]

    try:
        ref = weakref.ref(source, forget)  # the entry goes when the mass array does
    except TypeError:  # not weak-referenceable: do not cache
        return
    with _CACHE_LOCK:
        _CACHE[key] = (ref, layer_mass, mass)
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)


def clear_cache() -> None:
    """Forget every cached reduction (e.g. to time a cold :func:`analyze`)."""
    with _CACHE_LOCK:
        _CACHE.clear()


# --- array-level rules (what the pruner calls on calibration masses) ---------------------------


def valid_mask(S: int, L: int, valid_length: np.ndarray | None) -> np.ndarray:
    if valid_length is None:
        return np.ones((S, L), bool)
    vl = as_numpy(valid_length, np.int64).reshape(-1)
    if vl.shape[0] != S:
        raise SinkSpecError(f"valid_length has {vl.shape[0]} entries for {S} steps.")
    if (vl < 1).any() or (vl > L).any():
        raise SinkSpecError(f"valid_length must be in [1, {L}] at every step (got {vl.min()}..{vl.max()}).")
    return np.arange(L)[None, :] < vl[:, None]


def _baseline_shape(valid: np.ndarray, normalize: str, causal: bool) -> np.ndarray | None:
    """``[S, L]`` factor ``f`` with baseline ``b_t(j) = f_t(j) * total_t``; None for the raw view."""
    if normalize == "raw":
        return None
    S, L = valid.shape
    n = valid.sum(-1, keepdims=True).astype(np.float64)  # [S, 1]
    j = np.arange(L, dtype=np.float64)[None, :]
    if normalize == "uniform" or not causal:
        f = np.broadcast_to(1.0 / n, (S, L))
    elif normalize == "per_query":
        f = np.maximum(n - j, 1.0) / n**2
    else:  # expected: e(j) = H(n) - H(j)
        harmonic = np.concatenate([[0.0], np.cumsum(1.0 / np.arange(1, L + 1))])
        e = harmonic[n.astype(np.int64)] - harmonic[np.arange(L)][None, :]
        f = np.where(valid, e, 1.0) / n
    return np.where(valid, f, 1.0)


def viewed(m: np.ndarray, valid: np.ndarray, normalize: str, causal: bool) -> np.ndarray:
    """``m``: ``[S, G, L]`` float64; ``valid``: ``[S, L]``. Returns the viewed mass, 0 where invalid."""
    m = np.where(valid[:, None, :], m, 0.0)
    f = _baseline_shape(valid, normalize, causal)
    if f is None:
        return m
    total = m.sum(-1, keepdims=True)  # [S, G, 1]
    base = f[:, None, :] * total
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(base > 0, m / np.where(base > 0, base, 1.0), 0.0)
    return out


def scored(v: np.ndarray, valid: np.ndarray, spec: SinkSpec) -> tuple[np.ndarray, np.ndarray]:
    """Scores (float64, NaN where invalid) and sink flags of viewed mass ``v`` ``[S, G, L]`` under the spec's
    rule (:func:`sap_core.detectors.official_rule` or :func:`sap_core.detectors.leave_one_out_rule`)."""
    if spec.rule == "official":
        scores, sink = official_rule(v, valid, spec.k, spec.alpha)
    else:
        scores, sink = leave_one_out_rule(v, valid, spec.epsilon)
    scores = np.where(valid[:, None, :], scores, np.nan)
    return scores, sink


def _as_steps(mass: Any) -> np.ndarray:
    m = as_numpy(mass, np.float64)
    if m.ndim == 1:
        m = m[None, :]
    if m.ndim != 2:
        raise SinkSpecError(
            f"mass must be [steps, positions] or [positions] here (got shape {list(m.shape)}); sum over layers and heads first."
        )
    return m


def mass_view(
    mass: Any, normalize: str = "raw", valid_length: Any = None, causal: bool = False, absent: float = 0.0
) -> np.ndarray:
    """The viewed mass ``float64 [S, L]`` of a reduced mass ``[S, L]`` (see the module docstring);
    ``absent`` at positions beyond ``valid_length[t]`` (e.g. NaN to leave them out of a mean or a plot).
    Rows are scored on their own, so they may also be layers of one step."""
    if normalize not in VIEWS:
        raise SinkSpecError(f"normalize must be one of {', '.join(VIEWS)} (got '{normalize}').")
    m = _as_steps(mass)
    valid = valid_mask(*m.shape, valid_length)
    out = viewed(m[:, None, :], valid, normalize, causal)[:, 0]
    return out if absent == 0.0 else np.where(valid, out, absent)


def sink_scores(mass: Any, spec: SinkSpec = SinkSpec(), valid_length: Any = None, causal: bool = False) -> np.ndarray:
    """Sink scores ``s_t(j)`` ``float32 [S, L]`` of a reduced mass ``[S, L]`` (or ``[L]``: one step).

    ``mass`` is already summed over layers, heads and queries (numpy or torch). Each row is scored
    on its own, so rows may be steps of one sample or samples of one step. NaN beyond
    ``valid_length[t]``; under the default spec this is the official ``_compute_sink_mask``.
    """
    return score_steps(mass, spec, valid_length, causal)[0].astype(np.float32)


def sink_flags(mass: Any, spec: SinkSpec = SinkSpec(), valid_length: Any = None, causal: bool = False) -> np.ndarray:
    """``bool [S, L]``: whether ``j`` is a sink at step ``t`` (official rule: ``s_t(j) > 0.5``)."""
    return score_steps(mass, spec, valid_length, causal)[1]


def score_steps(
    mass: Any, spec: SinkSpec = SinkSpec(), valid_length: Any = None, causal: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Scores and flags from one scoring of a reduced mass ``[S, L]``: ``(float64 [S, L]`` scores,
    NaN where a position does not exist, ``bool [S, L]`` flags``)``. :func:`sink_scores` is the first
    in float32, :func:`sink_flags` the second; :func:`position_stats` takes both."""
    m = _as_steps(mass)
    valid = valid_mask(*m.shape, valid_length)
    scores, sink = scored(viewed(m[:, None, :], valid, spec.normalize, causal), valid, spec)
    return scores[:, 0], sink[:, 0]


@dataclass(frozen=True, eq=False)
class PositionStats:
    """Per-position stability over the steps at which each position exists (all ``[L]``)."""

    valid_steps: np.ndarray  # int64: steps at which j exists
    frequency: np.ndarray  # float64: f_j, share of those steps at which j is a sink
    mean_score: np.ndarray  # float64: mean_t s_t(j)
    variance: np.ndarray  # float64: v_j = Var_t s_t(j), population
    label: np.ndarray  # str: one of LABELS
    gate: np.ndarray  # bool: the variance gate, label == "unstable" (never a non-sink)
    weight: np.ndarray  # float32: the gated factor w_j = 1 - gate_j * mean_score_j


def position_stats(scores: Any, is_sink: Any, spec: SinkSpec = SinkSpec()) -> PositionStats:
    """Frequency, mean score, variance, label, variance gate and gated factor of each position from
    per-step ``scores`` ``[S, L]`` (NaN where a position does not exist) and flags ``[S, L]``. The gate
    (:func:`variance_gate`) opens for the unstable sinks only, at any tau; the factors of every method row
    are :func:`step_factors` / :func:`mean_factors` with :func:`factor_gate`."""
    s = _as_steps(scores)
    sink = as_numpy(is_sink, bool).reshape(s.shape)
    present = ~np.isnan(s)
    count = present.sum(0)
    denom = np.maximum(count, 1)
    s0 = np.where(present, s, 0.0)
    mean = s0.sum(0) / denom
    var = (np.where(present, s - mean, 0.0) ** 2).sum(0) / denom
    var = np.maximum(var, 0.0)
    freq = (sink & present).sum(0) / denom
    unstable = variance_gate(freq, var, spec.tau)
    label = stability_labels(freq, var, spec)
    return PositionStats(count.astype(np.int64), freq, mean, var, label, unstable, mean_factors(mean, unstable))


def variance_gate(frequency: np.ndarray, variance: np.ndarray, tau: float) -> np.ndarray:
    """The variance gate (any shape ``[..., L]``): ``j`` is a sink at some step (``f_j > 0``) and
    ``v_j >= tau``; never a non-sink, every sink at ``tau = 0``. The one definition the pruner, the
    report's labels and the Pick tau page read."""
    return (np.asarray(frequency) > 0) & (np.asarray(variance) >= tau)


def sink_variance(frequency: np.ndarray, variance: np.ndarray) -> np.ndarray:
    """``float64 [n]``: ``v_j`` of the positions that are a sink at some step (``f_j > 0``), flattened: the
    values the variance gate compares with tau."""
    return np.asarray(variance, np.float64)[np.asarray(frequency) > 0]


def gated_share(frequency: np.ndarray, variance: np.ndarray, tau: float) -> float:
    """Share of the sink positions (``f_j > 0``) the variance gate (:func:`variance_gate`) opens at ``tau``;
    NaN without any sink."""
    is_sink = np.asarray(frequency) > 0
    n = int(is_sink.sum())
    return float((variance_gate(frequency, variance, tau) & is_sink).sum() / n) if n else float("nan")


def separating_tau(frequency: np.ndarray, variance: np.ndarray, step: float = 0.005) -> float | None:
    """A tau that splits a run's sinks into those that stay and those that come and go: the median score variance
    of its sink positions (:func:`sink_variance`), rounded up to ``step`` (a slider's) while some sink stays at or
    above it. About half the sinks are then gated (unstable), the others stable or transient. None with fewer than
    two sinks, or when they all have one variance (no tau splits them)."""
    v = sink_variance(frequency, variance)
    if v.size < 2 or v.min() == v.max():
        return None
    median = float(np.median(v))
    rounded = float(np.ceil(median / step - 1e-9) * step)
    tau = rounded if (v >= rounded).any() else median
    return tau if (v >= tau).any() and (v < tau).any() else float(v.max())


def stability_labels(frequency: np.ndarray, variance: np.ndarray, spec: SinkSpec = SinkSpec()) -> np.ndarray:
    """``str`` labels (:data:`LABELS`, same shape as ``frequency``) from the frequency and variance."""
    freq = np.asarray(frequency)
    unstable = variance_gate(freq, variance, spec.tau)
    stable = ~unstable & (freq >= spec.stable_min_frequency)
    transient = (freq > 0) & ~unstable & ~stable
    label = np.full(freq.shape, "none", dtype="<U9")
    label[transient] = "transient"
    label[stable] = "stable"
    label[unstable] = "unstable"
    return label


FACTORS = ("none", "official", "gated")  # a method row's token factors (``Method.factors``)


def factor_gate(factors: str, gate: np.ndarray) -> np.ndarray:
    """The positions a method row's ``factors`` down-weight, explicit and never inferred from tau: none
    (``"none"``: noised_wanda), every position (``"official"``: the official rule of ``prune_sink`` /
    ``prune_sink_sparsegpt``) or the variance ``gate`` (``"gated"``)."""
    if factors not in FACTORS:
        raise SinkSpecError(f"factors must be one of {', '.join(FACTORS)} (got '{factors}').")
    if factors == "gated":
        return np.asarray(gate, bool)
    return np.full(np.shape(gate), factors == "official")


def step_factors(scores: np.ndarray, gate: np.ndarray) -> np.ndarray:
    """``float32 [S, L]`` per-step token factors ``1 − g_j·s_t(j)`` of one sample (1 where a position does
    not exist): with every position gated, the official Wanda-style ``prune_sink`` factor ``1 − s_t(j)``
    that scales step ``t``'s activations."""
    return (1.0 - np.where(np.asarray(gate)[None, :], np.nan_to_num(scores, nan=0.0), 0.0)).astype(np.float32)


def mean_factors(mean_score: np.ndarray, gate: np.ndarray) -> np.ndarray:
    """``float32 [L]`` token factors ``1 − g_j·mean_t s_t(j)`` of one sample: with every position gated,
    the official ``prune_sink_sparsegpt`` weight; with the variance gate, ``SinkReport.weights``."""
    return (1.0 - np.where(gate, mean_score, 0.0)).astype(np.float32)
