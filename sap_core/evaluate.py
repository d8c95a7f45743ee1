"""Evaluation: masked-diffusion perplexity of a DLM and perplexity of a causal model.

Both score the same windows of text, so a DLM and its AR twin are compared on equal terms:
``nsamples`` windows of ``seqlen`` tokens, spread evenly over the text, each preceded by the
conditioning prefix (``handle.encode(prefix)``: the tokenizer's BOS convention plus an optional
prompt), which is never masked and never scored.

**Masked-diffusion perplexity** (a Monte Carlo ELBO, as LLaDA's ``get_log_likelihood``): for each
window of ``n`` target tokens and each of ``draws`` draws, the number of masked targets ``l`` is
stratified over ``[1, n]`` across the draws (``l_d = 1 + floor((d + u)·n / draws)``, one uniform
offset ``u`` per window), ``l`` random targets are replaced by [MASK], and the cross-entropy on them,
divided by the mask ratio ``l / n``, estimates the window's negative log-likelihood bound. The draws'
average, over ``n``, is nats per token; ``ppl = exp(nll)``. ``nll_se`` is the Monte Carlo standard
error of the mean (variance between the draws of a window); ``ppl_se = ppl · nll_se``. Seeded: the
same seed gives the same number.

**Dream's estimator** (``estimator="dream"``, the default for a Dream model through :class:`EvalSpec`; see
:mod:`sap_core.estimator`): Dream's forward process, as ``main_dream.py``'s perplexity of the official pruning
code runs it: each draw masks every text token independently with probability ``p = (1 − ε)·t + ε`` (``t``
stratified over the window's draws, ``t_d = (u + d / draws) mod 1``, as Dream's ``eval.py`` over a batch), the
window's last token never masked (Dream's EOS rule; it still counts in ``n``, as in ``main_dream.py``), the
loss on the masked tokens divided by ``p``. A draw that masks nothing counts as 0 (``eval.py``; ``main_dream.py``
skips it). ``nll_type="ar_ftb"`` / ``"ar_btf"``: Dream's deterministic left-to-right / right-to-left rows (one
per text token); then the window's sum is exact, ``draws`` is 1 and ``nll_se`` is the error over windows.

**Causal perplexity**: mean next-token NLL of the same windows. It is deterministic, so its
``nll_se`` is the standard error over windows (text variability), not Monte Carlo error.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from sap_core.errors import SapError, SweepSpecError
from sap_core.estimator import ar_rows, check_estimator, dream_noise, family_estimator
from sap_core.models import ASSETS, ModelHandle
from sap_core.progress import Progress, report
from sap_core.text import check_length, text_ids

EVALUATION_TEXT = ASSETS / "text" / "evaluation.txt"
DENSE = "dense"  # the name of the unpruned model's row in every comparison (sweep, compare, accuracy)


@dataclass(frozen=True)
class PerplexityResult:
    """One perplexity evaluation. ``estimates`` (masked-diffusion perplexity only, None for a causal
    model): ``float64 [nsamples, draws]``, the per-(window, draw) NLL estimates whose mean is ``nll``.
    Two evaluations with the same windows, draws and seed share windows and masks, so their estimates
    can be differenced draw by draw (:func:`paired_se`)."""

    nll: float  # nats per token
    nll_se: float
    ppl: float
    ppl_se: float
    tokens: int  # scored tokens per draw pass (nsamples * window length)
    nsamples: int
    draws: int  # 1 for causal perplexity
    kind: str  # "diffusion" or "causal"
    estimates: np.ndarray | None = field(default=None, repr=False, compare=False)
    window_nll: np.ndarray | None = field(default=None, repr=False, compare=False)  # float64 [nsamples]: each window's NLL

    def as_dict(self) -> dict:
        """The scalar fields (the per-draw ``estimates`` and per-window ``window_nll`` left out)."""
        return {k: v for k, v in self.__dict__.items() if k not in ("estimates", "window_nll")}


def load_text(text: str | None, default: Path = EVALUATION_TEXT) -> str:
    """``text`` itself, or the shipped file ``default`` when ``text`` is None."""
    if text is None:
        if not default.exists():
            raise SapError(f"The text file {default} is missing; pass text explicitly or restore sap_core/assets/text/.")
        text = default.read_text(encoding="utf-8")
    if not text.strip():
        raise SapError("The evaluation text is empty; give some text to score.")
    return text


def windows(handle: ModelHandle, text: str, seqlen: int, nsamples: int, prefix: str | None) -> tuple[torch.Tensor, int]:
    """``[nsamples, P + n]`` token ids: prefix (P tokens) + ``n = seqlen - P`` text tokens, evenly spread."""
    if seqlen < 2 or nsamples < 1:
        raise SapError("seqlen must be >= 2 and nsamples >= 1.")
    check_length(handle, seqlen, "seqlen (tokens per window, prefix included)")
    head = handle.encode(prefix or "")
    body = text_ids(handle.tokenizer, text)
    n = seqlen - len(head)
    if n < 1:
        raise SapError(f"The prefix takes {len(head)} tokens, leaving none of seqlen={seqlen}; shorten it or raise seqlen.")
    if len(body) < n:
        raise SapError(f"The text has {len(body)} tokens, fewer than one window of {n}; give more text or lower seqlen.")
    starts = np.linspace(0, len(body) - n, nsamples).astype(int)
    rows = [head + list(body[s : s + n]) for s in starts]
    return torch.tensor(rows, dtype=torch.long), len(head)


@torch.inference_mode()
def diffusion_perplexity(
    handle: ModelHandle,
    text: str | None = None,
    *,
    seqlen: int = 128,
    nsamples: int = 16,
    draws: int = 8,
    seed: int = 0,
    prefix: str | None = None,
    batch_size: int = 32,
    estimator: str = "llada",
    nll_type: str = "mc",
    progress: Progress | None = None,
    _all_positions: bool = False,
) -> PerplexityResult:
    """Masked-diffusion perplexity (Monte Carlo ELBO) of a DLM; see the module docstring. ``estimator``:
    ``llada`` (the LLaDA bound) or ``dream`` (Dream's forward process, with ``nll_type`` ``mc``, ``ar_ftb`` or
    ``ar_btf``; :mod:`sap_core.estimator`).

    The LM head runs at the masked (scored) positions only (:meth:`ModelHandle.logits` ``positions=``).
    ``_all_positions`` is the reference way, for tests and ``bench/eval_cost.py``: the head at every
    position and one cross-entropy call per (window, draw); same inputs, same estimates."""
    if handle.causal:
        raise SapError("diffusion_perplexity needs a masked-diffusion model; use causal_perplexity for a causal one.")
    check_estimator(estimator, nll_type)
    ar = nll_type != "mc"
    if draws < 2 and not ar:
        raise SapError("draws must be >= 2 to estimate the Monte Carlo error.")
    seqs, P = windows(handle, load_text(text), seqlen, nsamples, prefix)
    n = seqs.shape[1] - P
    gen = torch.Generator().manual_seed(seed)
    # Build every (window, draw) input up front, on the CPU generator, so results do not depend on batching.
    inputs, targets, ratios, truth = [], [], [], []
    for w in range(nsamples):
        for masked, chosen, ratio in _window_rows(seqs.shape[1], P, draws, estimator, nll_type, gen):
            inputs.append(seqs[w].masked_fill(masked, handle.mask_id))
            targets.append(chosen)
            ratios.append(ratio)
            truth.append(seqs[w])
    inputs, truth = torch.stack(inputs), torch.stack(truth)  # [rows, T]: every input and its unmasked window
    scored = torch.zeros(inputs.shape, dtype=torch.bool)
    for j, chosen in enumerate(targets):
        scored[j, chosen] = True
    ratios = torch.tensor(ratios, dtype=torch.float64)
    estimates = torch.zeros(len(inputs), dtype=torch.float64)
    for start in range(0, len(inputs), batch_size):
        batch, stop = inputs[start : start + batch_size], min(start + batch_size, len(inputs))
        if _all_positions:
            logits = handle.logits(batch).float()
            for i in range(batch.shape[0]):
                j = start + i
                pos = targets[j].to(logits.device)
                ce = F.cross_entropy(logits[i, pos], truth[j, targets[j]].to(logits.device), reduction="sum")
                estimates[j] = ce.double().item() / ratios[j].item() / n
        else:
            mask = scored[start:stop]
            logits = handle.logits(batch, positions=mask)  # [masked targets of the batch, V]
            target = truth[start:stop][mask].to(logits.device)
            # In chunks of rows, each made float32 on its own: a chunk's log-softmax stays in cache, and a bf16
            # model's logits are never copied whole.
            chunks = range(0, len(target), 256)
            ce = torch.cat([F.cross_entropy(logits[a : a + 256].float(), target[a : a + 256], reduction="none") for a in chunks])
            ce = ce.double().cpu()
            sums = torch.zeros(stop - start, dtype=torch.float64).index_add_(0, mask.nonzero()[:, 0], ce)
            estimates[start:stop] = sums / ratios[start:stop] / n
        report(progress, stop, len(inputs), "masked-diffusion perplexity")
    if ar:  # deterministic: one number per window (its rows summed), errors over windows as for a causal model
        per = estimates.view(nsamples, n).sum(1)
        nll = per.mean().item()
        se = per.std(unbiased=True).item() / math.sqrt(nsamples) if nsamples > 1 else float("nan")
        return PerplexityResult(nll, se, math.exp(nll), math.exp(nll) * se, nsamples * n, nsamples, 1, "diffusion")
    per = estimates.view(nsamples, draws)
    nll = per.mean().item()
    se = math.sqrt((per.var(dim=1, unbiased=True) / draws).sum().item()) / nsamples
    return PerplexityResult(
        nll, se, math.exp(nll), math.exp(nll) * se, nsamples * n, nsamples, draws, "diffusion", per.numpy(), per.mean(1).numpy()
    )


def _window_rows(T: int, P: int, draws: int, estimator: str, nll_type: str, gen: torch.Generator):
    """The rows of one window of ``T`` tokens (the first ``P`` the prefix): ``(masked bool [T], scored
    positions, divisor)`` each, the divisor being what the row's summed loss is divided by (with ``n``).
    LLaDA: ``draws`` rows, the number masked stratified over ``[1, n]``, divisor ``l / n``. Dream ``mc``: one
    stratified group of ``draws`` rows of :func:`~sap_core.estimator.dream_noise` over the text, divisor
    ``p``. Dream ``ar_*``: :func:`~sap_core.estimator.ar_rows` over the text, divisor 1."""
    n = T - P
    if estimator == "llada":
        u = torch.rand((), generator=gen).item()
        for d in range(draws):
            l = min(n, 1 + int((d + u) * n / draws))
            chosen = torch.randperm(n, generator=gen)[:l] + P
            masked = torch.zeros(T, dtype=torch.bool)
            masked[chosen] = True
            yield masked, chosen, l / n
    elif nll_type == "mc":
        masked, p = dream_noise(torch.arange(T) >= P, draws, gen)
        for d in range(draws):
            yield masked[d], masked[d].nonzero()[:, 0], p[d].item()
    else:
        masked, scored = ar_rows(T, range(P, T), nll_type)
        for d in range(n):
            yield masked[d], scored[d].nonzero()[:, 0], 1.0


@torch.inference_mode()
def causal_perplexity(
    handle: ModelHandle,
    text: str | None = None,
    *,
    seqlen: int = 128,
    nsamples: int = 16,
    prefix: str | None = None,
    batch_size: int = 16,
    progress: Progress | None = None,
) -> PerplexityResult:
    """Next-token perplexity of a causal model on the same windows as :func:`diffusion_perplexity`."""
    if not handle.causal:
        raise SapError("causal_perplexity needs a causal model; use diffusion_perplexity for a DLM.")
    seqs, P = windows(handle, load_text(text), seqlen, nsamples, prefix)
    if P < 1:
        raise SapError("A causal model needs at least one prefix token to predict the first text token from; give a prefix.")
    per = torch.zeros(nsamples, dtype=torch.float64)
    for start in range(0, nsamples, batch_size):
        batch = seqs[start : start + batch_size]
        logits = handle.logits(batch).float()
        pred = logits[:, P - 1 : -1]
        truth = batch[:, P:].to(logits.device)
        ce = F.cross_entropy(pred.reshape(-1, pred.shape[-1]), truth.reshape(-1), reduction="none")
        per[start : start + batch.shape[0]] = ce.view(batch.shape[0], -1).double().mean(1).cpu()
        report(progress, min(start + batch_size, nsamples), nsamples, "causal perplexity")
    nll = per.mean().item()
    se = per.std(unbiased=True).item() / math.sqrt(nsamples) if nsamples > 1 else float("nan")
    n = seqs.shape[1] - P
    return PerplexityResult(nll, se, math.exp(nll), math.exp(nll) * se, nsamples * n, nsamples, 1, "causal", None, per.numpy())


# --- scoring a model for comparisons (the sweep, Compare, Pick tau) ----------------------------------


@dataclass(frozen=True)
class EvalSpec:
    """How perplexity is scored (defaults: those of :func:`diffusion_perplexity`). ``text=None`` uses the
    built-in evaluation text.

    ``seqlen``: tokens per window (prefix included); ``nsamples``: number of windows; ``draws``:
    masking draws per window (Monte Carlo samples of the masked-diffusion bound, >= 2; ignored for
    causal models); ``seed`` fixes the draws, shared by every row; ``prefix``: conditioning text before
    every window, never scored (None: the tokenizer's BOS convention only; a causal model needs at
    least one prefix token); ``estimator`` (``llada`` or ``dream``; None: the model family's own, which keeps
    LLaDA-family numbers on the LLaDA bound) and ``nll_type`` (``mc``, or Dream's ``ar_ftb`` / ``ar_btf``):
    :mod:`sap_core.estimator`, masked-diffusion models only. Other measures (task accuracy) are :class:`Metric` objects of their own.
    """

    seqlen: int = 128
    nsamples: int = 16
    draws: int = 8
    seed: int = 0
    text: str | None = None
    prefix: str | None = None
    estimator: str | None = None
    nll_type: str = "mc"

    def validate(self) -> None:
        check_estimator(self.estimator, self.nll_type)
        for name in ("seqlen", "nsamples", "draws", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise SweepSpecError(f"{name} must be a whole number (got {value!r}).")
        if not 0 <= self.seed < 2**63:
            raise SweepSpecError(f"seed must be in [0, 2**63) (got {self.seed}).")
        if self.seqlen < 2 or self.nsamples < 1:
            raise SweepSpecError(f"seqlen must be >= 2 and nsamples >= 1 (got seqlen={self.seqlen}, nsamples={self.nsamples}).")
        if self.draws < 2:
            raise SweepSpecError(f"draws must be >= 2 to estimate the Monte Carlo error (got {self.draws}).")


@dataclass
class PerplexityRow:
    """What one evaluation gives the sweep (a view on :class:`sap_core.evaluate.PerplexityResult`).

    ``estimates``: ``float64 [nsamples, draws]``, the per-(window, draw) NLL estimates whose mean is
    ``nll`` (:attr:`sap_core.evaluate.PerplexityResult.estimates`; masked-diffusion perplexity only,
    None for a causal model). Two rows scored with the same :class:`EvalSpec` share windows and masks, so
    their estimates can be differenced draw by draw (:func:`paired_se`).
    """

    nll: float
    nll_se: float
    ppl: float
    ppl_se: float
    seconds: float
    result: Any = None
    estimates: np.ndarray | None = None


def perplexity(handle: ModelHandle, spec: EvalSpec, progress: Progress | None = None) -> PerplexityRow:
    """Score ``handle`` as it is now (dense, or with a variant applied): masked-diffusion perplexity for a
    DLM (with its per-(window, draw) estimates for paired comparisons), next-token perplexity for a causal
    model, both from :mod:`sap_core.evaluate`."""
    t0 = time.perf_counter()
    if handle.causal:
        result = causal_perplexity(
            handle, spec.text, seqlen=spec.seqlen, nsamples=spec.nsamples, prefix=spec.prefix, progress=progress
        )  # deterministic: no seed
    else:
        result = diffusion_perplexity(
            handle,
            spec.text,
            seqlen=spec.seqlen,
            nsamples=spec.nsamples,
            draws=spec.draws,
            seed=spec.seed,
            prefix=spec.prefix,
            estimator=spec.estimator or family_estimator(handle.family),
            nll_type=spec.nll_type,
            progress=progress,
        )
    seconds = time.perf_counter() - t0
    return PerplexityRow(
        float(result.nll), float(result.nll_se), float(result.ppl), float(result.ppl_se), seconds, result, result.estimates
    )


# --- metrics: what a sweep, Compare and the CLI score each model with ----------------------------------


@dataclass(frozen=True)
class Score:
    """What one :class:`Metric` gives for one model: ``columns``, the row's columns it fills (name -> value,
    in the order they appear in a table), and ``estimates``, ``float64 [windows, draws]`` per-(window, draw)
    estimates for paired differences where the metric has them (masked-diffusion perplexity), else None."""

    columns: dict[str, Any]
    estimates: np.ndarray | None = field(default=None, repr=False, compare=False)


class Metric(Protocol):
    """One measure of a model: perplexity (:class:`Perplexity`), task accuracy through lm-eval
    (:class:`sap_core.lmeval.accuracy.TaskAccuracy`), or whatever comes next. ``name`` says what it is;
    ``validate()`` refuses impossible settings with one line before any model work; ``score(handle, progress)``
    scores ``handle`` as it is now (dense, or with a variant applied: the caller holds the model's lock)."""

    @property
    def name(self) -> str: ...

    def validate(self) -> None: ...

    def score(self, handle: ModelHandle, progress: Progress | None = None) -> Score: ...


@dataclass(frozen=True)
class Perplexity:
    """Perplexity as a :class:`Metric` (:func:`perplexity` with ``spec``): the columns ``ppl``, ``ppl_se``,
    ``nll``, ``nll_se`` and ``eval_seconds``, and for a DLM the per-(window, draw) estimates."""

    spec: EvalSpec = field(default_factory=EvalSpec)
    columns: ClassVar[tuple[str, ...]] = ("ppl", "ppl_se", "nll", "nll_se", "eval_seconds")

    @property
    def name(self) -> str:
        return "ppl"

    def validate(self) -> None:
        self.spec.validate()

    def score(self, handle: ModelHandle, progress: Progress | None = None) -> Score:
        row = perplexity(handle, self.spec, progress)
        values = (row.ppl, row.ppl_se, row.nll, row.nll_se, row.seconds)
        return Score(dict(zip(self.columns, values)), row.estimates)


def score_all(handle: ModelHandle, metrics: Sequence[Metric], progress: Progress | None = None) -> Score:
    """Every metric's columns for ``handle`` as it is now, in the order of ``metrics``, and the per-draw
    estimates of the first metric that has them (a sweep's or Compare's paired errors: its perplexity)."""
    columns: dict[str, Any] = {}
    estimates = None
    for metric in metrics:
        s = metric.score(handle, progress)
        twice = sorted(set(s.columns) & set(columns))
        if twice:
            raise SweepSpecError(f"Two metrics fill the column {twice[0]}; score them in separate runs.")
        columns.update(s.columns)
        estimates = s.estimates if estimates is None else estimates
    return Score(columns, estimates)


def paired_se(a: np.ndarray, b: np.ndarray) -> float:
    """Monte Carlo standard error of ``mean(a) - mean(b)`` for per-(window, draw) estimates ``[W, D]``
    scored on the same windows and masks: the evaluator's own formula
    ``sqrt(sum_w Var_d(a - b)[w] / D) / W`` applied to the difference."""
    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    W, D = d.shape
    return float(math.sqrt((d.var(axis=1, ddof=1) / D).sum()) / W)


def paired_se_if_known(a: np.ndarray | None, b: np.ndarray | None) -> float:
    """:func:`paired_se` when both rows have per-draw estimates of one shape (scored with the same
    :class:`EvalSpec`), else NaN (a causal model, a CSV without its estimates): the one guard every
    paired comparison uses before falling back to independent errors."""
    if a is None or b is None or np.shape(a) != np.shape(b):
        return math.nan
    return paired_se(a, b)
