"""The shipped built-in models (issue 3): they load, generate, score well, and can be rebuilt."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoModel, PreTrainedTokenizerFast

from sap_core.decoding import DecodeSpec
from sap_core.diffusion import generate
from sap_core.evaluate import causal_perplexity, diffusion_perplexity, load_text
from sap_core.models import BUILTIN_MODELS, load_model
from sap_core.models.llada import LLaDAModelLM

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dlm():
    return load_model("tiny-dlm", device="cpu")


@pytest.fixture(scope="module")
def ar():
    return load_model("tiny-ar", device="cpu")


@pytest.mark.parametrize("name", list(BUILTIN_MODELS))
def test_directory_is_complete_and_small(name):
    path = BUILTIN_MODELS[name]
    for file in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "MODEL_CARD.md",
    ):
        assert (path / file).exists(), file
    assert sum(f.stat().st_size for f in path.iterdir()) < 15 * 2**20
    model = AutoModel.from_pretrained(str(path))
    assert isinstance(model, LLaDAModelLM)
    tok = PreTrainedTokenizerFast.from_pretrained(str(path))
    assert (tok.pad_token, tok.bos_token, tok.eos_token, tok.mask_token) == ("[PAD]", "[BOS]", "[EOS]", "[MASK]")
    assert model.config.mask_token_id == tok.mask_token_id
    assert json.loads((path / "special_tokens_map.json").read_text())["mask_token"] == "[MASK]"


def test_both_share_one_tokenizer(dlm, ar):
    assert dlm.encode("What news, my lord?") == ar.encode("What news, my lord?")
    assert dlm.mask_id == ar.mask_id and not dlm.causal and ar.causal


@pytest.mark.parametrize("which", ["dlm", "ar"])
def test_generates_text(which, dlm, ar):
    handle = dlm if which == "dlm" else ar
    traj = generate(handle, "ROMEO.\n", DecodeSpec(gen_length=32, steps=32, block_length=16, temperature=0.8, seed=0))
    assert not (traj.final_tokens == handle.mask_id).any()
    text = handle.decode(traj.generated_ids)
    assert len(text.strip()) > 10 and "[MASK]" not in text


def test_heldout_loss_beats_broken_weights(dlm, ar):
    # Uniform guessing over 4096 tokens costs ln(4096) = 8.3 nats; the card reports about 5 (DLM) and lower (AR).
    text = load_text(None)[:20_000]
    elbo = diffusion_perplexity(dlm, text, seqlen=64, nsamples=4, draws=4, seed=0)
    nll = causal_perplexity(ar, text, seqlen=64, nsamples=4)
    assert elbo.nll < 6.0, elbo
    assert nll.nll < 5.5, nll


def test_training_recipe_smoke(tmp_path):
    # as a module from the checkout's root, so that it finds sap_core whether or not the package is installed
    out = subprocess.run(
        [sys.executable, "-m", "scripts.train_builtin", "--smoke", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    for name in ("tiny-dlm", "tiny-ar"):
        assert (tmp_path / "models" / name / "special_tokens_map.json").exists()
        handle = load_model(tmp_path / "models" / name, device="cpu")
        assert handle.mask_id == handle.tokenizer.mask_token_id
        traj = generate(handle, "To be", DecodeSpec(gen_length=8, steps=8, block_length=8))
        assert np.all(traj.final_tokens != handle.mask_id)
