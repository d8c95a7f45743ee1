"""The LLaDA sampler against LLaDA's own ``generate.py`` (ML-GSAI/LLaDA @41760b9), transcribed below in this
project's words: the same blocks and even split of each block's masked tokens over its steps, the same
unsupervised CFG, the same low-confidence order (the float64 probability of the token picked, decoded positions
and later blocks out), on the same model.

What is compared and what is not: with greedy decoding (temperature 0) nothing is random, so the tokens must be
identical. With temperature > 0 the two draw different noise: ``generate.py`` draws ``exp(logits) / (−log u)^T``
over the whole sequence from the global generator, SinkScope ``logits − T·log(−log u)`` over the current block from
the run's own seeded generator — the same distribution (the argmax of either is a sample of ``softmax(logits / T)``),
not the same stream; likewise the "random" order (``torch.rand`` float32 there, float64 here). Those are tested for
what they are in tests/test_llada_step.py and tests/test_scheduler.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sap_core.decoding import DecodeSpec
from sap_core.diffusion import generate


def official_generate(handle, prompt_ids, steps, gen_length, block_length, cfg_scale=0.0):
    """generate.py's ``generate`` at temperature 0, remasking 'low_confidence', batch of one."""
    mask_id, P = handle.mask_id, len(prompt_ids)
    x = torch.full((1, P + gen_length), mask_id, dtype=torch.long)
    x[0, :P] = torch.tensor(prompt_ids)
    prompt_index = x != mask_id
    n_blocks = gen_length // block_length
    per_block = steps // n_blocks
    for b in range(n_blocks):
        lo, hi = P + b * block_length, P + (b + 1) * block_length
        masked = int((x[0, lo:hi] == mask_id).sum())
        counts = [masked // per_block + (1 if i < masked % per_block else 0) for i in range(per_block)]
        for i in range(per_block):
            mask_index = x == mask_id
            if cfg_scale > 0:
                un_x = x.clone()
                un_x[prompt_index] = mask_id
                cond, un = handle.logits(torch.cat([x, un_x])).chunk(2)
                logits = un + (cfg_scale + 1) * (cond - un)
            else:
                logits = handle.logits(x)
            x0 = logits.double().exp().argmax(-1)  # their noise at T = 0 is (−log u)^0 = 1
            p = torch.softmax(logits.double(), -1)
            x0_p = p.gather(-1, x0[..., None])[..., 0]
            x0_p[:, hi:] = -np.inf  # later blocks wait
            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, -np.inf)
            chosen = torch.topk(confidence[0], counts[i]).indices
            x[0, chosen] = x0[0, chosen]
    return x[0].numpy()


@pytest.mark.parametrize(
    "steps, gen_length, block_length, cfg_scale",
    [(32, 32, 32, 0.0), (16, 32, 8, 0.0), (9, 24, 8, 0.0), (16, 32, 16, 1.5)],
    ids=["one-block", "four-blocks", "uneven-split", "cfg"],
)
def test_greedy_tokens_are_llada_generate_pys(tiny_dlm, one_thread, steps, gen_length, block_length, cfg_scale):
    prompt = "ROMEO.\n"
    spec = DecodeSpec(gen_length, steps, block_length, temperature=0.0, cfg_scale=cfg_scale)
    ours = generate(tiny_dlm, prompt, spec)
    theirs = official_generate(tiny_dlm, tiny_dlm.encode(prompt), steps, gen_length, block_length, cfg_scale)
    assert np.array_equal(ours.final_tokens, theirs)
    assert (ours.final_tokens != tiny_dlm.mask_id).all()  # every position decoded by the last step
