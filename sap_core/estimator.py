"""Which likelihood estimator scores a masked-diffusion model, and Dream's forward process.

Two estimators of a masked-diffusion model's log-likelihood bound, each as its authors run it:

* ``llada``: LLaDA's (``eval_llada.py`` / ``get_log_likelihood``): the *number* of masked tokens is
  stratified over the Monte Carlo rows, that many tokens are masked at random, the loss is divided by the
  mask ratio. The code lives with its users (:mod:`sap_core.evaluate`, :mod:`sap_core.lmeval.model`).
* ``dream``: Dream's (HKUNLP/Dream ``eval/eval.py``, the ``dream`` lm-eval model; the same forward process
  as ``main_dream.py``'s perplexity in VILA-Lab/Sink-Aware-Pruning). ``nll_type``:

  - ``mc``: a continuous ``t`` per row from a low-discrepancy draw over a group of ``b`` rows
    (``t_i = (u + i / b) mod 1``, one uniform ``u`` per group), each noisable token masked independently
    with probability ``p = (1 − ε)·t + ε``, the first and last positions of the sequence never masked (BOS and
    the EOS that Dream appends), the loss on the masked tokens divided by ``p`` (:func:`dream_noise`);
  - ``ar_ftb`` / ``ar_btf``: deterministic, one row per scored token: the token and every token after it
    (``ar_ftb``, left to right) or before it (``ar_btf``, right to left) masked, the token's loss summed
    (:func:`ar_rows`).

Dream's logits are shifted (token ``i`` predicted at position ``i − 1``);
:meth:`sap_core.models.ModelHandle.logits` already aligns them, so the estimators index them like LLaDA's.
"""

from __future__ import annotations

import torch

from sap_core.errors import SapError

ESTIMATORS = ("llada", "dream")
NLL_TYPES = ("mc", "ar_ftb", "ar_btf")
SAMPLING_EPS = 1e-3  # Dream's ``sampling_eps``: the smallest masking probability


class EstimatorError(SapError):
    """An estimator setting SinkScope does not know."""


def family_estimator(family: str) -> str:
    """The estimator a model family's authors evaluate with: ``dream`` for Dream, ``llada`` otherwise."""
    return "dream" if family == "Dream" else "llada"


def check_estimator(estimator: str | None, nll_type: str) -> None:
    """One-line errors for an unknown ``estimator`` (None: the family's own) or ``nll_type``, and for an
    ``nll_type`` other than ``mc`` with the LLaDA estimator (which has no other)."""
    if estimator is not None and estimator not in ESTIMATORS:
        raise EstimatorError(
            f"estimator must be one of {', '.join(ESTIMATORS)} (got {estimator!r}); leave it out for the family's own."
        )
    if nll_type not in NLL_TYPES:
        raise EstimatorError(f"nll_type must be one of {', '.join(NLL_TYPES)} (got {nll_type!r}); mc is Dream's default.")
    if estimator == "llada" and nll_type != "mc":
        raise EstimatorError(f"nll_type={nll_type} is Dream's; the llada estimator has only mc (use estimator=dream).")


def dream_noise(
    noisable: torch.Tensor, rows: int, generator: torch.Generator, eps: float = SAMPLING_EPS
) -> tuple[torch.Tensor, torch.Tensor]:
    """One group of ``rows`` rows of Dream's ``_forward_process`` over a sequence of ``T`` positions:
    ``(masked bool [rows, T], p float32 [rows])``. ``noisable`` (bool ``[T]``): the positions the caller lets
    the noise touch (the continuation for ``log_type=ftb``); the first and last positions are never masked.
    The draws are Dream's, in its order: ``u`` (one float32), then a ``[rows, T]`` uniform tensor over the
    whole sequence, so a transcription seeded alike masks the same tokens."""
    T = noisable.shape[0]
    u = torch.rand(1, generator=generator, dtype=torch.float32)
    t = (u + torch.arange(rows).float() / rows) % 1
    p = (1 - eps) * t + eps
    masked = torch.rand((rows, T), generator=generator) < p[:, None]
    masked &= noisable[None, :]
    masked[:, 0] = False
    masked[:, -1] = False
    return masked, p


def ar_rows(T: int, span: range, nll_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Dream's ``_eval_target_nll_ar`` rows over the positions ``span`` of a sequence of ``T``:
    ``(masked bool [n, T], scored bool [n, T])``, one row per position of ``span``, which is scored with every
    later (``ar_ftb``) or earlier (``ar_btf``) position of ``span`` masked as well."""
    n = len(span)
    assert nll_type in ("ar_ftb", "ar_btf") and n >= 1 and span.stop <= T
    full = torch.ones(n, n, dtype=torch.bool)
    inner = torch.triu(full) if nll_type == "ar_ftb" else torch.tril(full)
    masked = torch.zeros(n, T, dtype=torch.bool)
    masked[:, span.start : span.stop] = inner
    scored = torch.zeros(n, T, dtype=torch.bool)
    scored[:, span.start : span.stop] = torch.eye(n, dtype=torch.bool)
    return masked, scored
