"""Benchmark accuracy through lm-evaluation-harness: an ``lm_eval`` model over a SinkScope model.

:class:`SinkScopeLM` wraps a loaded :class:`~sap_core.models.ModelHandle`, optionally with a pruned
variant swapped in for each call (``variant.applied``, under the model's lock), and is registered with
lm-eval as ``sinkscope``, so ``lm_eval.simple_evaluate(model=SinkScopeLM(handle), tasks=[...])`` and lm-eval's
own command line (``python -m sap_core.benchmark --model sinkscope --model_args model=tiny-dlm,mc_num=32 ...``)
both work.

**Masked-diffusion models** score a continuation with the official estimator (LLaDA's ``eval_llada.py``,
which the paper's code uses): ``mc_num`` copies of prompt + continuation in groups of ``batch_size``; in each
group one uniform ``k`` in ``[1, n]`` stratifies the number of masked continuation tokens over the group
(``round(linspace(k, k + (b - 1)·n / b, b))`` wrapped into ``[1, n]``), each row masks that many continuation
tokens at random, and the cross-entropy on the masked tokens, divided by the mask ratio, averaged over the
``mc_num`` rows, is minus the log-likelihood bound. Unsupervised classifier-free guidance (``cfg > 0``) as the
official ``get_logits``: ``un + (cfg + 1)·(cond − un)`` with the prompt masked in the unconditional row. The
context / continuation split follows the official ``_encode_pair`` (trailing spaces of the context move to
the continuation). Differences from the official class, none of which changes an estimate: every request
draws its masks from its own generator, seeded from ``seed`` and the request's token ids
(:func:`request_seed`), so a request gets the same masks whatever the order, ``--limit`` or model (dense and
variants are paired draw for draw, and choices scoring the same continuation share masks); all masks are drawn first,
a row repeating another of its request (the same masked set) runs once and counts twice, and the forward passes run
over rows of several requests of equal length at once; the LM head runs at the masked positions only
(:meth:`ModelHandle.logits` ``positions=``). ``tests/test_benchmark.py`` checks equality with a transcription
of the official ``get_loglikelihood`` (same seed). ``is_check_greedy``: whether greedy decoding of the
continuation, one most-confident token per step (:func:`sap_core.diffusion.generate`), gives it back.
``loglikelihood_rolling`` (which the official class lacks) sums the same bound over lm-eval's disjoint rolling
windows; ``generate_until`` decodes with the project's sampler (``gen_length``, ``steps``, ``block_length``,
``cfg``, greedy) and cuts at the first stop sequence.

**Dream's estimator** (``estimator=dream``, the default for a Dream model; :mod:`sap_core.estimator`): as HKUNLP/Dream
``eval/eval.py``'s lm-eval model. The continuation ends with the tokenizer's EOS (Dream's ``_encode_pair``;
``add_bos_token`` prepends the BOS text to the context); ``nll_type=mc``: ``mc_num / batch_size`` groups of
``batch_size`` rows, a continuous ``t`` per row (``t_i = (u + i / b) mod 1``), each token of the noised side
(``log_type``: ``ftb`` the continuation, ``btf`` the context, ``union`` both) masked with probability
``(1 − ε)t + ε``, the first and last positions never masked, the loss on the masked tokens over that
probability, averaged over the ``mc_num`` rows (over the sequence length too for ``union``); ``ar_ftb`` /
``ar_btf``: one row per token of the scored side, the token and those after (before) it masked, losses summed.
Dream's shifted logits are aligned by :meth:`ModelHandle.logits`. Classifier-free guidance (``cfg > 0``) is
Dream's ``classifier_free_guidance = cfg + 1``, the unconditional row masking the conditioning side. Masks come
from the request's own generator as above (the draws in Dream's order: ``u``, then a uniform ``[b, T]``), so
dense and variants are paired; ``loglikelihood_rolling`` (which Dream's class lacks) scores the windows as
``main_dream.py``'s perplexity does: no EOS appended, the window's last token never masked.
``tests/test_dream_estimator.py`` checks equality with a transcription of Dream's ``_eval_target_nll_mc`` /
``_eval_target_nll_ar``.

**Causal models** score exactly: the sum of next-token log-probabilities of the continuation, and whether
each continuation token is the argmax.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import numbers
import sys
from collections import defaultdict
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window, simple_parse_args_string
from safetensors.torch import load_file

from sap_core.compare import variant_context
from sap_core.decoding import DecodeSpec
from sap_core.diffusion import generate
from sap_core.errors import Cancelled, SapError
from sap_core.estimator import SAMPLING_EPS, ar_rows, check_estimator, dream_noise, family_estimator
from sap_core.lmeval.tasks import TASKS_DIR, offline
from sap_core.models import ModelHandle, load_model
from sap_core.progress import Progress, report
from sap_core.pruning.spec import PruneSpec
from sap_core.pruning.variant import PrunedVariant, fingerprint, is_variant_dir, param_names, same_weights, target_linears
from sap_core.text import check_length

MODEL_NAME = "sinkscope"
ROW_TOKENS = 4096  # tokens per forward pass when rows of several requests are stacked (speed only)
LOG_TYPES = ("ftb", "btf", "union")


class BenchSpecError(SapError):
    """Impossible benchmark settings."""


@dataclass(frozen=True)
class BenchSpec:
    """How :class:`SinkScopeLM` scores. ``mc_num`` Monte Carlo rows per request in groups of ``batch_size``
    (a group shares one stratified draw, so ``mc_num`` must be a multiple of ``batch_size``); ``cfg``:
    unsupervised classifier-free guidance scale (0 = off); ``is_check_greedy``: also check greedy decoding
    (masked-diffusion models; one forward pass per continuation token); ``seed``: of the masks;
    ``gen_length`` / ``steps`` / ``block_length``: ``generate_until``'s sampler (greedy).

    Dream's evaluation (:mod:`sap_core.estimator`): ``estimator`` ``llada`` or ``dream`` (None: the family's
    own, dream for a Dream model); ``nll_type`` ``mc``, ``ar_ftb`` or ``ar_btf``; ``log_type`` ``ftb`` (score the
    continuation given the context), ``btf`` (the context given the continuation) or ``union`` (both, divided by
    their length); ``sampling_eps``: ε of the masking probability; ``add_bos_token``: prepend the tokenizer's BOS
    text to the context (Dream's ``eval_dream_mc.sh`` sets it)."""

    mc_num: int = 32
    batch_size: int = 32
    cfg: float = 0.0
    is_check_greedy: bool = False
    seed: int = 0
    gen_length: int = 64
    steps: int = 64
    block_length: int = 64
    estimator: str | None = None
    nll_type: str = "mc"
    log_type: str = "ftb"
    sampling_eps: float = SAMPLING_EPS
    add_bos_token: bool = False

    def __post_init__(self) -> None:
        for f in ("mc_num", "batch_size", "seed", "gen_length", "steps", "block_length"):
            value = getattr(self, f)
            if isinstance(value, str) and value.strip().lstrip("-").isdigit():
                value = int(value)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise BenchSpecError(f"{f} must be a whole number (got {value!r}).")
            object.__setattr__(self, f, int(value))
        for f in ("mc_num", "batch_size", "gen_length", "steps", "block_length"):
            if getattr(self, f) < 1:
                raise BenchSpecError(f"{f} must be at least 1 (got {getattr(self, f)}).")
        if self.mc_num % self.batch_size:
            raise BenchSpecError(
                f"mc_num ({self.mc_num}) must be a multiple of batch_size ({self.batch_size}): the estimator stratifies "
                f"within groups of batch_size rows; e.g. mc_num={max(1, round(self.mc_num / self.batch_size)) * self.batch_size}."
            )
        cfg = self.cfg
        if isinstance(cfg, str):
            try:
                cfg = float(cfg)
            except ValueError:
                raise BenchSpecError(f"cfg must be a number (got {cfg!r}).") from None
        if isinstance(cfg, bool) or not isinstance(cfg, numbers.Real) or not math.isfinite(cfg) or cfg < 0:
            raise BenchSpecError(f"cfg must be a finite number >= 0 (got {cfg!r}); 0 turns guidance off.")
        object.__setattr__(self, "cfg", float(cfg))
        for f in ("is_check_greedy", "add_bos_token"):
            object.__setattr__(self, f, _flag(f, getattr(self, f)))
        self._check_dream_options()

    def _check_dream_options(self) -> None:
        if self.estimator == "":
            object.__setattr__(self, "estimator", None)
        if self.log_type not in LOG_TYPES:
            raise BenchSpecError(
                f"log_type must be one of {', '.join(LOG_TYPES)} (got {self.log_type!r}); ftb is Dream's default."
            )
        check_options(self.estimator, self.nll_type, self.log_type)
        if self.nll_type != "mc" and self.log_type == "union":
            raise BenchSpecError(f"nll_type={self.nll_type} needs log_type ftb or btf (Dream's AR rows score one side).")
        if self.cfg > 0 and self.log_type == "union":
            raise BenchSpecError("cfg needs log_type ftb or btf: with union nothing is left to condition on (set cfg=0).")
        eps = self.sampling_eps
        if isinstance(eps, str):
            try:
                eps = float(eps)
            except ValueError:
                raise BenchSpecError(f"sampling_eps must be a number (got {eps!r}).") from None
        if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not 0 < eps < 1:
            raise BenchSpecError(f"sampling_eps must be a number in (0, 1) (got {eps!r}); Dream's is 0.001.")
        object.__setattr__(self, "sampling_eps", float(eps))

    def estimator_for(self, family: str) -> str:
        """The estimator that scores a model of ``family`` (``estimator``, else the family's own), refused in
        one line when the Dream options were asked of the LLaDA estimator."""
        estimator = self.estimator or family_estimator(family)
        check_options(estimator, self.nll_type, self.log_type)
        return estimator

    def forward_passes(self, requests: int) -> int:
        """Forward passes of ``requests`` log-likelihood requests as the official class runs them
        (``requests × mc_num / batch_size`` passes of ``batch_size`` rows)."""
        return requests * self.mc_num // self.batch_size


def _flag(name: str, value) -> bool:
    """A true/false setting, from lm-eval's ``--model_args`` text too."""
    if isinstance(value, str):
        if value.lower() not in ("true", "false", "1", "0"):
            raise BenchSpecError(f"{name} must be true or false (got {value!r}).")
        value = value.lower() in ("true", "1")
    return bool(value)


def check_options(estimator: str | None, nll_type: str, log_type: str) -> None:
    """:func:`~sap_core.estimator.check_estimator`, and ``log_type`` other than ``ftb`` refused for LLaDA's."""
    check_estimator(estimator, nll_type)
    if estimator == "llada" and log_type != "ftb":
        raise BenchSpecError(f"log_type={log_type} is Dream's; the llada estimator scores the continuation only (ftb).")


def request_seed(seed: int, target: list[int]) -> int:
    """The seed of one request's masks: from ``seed`` and the continuation's token ids, so the same request
    gets the same masks in any order, subset or model, and choices that score the same continuation after
    different contexts (the built-in task) share their masks, which makes their comparison less noisy."""
    h = hashlib.sha256(f"{seed}|{','.join(map(str, target))}".encode()).digest()
    return int.from_bytes(h[:8], "little") >> 1


def encode_pair(handle: ModelHandle, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """The official ``_encode_pair``: trailing whitespace of ``context`` moves to ``continuation``; the
    continuation's ids are the whole text's ids after the context's (the tokenizer's own BOS convention)."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = handle.encode(context + continuation)
    ctx = handle.encode(context)
    return ctx, whole[len(ctx) :]


def stratified_masks(n: int, mc_num: int, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """``bool [mc_num, n]``: which continuation tokens each Monte Carlo row masks, drawn as the official
    ``_forward_process`` draws them, group by group (one ``randint`` then one ``randperm`` per row)."""
    out = []
    b = batch_size
    for _ in range(mc_num // b):
        k = torch.randint(1, n + 1, (), generator=generator)
        x = torch.round(torch.linspace(float(k), k + (b - 1) * (n / b), steps=b)).long()
        x = ((x - 1) % n) + 1
        below = torch.arange(n).repeat(b, 1) < x.unsqueeze(1)
        for i in range(b):
            below[i] = below[i][torch.randperm(n, generator=generator)]
        out.append(below)
    return torch.cat(out)


@dataclass(frozen=True)
class Rows:
    """The Monte Carlo (or AR) rows of one request over its ``T`` tokens (context + continuation): ``masked``
    (bool ``[R, T]``) set to [MASK], ``scored`` (bool ``[R, T]``) whose cross-entropy is summed, divided by
    ``ratio`` (float64 ``[R]``) and weighted by ``count`` (float64 ``[R]``, repeats of a row run once); the
    request's log-likelihood is minus the rows' total over ``divisor``. ``condition`` (bool ``[T]``): what
    classifier-free guidance masks in the unconditional row."""

    masked: torch.Tensor
    scored: torch.Tensor
    ratio: torch.Tensor
    count: torch.Tensor
    divisor: float
    condition: torch.Tensor


def llada_rows(P: int, n: int, spec: BenchSpec, generator: torch.Generator) -> Rows:
    """LLaDA's estimator (the module docstring): :func:`stratified_masks` over the continuation, repeats merged."""
    masks, inverse = torch.unique(stratified_masks(n, spec.mc_num, spec.batch_size, generator), dim=0, return_inverse=True)
    masked = torch.cat([torch.zeros(len(masks), P, dtype=torch.bool), masks], dim=1)
    ratio = masks.sum(1).double() / n
    count = torch.bincount(inverse, minlength=len(masks)).double()
    return Rows(masked, masked, ratio, count, spec.mc_num, torch.arange(P + n) < P)


def dream_rows(P: int, n: int, spec: BenchSpec, generator: torch.Generator) -> Rows:
    """Dream's estimator (HKUNLP/Dream ``eval/eval.py``, :mod:`sap_core.estimator`) for ``log_type`` and
    ``nll_type``. ``mc``: ``mc_num / batch_size`` groups of :func:`~sap_core.estimator.dream_noise` over the
    noised side; rows masking nothing (they add 0) are dropped, rows masking the same set merged (their
    ``1 / p`` summed); minus the mean over the ``mc_num`` rows, divided by ``T`` for ``union``. ``ar_*``: one
    row per token of the scored side (:func:`~sap_core.estimator.ar_rows`), summed."""
    T = P + n
    side = {"ftb": range(P, T), "btf": range(0, P), "union": range(0, T)}[spec.log_type]
    condition = torch.arange(T) < P if spec.log_type == "ftb" else torch.arange(T) >= P
    if spec.nll_type != "mc":
        if not len(side):
            return _no_rows(T, condition)
        masked, scored = ar_rows(T, side, spec.nll_type)
        ones = torch.ones(len(masked), dtype=torch.float64)
        return Rows(masked, scored, ones, ones, 1.0, condition)
    noisable = torch.zeros(T, dtype=torch.bool)
    noisable[side.start : side.stop] = True
    draws = [dream_noise(noisable, spec.batch_size, generator, spec.sampling_eps) for _ in range(spec.mc_num // spec.batch_size)]
    masked = torch.cat([m for m, _ in draws])
    inv_p = 1 / torch.cat([p for _, p in draws]).double()
    keep = masked.any(1)
    if not keep.any():
        return _no_rows(T, condition)
    masks, inverse = torch.unique(masked[keep], dim=0, return_inverse=True)
    weight = torch.zeros(len(masks), dtype=torch.float64).index_add_(0, inverse, inv_p[keep])
    divisor = spec.mc_num * (T if spec.log_type == "union" else 1)
    return Rows(masks, masks, 1 / weight, torch.ones(len(masks), dtype=torch.float64), float(divisor), condition)


def _no_rows(T: int, condition: torch.Tensor) -> Rows:
    empty = torch.zeros(0, T, dtype=torch.bool)
    return Rows(empty, empty, torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.float64), 1.0, condition)


@register_model(MODEL_NAME)
class SinkScopeLM(LM):
    """lm-eval's model over a SinkScope :class:`ModelHandle` (see the module docstring). ``variant``: a
    :class:`~sap_core.pruning.PrunedVariant` swapped in for every call, a saved variant directory, or a
    separately loaded handle. From lm-eval's command line: ``--model_args model=NAME_OR_DIR,variant=DIR,...``
    with ``device``, ``dtype`` and :class:`BenchSpec`'s fields."""

    def __init__(
        self,
        handle: ModelHandle | None = None,
        variant=None,
        spec: BenchSpec | None = None,
        progress: Progress | None = None,
        **kw,
    ):
        super().__init__()
        spec_keys = {f.name for f in fields(BenchSpec)}
        given = {k: v for k, v in kw.items() if k in spec_keys}
        unknown = sorted(set(kw) - spec_keys - {"model", "device", "dtype"})
        if unknown:
            raise BenchSpecError(
                f"Unknown model_args {', '.join(unknown)}; use model, variant, device, dtype and {', '.join(sorted(spec_keys))}."
            )
        if spec is None:
            spec = BenchSpec(**given)
        elif given:
            raise BenchSpecError("Give either spec or its fields, not both.")
        if handle is None:
            if not kw.get("model"):
                raise BenchSpecError(
                    "model_args needs model=NAME_OR_DIR (a built-in name such as tiny-dlm, or a model directory)."
                )
            handle = load_model(kw["model"], device=kw.get("device") or "auto", dtype=kw.get("dtype") or "auto")
        if isinstance(variant, str):
            variant = load_variant(handle, variant) if variant else None
        elif variant is not None:
            variant_context(handle, variant)  # a type check only: a PrunedVariant or a loaded ModelHandle
            if isinstance(variant, ModelHandle):
                handle, variant = variant, None
        self.handle, self.variant, self.spec, self.progress = handle, variant, spec, progress
        self.estimator = None if handle.causal else spec.estimator_for(handle.family)
        if spec.add_bos_token and handle.tokenizer.bos_token is None:
            raise BenchSpecError("add_bos_token needs a tokenizer with a BOS token; this one has none (leave it out).")
        self.passes = 0  # forward passes run (each over up to ROW_TOKENS tokens)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None):
        """lm-eval's ``--model_args`` (as a dict) win over its ``--batch_size`` / ``--device`` flags (as in the
        official class, ``--batch_size`` is the stratification group when model_args give none)."""
        args = dict(arg_dict)
        for key in ("batch_size", "device"):
            value = (additional_config or {}).get(key)
            if key == "device" and str(value).startswith("cuda") and not torch.cuda.is_available():
                value = None  # lm-eval's default --device is cuda; "auto" picks the CPU here
            if value is not None and key not in args:
                args[key] = value
        return cls(**args)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    # --- lm-eval's interface ------------------------------------------------------------------------

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        bos = self.handle.tokenizer.bos_token if self.spec.add_bos_token else ""
        pairs = [encode_pair(self.handle, bos + req.args[0], req.args[1]) for req in requests]
        return self.score_pairs(pairs, append_eos=self.estimator == "dream")  # Dream's _encode_pair ends with EOS

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        h = self.handle
        bos = h.encode("")
        start = bos[0] if bos else (h.tokenizer.eos_token_id if h.causal else h.mask_id)
        if start is None:
            raise SapError(
                "This model's tokenizer has no BOS or EOS token to start a rolling window; it cannot score whole texts."
            )
        window = (h.max_length or 4096) - (0 if bos else 1)
        pairs, owner = [], []
        for r, req in enumerate(requests):
            ids = list(h.tokenizer.encode(req.args[0], add_special_tokens=False))
            for ctx, pred in map(make_disjoint_window, get_rolling_token_windows(ids, start, window, 1)):
                pairs.append((list(ctx), list(pred)))
                owner.append(r)
        out = [0.0] * len(requests)
        for r, (ll, _) in zip(owner, self.score_pairs(pairs, greedy=False)):
            out[r] += ll
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        s, h = self.spec, self.handle
        jobs = []
        for req in requests:
            context, kwargs = req.args[0], dict(req.args[1] or {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            gen = int(kwargs.get("max_gen_toks", s.gen_length)) if h.causal else s.gen_length
            spec = DecodeSpec(gen_length=gen, steps=s.steps, block_length=s.block_length, cfg_scale=s.cfg, seed=s.seed)
            ids = h.encode(context)
            spec.validate(h.causal, len(ids), h.max_length, h.family)  # every request checked before any work
            jobs.append((ids, spec, until))
        out = []
        with self._model() as model:
            for i, (ids, spec, until) in enumerate(jobs):
                text = model.decode(generate(model, ids, spec).generated_ids)
                cut = min((text.find(u) for u in until if u and u in text), default=len(text))
                out.append(text[:cut])
                report(self.progress, i + 1, len(jobs), "generate_until")
        return out

    # --- scoring ------------------------------------------------------------------------------------

    def _model(self):
        """The model to run and the context that makes it safe: the variant swapped in under the lock."""
        if self.variant is None:
            return _handle_context(self.handle)
        return self.variant.applied(self.handle)

    def check_pairs(self, pairs) -> None:
        """One-line errors before any work: a request longer than the model's context."""
        for i, (prefix, target) in enumerate(pairs):
            check_length(self.handle, len(prefix) + len(target), f"Request {i + 1} (context + continuation)")
            if not self.handle.causal and len(target) and self.spec.cfg > 0 and not len(prefix):
                raise BenchSpecError(f"Request {i + 1} has no context; classifier-free guidance needs one (set cfg=0).")
            if self.handle.causal and not len(prefix) and len(target):
                raise BenchSpecError(f"Request {i + 1} has no context token; a causal model needs one to predict from.")

    @torch.inference_mode()
    def score_pairs(self, pairs, greedy: bool | None = None, append_eos: bool = False) -> list[tuple[float, bool]]:
        """``(log-likelihood, is_greedy)`` of every ``(prefix ids, target ids)`` pair. ``append_eos`` (Dream's
        estimator): score each target followed by the tokenizer's EOS, as Dream's ``_encode_pair`` builds it
        (the greedy check still decodes the target alone)."""
        pairs = [(list(map(int, p)), list(map(int, t))) for p, t in pairs]
        scored = pairs
        if append_eos and not self.handle.causal:
            eos = self.handle.tokenizer.eos_token_id
            if eos is None:
                raise BenchSpecError(
                    "Dream's estimator ends each continuation with EOS; this tokenizer has none (use estimator=llada)."
                )
            scored = [(p, t + [int(eos)]) for p, t in pairs]
        self.check_pairs(scored)
        greedy = self.spec.is_check_greedy if greedy is None else greedy
        with self._model() as model:
            if model.causal:
                return self._causal(model, pairs)
            lls = self._diffusion(model, scored)
            flags = [False] * len(pairs)
            if greedy:
                flags = [bool(t) and self._greedy(model, p, t) for p, t in pairs]
        return list(zip(lls, flags))

    def _diffusion(self, h: ModelHandle, pairs) -> list[float]:
        s = self.spec
        # Draw every request's rows first (its own generator), then stack rows of equal length. A row that
        # repeats another of its request (the same masked set, e.g. all tokens masked) runs once, counted twice.
        groups: dict[int, list[int]] = defaultdict(list)
        rows, lls = {}, [0.0] * len(pairs)
        for i, (prefix, target) in enumerate(pairs):
            if target:
                g = torch.Generator().manual_seed(request_seed(s.seed, target))
                make = llada_rows if self.estimator == "llada" else dream_rows
                rows[i] = make(len(prefix), len(target), s, g)
                if len(rows[i].masked):
                    groups[len(prefix) + len(target)].append(i)
        total, done = sum(len(rows[i].masked) for v in groups.values() for i in v), 0
        for length, members in sorted(groups.items()):
            per_pass = max(1, ROW_TOKENS // length // (2 if s.cfg > 0 else 1))
            work = [(i, r) for i in members for r in range(len(rows[i].masked))]
            sums = defaultdict(float)
            for a in range(0, len(work), per_pass):
                chunk = work[a : a + per_pass]
                seq = torch.stack([torch.tensor(pairs[i][0] + pairs[i][1]) for i, _ in chunk])
                masked = torch.stack([rows[i].masked[r] for i, r in chunk])
                scored = torch.stack([rows[i].scored[r] for i, r in chunk])
                condition = torch.stack([rows[i].condition for i, _ in chunk])
                noisy = seq.masked_fill(masked, h.mask_id)
                logits = self._logits(h, noisy, scored, condition)
                ce = F.cross_entropy(logits.float(), seq[scored].to(logits.device), reduction="none").double().cpu()
                row_of = scored.nonzero()[:, 0]
                ratio = torch.stack([rows[i].ratio[r] for i, r in chunk])
                per_row = torch.zeros(len(chunk), dtype=torch.float64).index_add_(0, row_of, ce) / ratio
                for j, (i, r) in enumerate(chunk):
                    sums[i] += per_row[j].item() * rows[i].count[r].item()
                done += len(chunk)
                report(self.progress, done, total, "log-likelihood (Monte Carlo)")
            for i in members:
                lls[i] = -sums[i] / rows[i].divisor
        return lls

    def _logits(self, h: ModelHandle, noisy: torch.Tensor, scored: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        """Logits at the ``scored`` positions, guided as the official ``get_logits`` when ``cfg > 0``: the
        unconditional row masks the ``condition`` positions (the context)."""
        self.passes += 1
        if self.spec.cfg <= 0:
            return h.logits(noisy, positions=scored)
        uncond = noisy.masked_fill(condition, h.mask_id)
        both = h.logits(torch.cat([noisy, uncond]), positions=torch.cat([scored, scored]))
        cond, un = both[: len(both) // 2], both[len(both) // 2 :]
        return un + (self.spec.cfg + 1) * (cond - un)

    def _greedy(self, h: ModelHandle, prefix: list[int], target: list[int]) -> bool:
        n = len(target)
        spec = DecodeSpec(gen_length=n, steps=n, block_length=n, cfg_scale=self.spec.cfg)
        return generate(h, prefix, spec).generated_ids.tolist() == target

    def _causal(self, h: ModelHandle, pairs) -> list[tuple[float, bool]]:
        out = []
        for i, (prefix, target) in enumerate(pairs):
            if not target:
                out.append((0.0, True))
                continue
            seq = torch.tensor([prefix + target])
            self.passes += 1
            logits = h.logits(seq)[0, len(prefix) - 1 : -1].double().log_softmax(-1)
            truth = torch.tensor(target, device=logits.device)
            ll = logits.gather(-1, truth[:, None])[:, 0].sum().item()
            out.append((ll, bool((logits.argmax(-1) == truth).all())))
            report(self.progress, i + 1, len(pairs), "log-likelihood (exact)")
        return out


def make_lm(handle: ModelHandle, variant=None, spec: BenchSpec | None = None, progress: Progress | None = None) -> SinkScopeLM:
    """A :class:`SinkScopeLM` over ``handle`` (with ``variant`` applied for every call)."""
    return SinkScopeLM(handle, variant, spec, progress)


@contextlib.contextmanager
def _handle_context(handle: ModelHandle):
    with handle.lock:
        yield handle


def load_variant(handle: ModelHandle, directory):
    """A saved variant directory (``prune --save``) as a :class:`~sap_core.pruning.PrunedVariant` of
    ``handle``: its pruned linears' weights, refused when it was pruned from another model."""
    path = Path(directory).expanduser()
    if not is_variant_dir(path):
        raise SapError(f"'{directory}' is not a saved SinkScope variant (no pruning.json); save one with 'prune --save DIR'.")
    record = json.loads((path / "pruning.json").read_text(encoding="utf-8"))
    if "structure" in record:  # a structured variant is a smaller model with a standard config, not masks
        raise SapError(f"'{directory}' holds a structured variant (a smaller model); score it as a model directory of its own.")
    dense = record.get("dense_fingerprint")
    with handle.lock:
        if dense is None or not same_weights(dense, fingerprint(handle.module)):
            raise SapError(
                f"The variant '{directory}' was pruned from another model ({record.get('source')}), not from "
                f"{handle.name}; load that model, or prune this one."
            )
        names = param_names(handle.module)
        modules = [(b, name, names[id(m.weight)]) for b, name, m in target_linears(handle.module)]
    files = sorted(path.glob("*.safetensors"))
    state = {}
    for f in files:
        state.update(load_file(str(f)))
    missing = [p for _, _, p in modules if p not in state]
    if missing:
        raise SapError(f"The variant '{directory}' lacks the weight '{missing[0]}'; save it again with 'prune --save'.")
    spec = PruneSpec(method=record["method"], sparsity=record["sparsity"], pattern=record.get("pattern", "unstructured"))
    weights = {p: state[p] for _, _, p in modules}
    variant = PrunedVariant(spec, weights, modules, record.get("seconds", 0.0), {}, 0, None, str(path), dense_fingerprint=dense)
    variant.label = record.get("label") or spec.label
    return variant


def main(argv=None) -> int:
    """lm-eval's own command line with ``sinkscope`` registered (``python -m sap_core.benchmark --model sinkscope
    --model_args model=tiny-dlm,mc_num=32 --tasks sinkscope_nextline --include_path ...``); the built-in tasks'
    folder is added to ``--include_path`` when none is given. SinkScope's errors print one line."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not any(a == "--include_path" or a.startswith("--include_path=") for a in argv):
        argv += ["--include_path", str(TASKS_DIR)]
    sys.argv = ["lm_eval", *argv]
    from lm_eval.__main__ import cli_evaluate  # lazy: lm-eval's command-line module, needed by this command only

    try:
        with offline():
            cli_evaluate()
    except (SapError, Cancelled) as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    return 0
