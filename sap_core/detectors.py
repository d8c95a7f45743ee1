"""Sink detectors: the published definitions of an attention sink, as interchangeable objects over one mass record.

Input: the recorded mass ``mass[t, g, h, j]`` (``[S, G, H, L]``, any float), the attention key ``j`` receives in
head ``h`` of group ``g`` (a layer, or every selected head of every selected layer for the aggregate) at step
``t``, summed over the queries (:mod:`sap_core.attention`: each head's mass sums to the number of queries). At
step ``t`` there are ``n_t`` valid positions (``valid[t]``) and as many queries (a DLM's pass sees all ``L``
positions; a causal model's pass at step ``t`` feeds its ``n_t`` tokens), so the mean attention key ``j``
receives per query is ``a_h(j) = mass_h(j) / n_t`` and, relative to uniform attention ``1 / n_t``, it is
``mass_h(j)`` itself. Output of every detector: ``scores`` ``float64 [S, G, L]`` in ``[0, 1]`` (NaN where a
position does not exist) and ``flags`` ``bool [S, G, L]`` (``j`` is a sink of group ``g`` at step ``t``).

* ``official`` (k = 2): ``s = sigmoid(alpha · (m(j) − (mean + k·std)))`` on the head-summed mass ``m``, sink when
  ``m(j) > mean + k·std`` of the step: the official Sink-Aware Pruning rule (:func:`official_rule`).
* ``gu`` (ε = 0.3; Gu et al., arXiv 2410.10781): head ``h`` has a sink at ``j`` when ``a_h(j) > ε``; the score
  is the share of the group's heads that have one, and ``j`` is a sink of the group when some head has one.
  Gu et al. apply it to the first token; here to every position.
* ``rulli`` (ε = 3; Rulli et al., arXiv 2510.15731, read as docs/sinks.md says): ``r(j)``, the attention ``j``
  receives per query averaged over the group's heads, as a multiple of uniform attention ``1 / n_t``
  (``= mean_h mass_h(j)``); sink when ``r(j) > ε``; score ``r / (r + ε)`` (0.5 at the threshold).
* ``head`` (ε = 0.3): the per-head sink score ``a_h(j)``; the group's score is its mean over the heads
  (the mean attention ``j`` receives per query), sink when it exceeds ``ε``. :func:`rank_heads` ranks the heads.

Only the ``gu`` detector needs the per-head mass; the others read the head-summed mass
(:meth:`Detector.from_sums`), the record every report already keeps. The scores are in ``[0, 1]`` so that the
pruner's factors ``1 − s`` stay factors whichever detector scores.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from sap_core.errors import SinkSpecError

_RTOL = 1e-6  # a margin within this share of the step's mean counts as no margin (float rounding)


# --- the official rule and the figure's rule on a (viewed) head-summed mass ---------------------------------


def _sigmoid(x: np.ndarray) -> np.ndarray:
    """``1 / (1 + exp(-x))``; the clip keeps ``exp`` finite (sigmoid(-700) ~ 1e-304 is kept)."""
    out = np.exp(-np.clip(x, -700.0, 700.0))
    out += 1.0
    return np.reciprocal(out, out=out)


def official_rule(v: np.ndarray, valid: np.ndarray, k: float, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """The official ``_compute_sink_mask`` on ``v`` ``float64 [S, G, L]`` (``valid`` ``bool [S, L]``): scores
    ``sigmoid(alpha · (v − (mean + k·std)))`` and flags ``v > mean + k·std`` (population std over the valid
    positions of each step and group). Scores are not yet NaN where invalid."""
    vm = valid[:, None, :]
    n = vm.sum(-1, keepdims=True).astype(np.float64)
    mean = np.where(vm, v, 0.0).sum(-1, keepdims=True) / n
    std = np.sqrt((np.where(vm, v - mean, 0.0) ** 2).sum(-1, keepdims=True) / n)
    margin = v - (mean + k * std)
    return _sigmoid(alpha * margin), (margin > _RTOL * np.abs(mean)) & vm


def leave_one_out_rule(v: np.ndarray, valid: np.ndarray, epsilon: float) -> tuple[np.ndarray, np.ndarray]:
    """The paper figure's hard rule on ``v`` ``float64 [S, G, L]``: ``j`` is a sink when ``v(j)`` exceeds the
    mean of the other valid positions by ``epsilon`` uniform masses; the score is the flag (0 or 1)."""
    vm = valid[:, None, :]
    n = vm.sum(-1, keepdims=True).astype(np.float64)
    total = np.where(vm, v, 0.0).sum(-1, keepdims=True)
    mean = total / n
    with np.errstate(divide="ignore", invalid="ignore"):
        others = (total - v) / (n - 1)
    margin = v - (others + epsilon * mean)
    sink = (margin > _RTOL * np.abs(mean)) & vm & (n > 1)
    return sink.astype(np.float64), sink


# --- the detectors ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Detector:
    """One definition of a sink with its parameter (``param``: ``k`` or ``ε``); see the module docstring.

    ``detect(mass, valid)`` scores a per-head mass ``[S, G, H, L]``; ``flags`` and ``scores`` are its two halves.
    ``from_sums(summed, n_heads, valid)`` does the same from the head-summed mass (every detector but ``gu``).
    ``str(detector)`` is its ``NAME:PARAM`` text, which :func:`parse_detector` reads back."""

    param: float
    name: ClassVar[str] = ""
    symbol: ClassVar[str] = "ε"
    default: ClassVar[float] = 0.0
    needs_heads: ClassVar[bool] = False
    title: ClassVar[str] = ""

    def __post_init__(self) -> None:
        value = self.param
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise SinkSpecError(
                f"{self.name}'s {self.symbol} must be a number (got {value!r}), e.g. {self.name}:{self.default:g}."
            )
        object.__setattr__(self, "param", float(value))
        self._check(self.param)

    def _check(self, value: float) -> None:
        if not (np.isfinite(value) and 0 < value < 1):
            raise SinkSpecError(
                f"{self.name}'s ε must be in (0, 1) (got {value:g}): it is a mean attention per query, {self.default:g} by default."
            )

    def __str__(self) -> str:
        return f"{self.name}:{self.param:g}"

    # what every detector answers
    def detect(self, mass: Any, valid: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(scores float64 [S, G, L]`` (NaN where invalid), ``flags bool [S, G, L])`` of a per-head mass
        ``[S, G, H, L]`` (``valid``: ``bool [S, L]``, None = every position exists)."""
        m = np.asarray(mass, np.float64)
        if m.ndim != 4:
            raise SinkSpecError(f"mass must be [steps, layers, heads, positions] (got shape {list(m.shape)}).")
        valid = _valid(valid, m.shape[0], m.shape[-1])
        m = np.where(valid[:, None, None, :], m, 0.0)
        return self._finish(*self._from_heads(m, valid), valid)

    def flags(self, mass: Any, valid: np.ndarray | None = None) -> np.ndarray:
        """``bool [S, G, L]``: whether ``j`` is a sink of group ``g`` at step ``t``."""
        return self.detect(mass, valid)[1]

    def scores(self, mass: Any, valid: np.ndarray | None = None) -> np.ndarray:
        """``float64 [S, G, L]`` scores in ``[0, 1]``, NaN where a position does not exist."""
        return self.detect(mass, valid)[0]

    def from_sums(self, summed: np.ndarray, n_heads: Any, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Scores and flags from the head-summed raw mass ``float64 [S, G, L]`` (0 where invalid) of groups of
        ``n_heads`` heads (an int or ``[G]``); raises for a detector that needs the per-head mass."""
        if self.needs_heads:
            raise SinkSpecError(f"The {self.name} detector needs the per-head mass: analyse the trajectory itself.")
        return self._finish(*self._from_sums(summed, np.asarray(n_heads, np.float64).reshape(1, -1, 1), valid), valid)

    # what each detector defines
    def _from_heads(self, m: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self._from_sums(m.sum(axis=2), np.full((1, 1, 1), float(m.shape[2])), valid)

    def _from_sums(self, summed: np.ndarray, n_heads: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    @staticmethod
    def _finish(scores: np.ndarray, flags: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        vm = valid[:, None, :]
        return np.where(vm, scores, np.nan), flags & vm


@dataclass(frozen=True)
class Official(Detector):
    """The official rule with ``k`` (``param``) and the sigmoid slope ``alpha`` on the raw head-summed mass."""

    param: float = 2.0
    alpha: float = 5.0
    name: ClassVar[str] = "official"
    symbol: ClassVar[str] = "k"
    default: ClassVar[float] = 2.0
    title: ClassVar[str] = "Official rule (mass above mean + k·std)"

    def _check(self, value: float) -> None:
        if not np.isfinite(value):
            raise SinkSpecError(f"official's k must be a finite number (got {value:g}); 2 by default.")

    def _from_sums(self, summed, n_heads, valid):
        return official_rule(summed, valid, self.param, self.alpha)


@dataclass(frozen=True)
class LeaveOneOut(Detector):
    """The paper figure's rule (``SinkSpec(rule="leave_one_out")``), margin ``ε`` in uniform masses."""

    param: float = 0.5
    name: ClassVar[str] = "leave_one_out"
    default: ClassVar[float] = 0.5
    title: ClassVar[str] = "Leave-one-out (the paper figure's rule)"

    def _check(self, value: float) -> None:
        if not (np.isfinite(value) and value >= 0):
            raise SinkSpecError(f"leave_one_out's ε must be finite and >= 0 (got {value:g}); 0.5 by default.")

    def _from_sums(self, summed, n_heads, valid):
        return leave_one_out_rule(summed, valid, self.param)


def _steps(valid: np.ndarray) -> np.ndarray:
    """``float64 [S, 1, 1]``: the valid positions (= queries) of each step, at least 1."""
    return np.maximum(valid.sum(-1), 1).astype(np.float64)[:, None, None]


@dataclass(frozen=True)
class Gu(Detector):
    """Gu et al.: share of the heads whose mean attention per query at ``j`` exceeds ``ε``."""

    param: float = 0.3
    name: ClassVar[str] = "gu"
    default: ClassVar[float] = 0.3
    needs_heads: ClassVar[bool] = True
    title: ClassVar[str] = "Gu et al. (share of heads with mean attention > ε)"

    def head_counts(self, m: np.ndarray, valid: np.ndarray) -> np.ndarray:
        """``int64 [S, G, L]``: the heads of each group whose mean attention per query at ``j`` exceeds ε,
        from a per-head mass ``[S, G, H, L]``."""
        n = _steps(valid)[..., None]  # [S, 1, 1, 1]
        return (np.asarray(m) > self.param * n).sum(axis=2)

    def from_counts(self, counts: np.ndarray, n_heads: Any, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Scores and flags from :meth:`head_counts` (summed over layers for the aggregate) of groups of ``n_heads``."""
        share = counts / np.asarray(n_heads, np.float64).reshape(1, -1, 1)
        return self._finish(share, counts > 0, valid)

    def _from_heads(self, m, valid):
        counts = self.head_counts(m, valid)
        return counts / m.shape[2], counts > 0


@dataclass(frozen=True)
class Rulli(Detector):
    """Rulli et al.'s ε-threshold: head-averaged attention per query as a multiple of uniform, above ``ε``."""

    param: float = 3.0
    name: ClassVar[str] = "rulli"
    default: ClassVar[float] = 3.0
    title: ClassVar[str] = "Rulli et al. (attention above ε × uniform)"

    def _check(self, value: float) -> None:
        if not (np.isfinite(value) and value > 0):
            raise SinkSpecError(
                f"rulli's ε must be a finite number > 0 (got {value:g}): a multiple of uniform attention, 3 by default."
            )

    def _from_sums(self, summed, n_heads, valid):
        r = summed / n_heads  # mean over heads of mass_h(j) = a_h(j) · n_t, the multiple of uniform 1 / n_t
        return r / (r + self.param), r > self.param


@dataclass(frozen=True)
class HeadScore(Detector):
    """The per-head sink score ``a_h(j)``; the group's score is its mean over heads, a sink above ``ε``."""

    param: float = 0.3
    name: ClassVar[str] = "head"
    default: ClassVar[float] = 0.3
    title: ClassVar[str] = "Per-head score (mean attention over heads > ε)"

    def _from_sums(self, summed, n_heads, valid):
        a = summed / (n_heads * _steps(valid))
        return a, a > self.param


DETECTORS: dict[str, type[Detector]] = {d.name: d for d in (Official, Gu, Rulli, HeadScore)}
OFFICIAL = Official()


def default_detectors() -> tuple[Detector, ...]:
    """One detector of each published definition, at its default parameter (the agreement view's set)."""
    return tuple(cls() for cls in DETECTORS.values())


def parse_detector(value: Any) -> Detector:
    """A detector from ``NAME`` or ``NAME:PARAM`` text (``"gu:0.3"``, ``"rulli"``, ``"official:2.5"``) or a
    :class:`Detector` (returned as is). Unknown names and out-of-range parameters raise
    :class:`~sap_core.errors.SinkSpecError` with one line, before any work."""
    if isinstance(value, Detector):
        return value
    if not isinstance(value, str):
        raise SinkSpecError(f"detector must be text such as gu:0.3 (got {value!r}).")
    name, sep, param = value.strip().partition(":")
    name = name.strip().lower()
    cls = DETECTORS.get(name)
    if cls is None:
        raise SinkSpecError(f"unknown detector '{name}': choose one of {', '.join(DETECTORS)} (e.g. gu:0.3).")
    if not sep:
        return cls()
    try:
        number = float(param)
    except ValueError:
        raise SinkSpecError(
            f"{name}'s {cls.symbol} must be a number (got '{param.strip()}'), e.g. {name}:{cls.default:g}."
        ) from None
    return cls(number)


def rank_heads(mass: Any, valid: np.ndarray | None = None, layers=None, heads=None) -> pd.DataFrame:
    """The heads ranked by their sink score: for each (layer, head) of a per-head mass ``[S, Ly, H, L]``,
    ``score`` = the largest over positions of the mean over steps (where ``j`` exists) of ``a_h(j)``, the mean
    attention per query position ``j`` receives in that head, with ``position`` the one that reaches it;
    ``layers`` / ``heads`` name the model indices of the axes (default 0..). Strongest first, ``rank`` from 1."""
    m = np.asarray(mass, np.float64)
    S, Ly, H, L = m.shape
    valid = _valid(valid, S, L)
    a = np.where(valid[:, None, None, :], m, 0.0) / _steps(valid)[..., None]
    count = np.maximum(valid.sum(0), 1)  # [L]
    mean = np.where(valid.any(0), a.sum(0) / count, -np.inf)  # [Ly, H, L]
    best = mean.argmax(-1)
    frame = pd.DataFrame(
        {
            "layer": np.repeat(np.asarray(range(Ly) if layers is None else layers, np.int64), H),
            "head": np.tile(np.asarray(range(H) if heads is None else heads, np.int64), Ly),
            "position": best.reshape(-1).astype(np.int64),
            "score": np.take_along_axis(mean, best[..., None], -1).reshape(-1),
        }
    )
    frame = frame.sort_values("score", ascending=False, kind="stable").reset_index(drop=True)
    frame.insert(0, "rank", np.arange(1, len(frame) + 1, dtype=np.int64))
    return frame


def _valid(valid: np.ndarray | None, S: int, L: int) -> np.ndarray:
    if valid is None:
        return np.ones((S, L), bool)
    valid = np.asarray(valid, bool)
    if valid.shape != (S, L):
        raise SinkSpecError(f"valid must be [steps, positions] = [{S}, {L}] (got {list(valid.shape)}).")
    return valid
