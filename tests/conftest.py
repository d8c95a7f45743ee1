"""Shared fixtures: tiny random models written to disk in LLaDA's own format."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from sap_core.models import load_model
from sap_core.models.llada import LLaDAConfig, LLaDAModelLM

SPECIALS = ["[PAD]", "[BOS]", "[EOS]", "[MASK]"]
TEXT = [
    "To be, or not to be, that is the question.",
    "Whether 'tis nobler in the mind to suffer the slings and arrows of outrageous fortune,",
    "Or to take arms against a sea of troubles, and by opposing end them.",
    "All the world's a stage, and all the men and women merely players.",
]


def make_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXT, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", bos_token="[BOS]", eos_token="[EOS]", mask_token="[MASK]")


def make_model_dir(path: Path, *, causal: bool = False, seed: int = 0, **overrides) -> Path:
    """Write a tiny random LLaDA-format model (config, model.safetensors, tokenizer) to ``path``."""
    tokenizer = make_tokenizer()
    torch.manual_seed(seed)
    kwargs = dict(d_model=32, n_heads=4, n_kv_heads=4, n_layers=2, mlp_hidden_size=64, vocab_size=len(tokenizer),
                  max_sequence_length=256, rope_theta=10000.0, mask_token_id=tokenizer.mask_token_id, causal=causal)
    kwargs.update(overrides)
    model = LLaDAModelLM(LLaDAConfig(**kwargs))
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path


@pytest.fixture(scope="session")
def tiny_dlm_dir(tmp_path_factory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("tiny-dlm"))


@pytest.fixture(scope="session")
def tiny_ar_dir(tmp_path_factory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("tiny-ar"), causal=True)


@pytest.fixture(scope="session")
def tiny_dlm(tiny_dlm_dir):
    return load_model(tiny_dlm_dir, device="cpu")


@pytest.fixture(scope="session")
def tiny_ar(tiny_ar_dir):
    return load_model(tiny_ar_dir, device="cpu")
