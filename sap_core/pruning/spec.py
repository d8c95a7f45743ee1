"""What a pruning run is asked to do: :class:`PruneSpec`, :class:`CalibrationSpec`, and the methods it can
name: :data:`METHOD_TABLE`, one :class:`Method` row each (:data:`METHODS` is its name -> description view).

Every check here is model-free and cheap; :func:`sap_core.pruning.prune` runs :meth:`PruneSpec.validate`
and then the checks that need the model (pattern vs. input dimensions, sequence length, calibration
text) before any forward pass, so a bad setting costs nothing.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

from sap_core import ASSETS
from sap_core.errors import PruneSpecError, SapError
from sap_core.pruning.statistics import FLUCTUATION, HESSIAN, MAGNITUDE, WANDA, Statistic
from sap_core.sinks import SinkSpec

DEFAULT_CALIBRATION = ASSETS / "text" / "calibration.txt"
# The forward processes a calibration can noise with, named after the official code that uses each
# (VILA-Lab/Sink-Aware-Pruning ``lib/prune_llada.py`` and ``lib/prune_dream.py``).
NOISINGS = ("llada", "dream")
OFFICIAL_DREAM_SEQLEN = 4096  # main_dream.py: model.seqlen = 4096, whatever the model's context


def family_noising(family: str | None) -> str:
    """The forward process a model family's official pruning code calibrates with (``ModelHandle.family``):
    ``"dream"`` for Dream, ``"llada"`` for every other family."""
    return "dream" if family == "Dream" else "llada"


@dataclass(frozen=True)
class Method:
    """One pruning method, as one row of :data:`METHOD_TABLE`: everything :func:`sap_core.pruning.prune`
    dispatches on, and the line the CLI, the app and the docs show.

    * ``data``: the inputs the weight statistic is taken on: ``"none"`` (no calibration), ``"clean"``
      (calibration windows) or ``"noised"`` (the windows corrupted at the sampled diffusion timesteps).
    * ``statistic``: what the weights are scored with, one object of
      :data:`~sap_core.pruning.statistics.STATISTICS`: magnitude (``|W|``), wanda (``|W|·‖X_c‖₂``), hessian
      (SparseGPT's OBS reconstruction from ``X^T X``) or fluctuation (FLAP, channels only); its ``name`` is
      the key shown and written.
    * ``sequential``: block by block, each block's statistic taken on the outputs of the already-pruned
      blocks (else every statistic comes from the dense model).
    * ``sink_weighting``: how sink tokens scale the layer inputs: ``"none"``, ``"step"`` (each timestep's
      inputs by ``1 − s_t(j)``, the official sink-aware Wanda) or ``"mean"`` (by ``1 − mean_t s_t(j)``,
      the official sink-aware SparseGPT). A weighting needs the noised passes for its sink scores.
    * ``structure``: what is removed: ``"weights"`` (single weights set to zero; the model keeps its shape)
      or ``"channels"`` (whole MLP channels, and attention heads when ``PruneSpec.heads > 0``, cut out of the
      model, which becomes smaller: :mod:`sap_core.pruning.structured`), one of the statistic's ``structures``.
    * ``gated``: the variance gate decides which positions are down-weighted: only the unstable sinks
      (a sink at some timestep with variance ``>= SinkSpec.tau``), never a non-sink; ungated methods
      down-weight every position by its score (the official rule), whatever ``tau``. At ``tau = 0`` the
      gate opens for every sink, so a gated method differs from its ungated twin (:data:`UNGATED_TWIN`)
      exactly on the positions that are never a sink.
    """

    name: str
    description: str
    data: str
    statistic: Statistic
    sequential: bool
    sink_weighting: str = "none"
    gated: bool = False
    structure: str = "weights"

    def __post_init__(self) -> None:
        structured = self.structure == "channels"
        stat = self.statistic
        if (
            self.data not in ("none", "clean", "noised")
            or not isinstance(stat, Statistic)
            or self.sink_weighting not in ("none", "step", "mean")
            or (self.gated and self.sink_weighting == "none")
            or self.structure not in stat.structures
            or stat.needs_inputs != (self.data != "none")
            or (stat.reconstructs and not self.sequential)
            or (not structured and stat.needs_inputs and not self.sequential and not self.needs_noise)
            or (structured and (self.sequential or self.sink_weighting == "mean"))
        ):
            raise ValueError(f"inconsistent method row {self!r}")

    @property
    def needs_calibration(self) -> bool:
        return self.data != "none"

    @property
    def needs_noise(self) -> bool:
        """Runs the model on noised windows (for its statistic or for its sink scores)."""
        return self.data == "noised" or self.sink_weighting != "none"

    @property
    def traits(self) -> str:
        """The row in words, for help texts: data · statistic · order · sink weighting."""
        data = {"none": "no calibration data", "clean": "clean calibration windows", "noised": "noised calibration windows"}[
            self.data
        ]
        stat = self.statistic.words
        if self.structure == "channels":
            stat = f"whole MLP channels / heads removed, {stat}"
        order = "block-sequential" if self.sequential else "dense model"
        weighting = {
            "none": "no sink weighting",
            "step": "each step's tokens scaled by 1 − sink score",
            "mean": "tokens scaled by 1 − sink score averaged over the noised steps",
        }[self.sink_weighting]
        if self.sink_weighting != "none":
            weighting += ", unstable sinks only (variance ≥ tau)" if self.gated else ", every position (tau unused)"
        return " · ".join((data, stat, order, weighting))

    @property
    def reads_noised_norms(self) -> bool:
        """Scores single weights from the dense model's column norms on the noised windows (the noised Wanda
        family: :class:`~sap_core.pruning.scores.WandaNorms`), not block by block."""
        return self.structure == "weights" and not self.sequential and self.needs_noise

    @property
    def factors(self) -> str:
        """The token factors :mod:`sap_core.pruning.scores` computes: ``"none"``, ``"official"``
        (``1 − s``, every position) or ``"gated"`` (``1 − g·s``)."""
        if self.sink_weighting == "none":
            return "none"
        return "gated" if self.gated else "official"


# Order: baselines, the paper's methods, the project's additions.
METHOD_TABLE: tuple[Method, ...] = (
    Method("magnitude", "|W|, no data", "none", MAGNITUDE, False),
    Method("wanda", "|W|·‖X_j‖₂ on clean calibration text, block-sequential (Wanda)", "clean", WANDA, True),
    Method("sparsegpt", "second-order (OBS) reconstruction, block-sequential (SparseGPT)", "clean", HESSIAN, True),
    Method(
        "sink_wanda",
        "Wanda on noised inputs, each token scaled by 1 − sink score (official sink-aware Wanda)",
        "noised",
        WANDA,
        False,
        "step",
    ),
    Method(
        "sink_sparsegpt",
        "SparseGPT with inputs scaled by 1 − mean sink score (official sink-aware SparseGPT)",
        "clean",
        HESSIAN,
        True,
        "mean",
    ),
    Method(
        "gated_sink_wanda",
        "sink_wanda, down-weighting only unstable sinks (variance ≥ tau)",
        "noised",
        WANDA,
        False,
        "step",
        gated=True,
    ),
    Method(
        "gated_sink_sparsegpt",
        "sink_sparsegpt, down-weighting only unstable sinks (variance ≥ tau)",
        "clean",
        HESSIAN,
        True,
        "mean",
        gated=True,
    ),
    Method("noised_wanda", "control: Wanda statistics on the same noised inputs, no sink weighting", "noised", WANDA, False),
    # Structured: whole MLP channels (and heads, PruneSpec.heads) cut out; the model gets smaller and faster.
    Method(
        "struct_wanda",
        "structured: removes MLP channels / heads by Σ|W|·‖X‖ over the structure (Wanda-sp)",
        "clean",
        WANDA,
        False,
        structure="channels",
    ),
    Method(
        "flap",
        "structured: removes MLP channels / heads by input variance × ‖output column‖² (FLAP)",
        "clean",
        FLUCTUATION,
        False,
        structure="channels",
    ),
    Method(
        "sink_struct_wanda",
        "struct_wanda on noised inputs, each token scaled by 1 − sink score",
        "noised",
        WANDA,
        False,
        "step",
        structure="channels",
    ),
    Method(
        "sink_flap",
        "flap on noised inputs, each token weighted by 1 − sink score",
        "noised",
        FLUCTUATION,
        False,
        "step",
        structure="channels",
    ),
    Method(
        "gated_sink_struct_wanda",
        "sink_struct_wanda, down-weighting only unstable sinks (variance ≥ tau)",
        "noised",
        WANDA,
        False,
        "step",
        gated=True,
        structure="channels",
    ),
    Method(
        "gated_sink_flap",
        "sink_flap, down-weighting only unstable sinks (variance ≥ tau)",
        "noised",
        FLUCTUATION,
        False,
        "step",
        gated=True,
        structure="channels",
    ),
    Method(
        "noised_struct_wanda",
        "control: struct_wanda on the same noised inputs, no sink weighting",
        "noised",
        WANDA,
        False,
        structure="channels",
    ),
    Method(
        "noised_flap",
        "control: flap on the same noised inputs, no sink weighting",
        "noised",
        FLUCTUATION,
        False,
        structure="channels",
    ),
)
METHOD_ROWS: dict[str, Method] = {m.name: m for m in METHOD_TABLE}
# name -> one line a selectbox can show (the table's descriptions)
METHODS: dict[str, str] = {m.name: m.description for m in METHOD_TABLE}
GATED = frozenset(m.name for m in METHOD_TABLE if m.gated)  # the methods a tau sweep varies
STRUCTURED = frozenset(m.name for m in METHOD_TABLE if m.structure != "weights")  # the methods that make the model smaller
# gated method -> the row that differs from it only by the gate: the official rule, a tau sweep's reference
UNGATED_TWIN: dict[str, str] = {
    g.name: next(
        m.name
        for m in METHOD_TABLE
        if not m.gated
        and (m.data, m.statistic, m.sequential, m.sink_weighting, m.structure)
        == (g.data, g.statistic, g.sequential, g.sink_weighting, g.structure)
    )
    for g in METHOD_TABLE
    if g.gated
}

SPARSEGPT_SELECTIONS = ("per_row", "official")
PATTERNS = ("unstructured", "2:4", "4:8")  # the patterns the app offers (any N:M with N < M is valid)


def check_sparsity(sparsity, error: type[SapError] = PruneSpecError) -> float:
    """The one rule for a target sparsity: a number in [0, 1), the fraction of weights set to zero
    (0 prunes nothing). Returns it as a float; anything else raises ``error`` with one line."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or math.isnan(sparsity):
        raise error(f"sparsity must be a number in [0, 1) (got {sparsity!r}).")
    if not 0.0 <= float(sparsity) < 1.0:
        raise error(f"sparsity must be in [0, 1) (got {sparsity}): it is the fraction of weights set to zero, e.g. 0.5 for half.")
    return float(sparsity)


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """``"unstructured"`` -> None; ``"N:M"`` -> ``(N, M)``: at most N non-zero weights in every M
    consecutive input weights of a row (2:4 and 4:8 are 50 %). Raises :class:`PruneSpecError`."""
    text = str(pattern).strip().lower()
    if text == "unstructured":
        return None
    match = re.fullmatch(r"\s*([0-9]{1,6})\s*:\s*([0-9]{1,6})\s*", text)  # ASCII digits only ('²' is a digit too)
    if match is None:
        raise PruneSpecError(f"pattern must be 'unstructured' or 'N:M' such as '2:4' or '4:8' (got '{pattern}').")
    n, m = int(match.group(1)), int(match.group(2))
    if m < 1 or n < 1:
        raise PruneSpecError(f"N:M needs N >= 1 and M >= 1 (got '{pattern}'); '2:4' keeps 2 weights of every 4.")
    if n >= m:
        raise PruneSpecError(
            f"N:M needs N < M (got '{pattern}'): N is the number of weights KEPT in each group of M, "
            "so N >= M prunes nothing. Use e.g. '2:4' or '4:8'."
        )
    return n, m


@dataclass(frozen=True)
class CalibrationSpec:
    """Calibration data and forward noising.

    ``text``: the calibration text itself; None reads ``sap_core/assets/text/calibration.txt``. ``nsamples``
    windows of ``seqlen`` tokens are drawn at random offsets (seeded by ``seed``). The noised methods
    corrupt every window once per sampled step ``interval, 2·interval, …, T`` with the forward process
    ``noising`` names, the official one of the model's family (None, the default: the family's,
    :func:`family_noising`):

    * ``"llada"`` (``lib/prune_llada.py``): at step ``t`` each token becomes [MASK] with probability
      ``(1 − eps)·t/T + eps``.
    * ``"dream"`` (``lib/prune_dream.py``): each step is a fresh draw of ``t ~ U(0, 1)`` per window,
      stratified over ``t_strata`` windows at a time (``t_i = (u0 + i/b) mod 1``, the official batch; 1 there
      by default), each token masked with probability ``(1 − eps)·t + eps``, the first and last positions
      never; the windows' pad tokens (``<|endoftext|>`` for Dream) are masked out of attention as keys in
      the noised passes. The step numbers only count the draws, as in the official code.

    ``batch_size`` is how many sequences one forward pass carries; it changes speed and peak memory, not
    the statistics.

    The defaults (16 windows of 128 tokens) are sized for the built-in models on a CPU. The official
    code calibrates on **128** windows of the model's full context (``max_sequence_length``; 4096 tokens
    for Dream): :meth:`official` gives those settings, and :meth:`PruneSpec.official` the whole official run.
    """

    text: str | None = None
    nsamples: int = 16
    seqlen: int = 128
    seed: int = 0
    T: int = 50
    interval: int = 5
    eps: float = 1e-3
    batch_size: int = 10
    noising: str | None = None
    t_strata: int = 1

    @classmethod
    def official(cls, seqlen: int, text: str | None = None, family: str | None = None) -> CalibrationSpec:
        """The official code's calibration for a model of ``family``: 128 windows, seed 0, T = 50 diffusion
        steps sampled every 5, eps = 1e-3, the family's forward process (:func:`family_noising`). The windows
        are ``seqlen`` tokens (the model's ``max_sequence_length``, as ``main_llada.py``) except for Dream,
        whose ``main_dream.py`` fixes :data:`OFFICIAL_DREAM_SEQLEN` (and a batch of 1 window: ``t_strata=1``)."""
        noising = family_noising(family)
        seqlen = OFFICIAL_DREAM_SEQLEN if noising == "dream" else seqlen
        return cls(text=text, nsamples=128, seqlen=seqlen, seed=0, T=50, interval=5, eps=1e-3, noising=noising, t_strata=1)

    def for_family(self, family: str | None) -> CalibrationSpec:
        """This spec with :attr:`noising` set: its own, else the official one of ``family``."""
        return self if self.noising is not None else replace(self, noising=family_noising(family))

    @property
    def timesteps(self) -> list[int]:
        return list(range(self.interval, self.T + 1, self.interval))

    def mask_probability(self, t: int) -> float:
        return (1.0 - self.eps) * t / self.T + self.eps

    def validate(self) -> None:
        if not isinstance(self.nsamples, int) or self.nsamples < 1:
            raise PruneSpecError(f"nsamples must be an integer >= 1 (got {self.nsamples}).")
        if not isinstance(self.seqlen, int) or self.seqlen < 2:
            raise PruneSpecError(f"seqlen must be an integer >= 2 tokens (got {self.seqlen}).")
        if not isinstance(self.T, int) or self.T < 1:
            raise PruneSpecError(f"T (diffusion steps) must be an integer >= 1 (got {self.T}).")
        if not isinstance(self.interval, int) or not 1 <= self.interval <= self.T:
            raise PruneSpecError(
                f"interval must be an integer in [1, T={self.T}] (got {self.interval}); "
                "the sampled timesteps are interval, 2·interval, …, T."
            )
        if not (isinstance(self.eps, (int, float)) and 0.0 <= self.eps < 1.0):
            raise PruneSpecError(f"eps must be in [0, 1) (got {self.eps}).")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise PruneSpecError(f"seed must be an integer in [0, 2**63) (got {self.seed!r}).")
        if isinstance(self.eps, bool) or not math.isfinite(self.eps):
            raise PruneSpecError(f"eps must be a finite number in [0, 1) (got {self.eps!r}).")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise PruneSpecError(f"batch_size must be an integer >= 1 (got {self.batch_size}).")
        self._validate_noising()
        if self.text is not None and not isinstance(self.text, str):
            raise PruneSpecError(
                f"The calibration text must be text (str), not {type(self.text).__name__}; decode it first "
                "(e.g. data.decode('utf-8'))."
            )
        if self.text is not None and not str(self.text).strip():
            raise PruneSpecError(
                "The calibration text is empty; paste some text or leave it unset to use "
                f"{DEFAULT_CALIBRATION.relative_to(ASSETS.parent)}."
            )

    def _validate_noising(self) -> None:
        if self.noising is not None and self.noising not in NOISINGS:
            raise PruneSpecError(
                f"noising must be one of {', '.join(NOISINGS)} (got {self.noising!r}); leave it unset for the model family's own."
            )
        if isinstance(self.t_strata, bool) or not isinstance(self.t_strata, int) or self.t_strata < 1:
            raise PruneSpecError(f"t_strata must be an integer >= 1 (got {self.t_strata!r}): windows per stratified draw of t.")

    def load_text(self) -> str:
        """The calibration text; :class:`PruneSpecError` with what to do when there is none."""
        if self.text is not None:
            if not str(self.text).strip():
                raise PruneSpecError("The calibration text is empty; give some text for calibration.")
            return str(self.text)
        if not DEFAULT_CALIBRATION.is_file():
            raise PruneSpecError(
                f"No calibration text: the default {DEFAULT_CALIBRATION} is missing. "
                "Pass CalibrationSpec(text=...) with a few thousand words of plain text."
            )
        text = DEFAULT_CALIBRATION.read_text(encoding="utf-8")
        if not text.strip():
            raise PruneSpecError(f"No calibration text: {DEFAULT_CALIBRATION} is empty. Pass CalibrationSpec(text=...).")
        return text


@dataclass(frozen=True)
class PruneSpec:
    """One pruning run.

    ``method``: a key of :data:`METHODS`. ``sparsity``: the fraction of each row's weights set to zero,
    in [0, 1), for ``pattern="unstructured"``; with ``pattern="N:M"`` the pattern fixes the sparsity
    at ``1 − N/M`` and ``sparsity`` is not used (see :attr:`target_sparsity`). ``sink`` holds the
    sink rule (k, alpha) and the variance gate ``tau`` of the gated methods. ``blocksize`` and
    ``percdamp`` are SparseGPT's (columns per lazy-update block; dampening as a fraction of the mean
    Hessian diagonal). ``sparsegpt_selection`` is how the SparseGPT family picks an unstructured mask:
    ``"per_row"`` (the project's: every row at exactly the target) or ``"official"`` (the reference
    code's single threshold per column block; see :mod:`sap_core.pruning.sparsegpt`).

    Structured methods (:data:`STRUCTURED`): ``sparsity`` is the fraction of each block's MLP channels
    removed, ``heads`` the fraction of each block's attention heads removed (0: none; LLaDA with as many
    key/value heads as query heads only); ``bias_compensation`` (FLAP methods) adds the removed channels'
    mean contribution to the output projection's bias (models whose output projections have a bias only).
    """

    method: str
    sparsity: float
    pattern: str = "unstructured"
    sink: SinkSpec = field(default_factory=SinkSpec)
    calibration: CalibrationSpec = field(default_factory=CalibrationSpec)
    blocksize: int = 128
    percdamp: float = 0.01
    sparsegpt_selection: str = "per_row"
    heads: float = 0.0
    bias_compensation: bool = False

    @classmethod
    def official(
        cls, method: str, sparsity: float, pattern: str = "unstructured", *, seqlen: int, family: str | None = None
    ) -> PruneSpec:
        """The official code's settings for a model of ``family`` as one preset: :meth:`CalibrationSpec.official`
        (128 windows of ``seqlen`` tokens, the model's context, or Dream's 4096; the family's forward process),
        the official sink rule (``SinkSpec()``: k = 2, alpha = 5, no variance gate) and SparseGPT's reference
        mask selection."""
        return cls(
            method,
            sparsity,
            pattern,
            sink=SinkSpec(),
            calibration=CalibrationSpec.official(seqlen, family=family),
            sparsegpt_selection="official",
        )

    @property
    def nm(self) -> tuple[int, int] | None:
        return parse_pattern(self.pattern)

    @property
    def target_sparsity(self) -> float:
        nm = self.nm
        return self.sparsity if nm is None else 1.0 - nm[0] / nm[1]

    @property
    def structure(self) -> str:
        """What the run removes, in words (the "pattern" of its settings table and of ``pruning.json``): the N:M
        pattern or ``unstructured`` for single weights; a structured method says ``structured: MLP channels``
        (``structured: MLP channels and attention heads`` when it removes heads), not the unused pattern."""
        if self.method not in STRUCTURED:
            return self.pattern
        return "structured: MLP channels" + (" and attention heads" if self.heads else "")

    @property
    def row(self) -> Method:
        """This run's row of :data:`METHOD_TABLE`; :class:`PruneSpecError` for an unknown method."""
        row = METHOD_ROWS.get(self.method)
        if row is None:
            raise PruneSpecError(f"Unknown pruning method '{self.method}'. Choose one of: {', '.join(METHODS)}.")
        return row

    @property
    def needs_calibration(self) -> bool:
        return self.row.needs_calibration

    @property
    def label(self) -> str:
        """The run's one name, everywhere a run is named (progress, the app's variants, comparisons, a
        sweep's ``label`` column): ``magnitude 50%``, ``wanda 2:4``, ``gated_sink_wanda 50%, tau=0.05``; a structured
        method names what it removes: ``sink_flap 30% channels, 25% heads``.
        :func:`numbered` tells two runs of one label apart."""
        what = f"{100 * self.sparsity:g}%" if self.nm is None else self.pattern
        if self.method in STRUCTURED:  # the structure removed, named
            what += " channels" + (f", {100 * self.heads:g}% heads" if self.heads else "")
        if self.bias_compensation:
            what += ", bias compensated"
        gate = f", tau={self.sink.tau:g}" if self.method in GATED else ""
        return f"{self.method} {what}{gate}"

    def validate(self) -> None:
        """Raise :class:`PruneSpecError` for anything impossible, before any work."""
        row = self.row  # an unknown method fails first
        check_sparsity(self.sparsity)
        parse_pattern(self.pattern)
        self._validate_structure(row)
        if not isinstance(self.blocksize, int) or self.blocksize < 1:
            raise PruneSpecError(f"blocksize must be an integer >= 1 (got {self.blocksize}).")
        if not (isinstance(self.percdamp, (int, float)) and math.isfinite(self.percdamp) and self.percdamp > 0):
            raise PruneSpecError(f"percdamp must be > 0 (got {self.percdamp}); SparseGPT uses 0.01.")
        if self.sparsegpt_selection not in SPARSEGPT_SELECTIONS:
            raise PruneSpecError(
                f"sparsegpt_selection must be one of {', '.join(SPARSEGPT_SELECTIONS)} "
                f"(got {self.sparsegpt_selection!r}); 'official' reproduces the reference code."
            )
        if not isinstance(self.sink, SinkSpec):
            raise PruneSpecError(f"sink must be a SinkSpec (got {type(self.sink).__name__}).")
        if not isinstance(self.calibration, CalibrationSpec):
            raise PruneSpecError(f"calibration must be a CalibrationSpec (got {type(self.calibration).__name__}).")
        if row.needs_calibration:
            self.calibration.validate()

    def _validate_structure(self, row: Method) -> None:
        """The structured settings: heads in [0, 1), both only for structured rows, compensation only for FLAP."""
        if isinstance(self.heads, bool) or not isinstance(self.heads, (int, float)) or not 0.0 <= float(self.heads) < 1.0:
            raise PruneSpecError(
                f"heads must be a number in [0, 1) (got {self.heads!r}): the fraction of attention heads removed."
            )
        if not isinstance(self.bias_compensation, bool):
            raise PruneSpecError(f"bias_compensation must be true or false (got {self.bias_compensation!r}).")
        structured = row.structure != "weights"
        if self.heads and not structured:
            raise PruneSpecError(
                f"heads={self.heads} removes attention heads, which only the structured methods do "
                f"({', '.join(sorted(STRUCTURED))}); {self.method} masks single weights."
            )
        if structured and self.pattern.strip().lower() != "unstructured":
            raise PruneSpecError(f"{self.method} removes whole channels; an N:M pattern ({self.pattern}) does not apply to it.")
        if self.bias_compensation and not row.statistic.compensates:
            raise PruneSpecError(
                f"bias_compensation is FLAP's (flap, sink_flap, gated_sink_flap); {self.method} does not compensate."
            )


def numbered(label: str, taken: Iterable[str]) -> str:
    """``label``, or ``label #n`` with the smallest n >= 2 not in ``taken``, when ``taken`` holds it already
    (two variants of one spec made in one session, say)."""
    taken = set(taken)
    if label not in taken:
        return label
    n = 2
    while f"{label} #{n}" in taken:
        n += 1
    return f"{label} #{n}"
