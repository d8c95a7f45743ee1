"""The decoding controls follow the family (issue 29): which options each family's controls offer
(sap_core.decoding.decoding_controls, what the explorer draws), the words a run is described with, and the
animation file names naming the sampler's settings."""

from __future__ import annotations

import pytest

from sap_core import animation
from sap_core.decoding import (
    DREAM_FIELDS,
    LLADA_FIELDS,
    MMADA_REMASKING,
    REMASKING,
    DecodeSpec,
    decoding_controls,
    decoding_words,
)
from sap_core.errors import DecodeSpecError


def test_llada_is_unchanged():
    c = decoding_controls("LLaDA", causal=False)
    assert (c.sampler, c.samplers, c.fields, c.remasking, c.note) == ("llada", (), LLADA_FIELDS, REMASKING, "")


def test_dream_offers_its_own_sampler_first_and_its_options_only():
    c = decoding_controls("Dream", causal=False)
    assert (c.sampler, c.samplers, c.fields) == ("dream", ("dream", "llada"), DREAM_FIELDS)
    assert not {"block_length", "remasking", "cfg_scale"} & set(c.fields)
    assert {"alg", "alg_temp", "eps", "top_p", "top_k"} <= set(c.fields)
    llada = decoding_controls("Dream", causal=False, sampler="llada")
    assert llada.fields == LLADA_FIELDS and "not Dream's own" in llada.note


def test_mmada_adds_text_only_and_its_remasking():
    c = decoding_controls("mmada", causal=False)
    assert c.sampler == "mmada" and c.fields == (*LLADA_FIELDS, "text_only") and c.remasking == MMADA_REMASKING
    assert "image tokens" in c.note


def test_causal_and_a_sampler_the_family_lacks():
    c = decoding_controls("llama", causal=True)
    assert c.sampler == "causal" and c.fields == ("temperature", "seed") and c.samplers == ()
    with pytest.raises(DecodeSpecError, match="not sampler 'dream'"):
        decoding_controls("LLaDA", causal=False, sampler="dream")


def test_words_and_file_names_name_the_samplers_settings():
    dream = DecodeSpec(64, 70, sampler="dream", alg="maskgit_plus", alg_temp=0.5, top_p=0.9, top_k=5, temperature=0.8)
    assert decoding_words(dream) == "70 steps, Dream's sampler, alg maskgit_plus (alg_temp 0.5), eps 0.001, top_p 0.9, top_k 5"
    assert animation.run_settings(dream) == "64tok-70steps-dream-maskgit_plus-at0.5-eps0.001-p0.9-k5-t0.8-seed0"
    llada = DecodeSpec(64, 64, 16, temperature=0.8)
    assert decoding_words(llada) == "64 steps, block 16, low_confidence, CFG 0"
    assert animation.run_settings(llada) == "64tok-64steps-b16-low_confidence-t0.8-cfg0-seed0"  # as before
    mmada = DecodeSpec(64, 64, 16, sampler="mmada", text_only=True)
    assert decoding_words(mmada).endswith("MMaDA's sampler, text tokens only")
    assert "-mmada-text-" in animation.run_settings(mmada)
    assert decoding_words(llada, causal=True) == "causal, one token per step"
