"""Perplexity of DLMs (Monte Carlo ELBO) and causal models."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sap_core.errors import SapError
from sap_core.evaluate import causal_perplexity, diffusion_perplexity, load_text
from sap_core.models import load_model
from sap_core.text import text_ids

TEXT = (
    "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer "
    "the slings and arrows of outrageous fortune, or to take arms against a sea of troubles. "
) * 20


def test_diffusion_perplexity_is_seeded_and_finite(tiny_dlm):
    a = diffusion_perplexity(tiny_dlm, TEXT, seqlen=32, nsamples=4, draws=4, seed=1)
    b = diffusion_perplexity(tiny_dlm, TEXT, seqlen=32, nsamples=4, draws=4, seed=1, batch_size=3)
    c = diffusion_perplexity(tiny_dlm, TEXT, seqlen=32, nsamples=4, draws=4, seed=2)
    assert a == b  # same seed, any batching: the same number
    assert a.nll != c.nll
    assert math.isfinite(a.nll) and a.nll_se > 0 and a.ppl == pytest.approx(math.exp(a.nll))
    assert a.tokens == 4 * (32 - len(tiny_dlm.encode(""))) and a.kind == "diffusion"


def test_elbo_bounds_the_true_nll_of_a_tiny_vocabulary(tiny_dlm):
    # A uniform predictor over V tokens gives exactly log V per token whatever is masked.
    V = tiny_dlm.module.config.padded_vocab_size
    with torch.no_grad():
        saved = tiny_dlm.module.model.transformer.ff_out.weight.clone()
        tiny_dlm.module.model.transformer.ff_out.weight.zero_()
        try:
            res = diffusion_perplexity(tiny_dlm, TEXT, seqlen=32, nsamples=2, draws=4)
        finally:
            tiny_dlm.module.model.transformer.ff_out.weight.copy_(saved)
    assert res.nll == pytest.approx(math.log(V), rel=1e-6)
    assert res.nll_se == pytest.approx(0.0, abs=1e-5)
    np.testing.assert_allclose(res.estimates, math.log(V), rtol=1e-6)  # every draw's estimate, not just the mean


def test_diffusion_perplexity_returns_its_per_draw_estimates(tiny_dlm, tiny_ar):
    a = diffusion_perplexity(tiny_dlm, TEXT, seqlen=32, nsamples=4, draws=3, seed=1)
    b = diffusion_perplexity(tiny_dlm, TEXT, seqlen=32, nsamples=4, draws=3, seed=1, batch_size=5)
    e = a.estimates
    assert e.shape == (4, 3) and e.dtype == np.float64 and np.isfinite(e).all()
    np.testing.assert_array_equal(e, b.estimates)  # any batching: the same draws
    assert e.mean() == pytest.approx(a.nll, rel=1e-12)
    assert math.sqrt((e.var(axis=1, ddof=1) / 3).sum()) / 4 == pytest.approx(a.nll_se, rel=1e-9)
    assert "estimates" not in a.as_dict() and a.as_dict()["nll"] == a.nll
    assert causal_perplexity(tiny_ar, TEXT, seqlen=32, nsamples=2, prefix="The").estimates is None


@pytest.mark.parametrize("prefix", [None, "To be"])
def test_head_at_masked_positions_gives_the_full_logits_estimates(tiny_dlm, prefix):
    """Same windows, same masks, same estimates as the reference way (LM head at every position, one
    cross-entropy per row), for any batching."""
    ref = diffusion_perplexity(tiny_dlm, TEXT, seqlen=40, nsamples=4, draws=5, seed=3, prefix=prefix, _all_positions=True)
    for batch_size in (32, 7):
        new = diffusion_perplexity(tiny_dlm, TEXT, seqlen=40, nsamples=4, draws=5, seed=3, prefix=prefix, batch_size=batch_size)
        np.testing.assert_allclose(new.estimates, ref.estimates, rtol=1e-5)
        assert (new.nll, new.nll_se, new.tokens) == pytest.approx((ref.nll, ref.nll_se, ref.tokens), rel=1e-5)


def test_evaluation_and_calibration_texts_are_tokenized_once_per_tokenizer(tiny_dlm, tiny_ar):
    from sap_core.pruning import CalibrationSpec
    from sap_core.pruning.calibration import tokenize

    text_ids.cache_clear()
    a = diffusion_perplexity(tiny_dlm, TEXT, seqlen=32, nsamples=2, draws=2)
    assert text_ids.cache_info().misses == 1
    assert diffusion_perplexity(tiny_dlm, TEXT, seqlen=32, nsamples=2, draws=2) == a
    assert text_ids.cache_info().hits == 1
    causal_perplexity(tiny_ar, TEXT, seqlen=32, nsamples=2, prefix="To")  # another tokenizer: its own entry
    assert text_ids.cache_info().misses == 2
    assert text_ids(tiny_dlm.tokenizer, TEXT) == tuple(tiny_dlm.tokenizer.encode(TEXT, add_special_tokens=False))
    cal = CalibrationSpec(text=TEXT + " More.", seqlen=32, nsamples=2)
    first = tokenize(tiny_dlm, cal)  # pruning's calibration text goes through the same cache
    assert first == tokenize(tiny_dlm, cal) == tiny_dlm.tokenizer.encode(cal.text, add_special_tokens=False)
    assert (text_ids.cache_info().misses, text_ids.cache_info().hits) == (3, 3)


def test_prefix_is_not_scored(tiny_dlm):
    with_prefix = diffusion_perplexity(tiny_dlm, TEXT, seqlen=32, nsamples=2, draws=2, prefix="To be")
    assert with_prefix.tokens == 2 * (32 - len(tiny_dlm.encode("To be")))


def test_causal_perplexity(tiny_ar):
    a = causal_perplexity(tiny_ar, TEXT, seqlen=32, nsamples=4, prefix="To")
    assert math.isfinite(a.nll) and a.kind == "causal" and a.draws == 1
    assert a == causal_perplexity(tiny_ar, TEXT, seqlen=32, nsamples=4, prefix="To", batch_size=1)


def test_errors(tiny_dlm, tiny_ar):
    with pytest.raises(SapError, match="causal_perplexity"):
        diffusion_perplexity(tiny_ar, TEXT)
    with pytest.raises(SapError, match="diffusion_perplexity"):
        causal_perplexity(tiny_dlm, TEXT)
    with pytest.raises(SapError, match="fewer than one window"):
        diffusion_perplexity(tiny_dlm, "too short", seqlen=64)
    with pytest.raises(SapError, match="empty"):
        diffusion_perplexity(tiny_dlm, "   ")
    with pytest.raises(SapError, match="draws must be"):
        diffusion_perplexity(tiny_dlm, TEXT, draws=1)


@pytest.mark.parametrize("name", ["tiny-dlm", "tiny-ar"])
def test_zeroed_blocks_score_worse(name):
    """The trained built-in model against itself with every block's output projections zeroed
    (attention and MLP contribute nothing): the same windows and masks must cost clearly more."""
    handle = load_model(name, device="cpu")  # a fresh handle: nothing shared is changed
    text = load_text(None)[:20_000]

    def score():
        if handle.causal:
            return causal_perplexity(handle, text, seqlen=64, nsamples=4).nll
        return diffusion_perplexity(handle, text, seqlen=64, nsamples=4, draws=4, seed=0).nll

    intact = score()
    with torch.no_grad():
        for block in handle.module.blocks:
            block.attn_out.weight.zero_()
            block.ff_out.weight.zero_()
    broken = score()
    assert math.isfinite(intact) and broken > intact + 1.0, (intact, broken)
