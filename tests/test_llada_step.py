"""The LLaDA sampler's step samples and scores only the block's still-masked positions (a speed-up: at an average
step half the block is decoded). Every number must be the full computation's: the whole block's noise is drawn,
so the generator's stream is unchanged, and the top-k runs over the same full-length score vector. The reference
below is the step as it was written before, over the whole block (the plain reading of the official sampler)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sap_core import diffusion
from sap_core.attention import AttentionRecorder
from sap_core.decoding import DecodeSpec, gumbel_argmax
from sap_core.diffusion import Request, generate, generate_batch


def full_block_unmask(self, x, block_logits, step, generator, mask_id):
    """The reference: every position of the block sampled and scored, decoded ones then set to -inf."""
    lo, hi, n_transfer = self.plan[step]
    block_logits = block_logits.double()
    masked = x[lo:hi] == mask_id
    u = torch.rand(block_logits.shape, generator=generator, dtype=torch.float64) if self.spec.temperature else None
    if u is None:
        x0 = block_logits.argmax(-1)
    else:
        x0 = (block_logits - self.spec.temperature * torch.log(-torch.log(u.clamp_min(torch.finfo(torch.float64).tiny)))).argmax(
            -1
        )
    x0_p = torch.softmax(block_logits, -1).gather(-1, x0[:, None])[:, 0]
    if self.spec.remasking == "random":
        score = torch.rand(hi - lo, generator=generator, dtype=torch.float64)
    elif self.spec.remasking == "entropy":
        p = torch.softmax(block_logits / self.spec.temperature if self.spec.temperature > 0 else block_logits, -1)
        score = torch.special.xlogy(p, p).sum(-1)
    else:
        score = x0_p.clone()
    score[~masked] = -float("inf")
    chosen = torch.topk(score, n_transfer).indices
    x[lo + chosen] = x0[chosen]
    pos = (lo + chosen).numpy()
    self.decoded_at[pos] = step
    self.confidence[step, pos] = x0_p[chosen].float().numpy()


SPECS = [
    DecodeSpec(32, 32, 32, temperature=0.8, seed=1),
    DecodeSpec(32, 16, 8, temperature=0.0, seed=2),
    DecodeSpec(32, 32, 16, temperature=1.5, remasking="random", seed=3),
    DecodeSpec(32, 8, 32, temperature=0.8, remasking="entropy", seed=4),
    DecodeSpec(32, 16, 16, temperature=0.8, cfg_scale=1.0, seed=5),
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.remasking}-T{s.temperature}-cfg{s.cfg_scale}-b{s.block_length}")
def test_the_masked_only_step_equals_the_full_block_step(tiny_dlm, one_thread, monkeypatch, spec):
    ours = generate(tiny_dlm, "ROMEO.\n", spec, recorder=AttentionRecorder())
    monkeypatch.setattr(diffusion._Row, "unmask", full_block_unmask)
    theirs = generate(tiny_dlm, "ROMEO.\n", spec, recorder=AttentionRecorder())
    assert np.array_equal(ours.tokens, theirs.tokens) and np.array_equal(ours.decoded_at, theirs.decoded_at)
    assert np.array_equal(ours.confidence, theirs.confidence, equal_nan=True)
    assert np.array_equal(ours.mass, theirs.mass)


def test_a_batch_of_masked_only_steps_equals_the_full_block_steps(tiny_dlm, one_thread, monkeypatch):
    specs = [SPECS[0], DecodeSpec(32, 32, 32, temperature=0.8, seed=9), SPECS[4]]  # rows of one batch key
    requests = [Request("ROMEO.\n", s, AttentionRecorder()) for s in specs]
    ours = generate_batch(tiny_dlm, requests)
    monkeypatch.setattr(diffusion._Row, "unmask", full_block_unmask)
    theirs = generate_batch(tiny_dlm, requests)
    for a, b in zip(ours, theirs):
        assert np.array_equal(a.tokens, b.tokens) and np.array_equal(a.confidence, b.confidence, equal_nan=True)


def test_gumbel_rows_draw_the_whole_block():
    logits = torch.randn(7, 50, generator=torch.Generator().manual_seed(0))
    rows = torch.tensor([1, 4, 6])
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(gumbel_argmax(logits, 0.8, g1, rows=rows), gumbel_argmax(logits, 0.8, g2)[rows])
    assert torch.equal(g1.get_state(), g2.get_state())  # the same stream consumed: the next draw is the same
    assert torch.equal(gumbel_argmax(logits, 0.0, g1, rows=rows), logits.double().argmax(-1)[rows])
