"""Exact official reproduction: the built-in configs carry the keys the official LLaDA code reads,
SparseGPT's reference mask selection, and the official settings as one preset."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sap_core import ASSETS
from sap_core.errors import PruneSpecError
from sap_core.models.llada import LLaDAConfig
from sap_core.pruning import CalibrationSpec, PruneSpec
from sap_core.pruning.sparsegpt import Hessian, sparsegpt_prune

ROOT = Path(__file__).resolve().parents[1]

# Defaults of the official configuration's ModelConfig that describe another network than LLaDA's
# (the official code fills every key missing from config.json with them).
OFFICIAL_DEFAULTS_THAT_DIFFER = {
    "rope": False,
    "embedding_size": 50304,
    "attention_dropout": 0.1,
    "residual_dropout": 0.1,
    "embedding_dropout": 0.1,
    "layer_norm_type": "default",
    "activation_type": "swiglu",
    "block_type": "sequential",
}


@pytest.mark.parametrize("name", ["tiny-dlm", "tiny-ar"])
def test_builtin_configs_set_every_key_whose_official_default_differs(name):
    config = json.loads((ASSETS / "models" / name / "config.json").read_text())
    for key in OFFICIAL_DEFAULTS_THAT_DIFFER:
        assert key in config, f"{name}: '{key}' missing; the official code would use {OFFICIAL_DEFAULTS_THAT_DIFFER[key]!r}"
    assert config["rope"] is True and config["rope_full_precision"] is True and config["alibi"] is False
    assert config["embedding_size"] in (None, config["vocab_size"])
    assert config["attention_dropout"] == config["residual_dropout"] == config["embedding_dropout"] == 0.0
    assert config["layer_norm_type"] == "rms" and config["block_type"] == "llama" and config["activation_type"] == "silu"


def test_a_new_config_writes_the_official_keys(tmp_path):
    LLaDAConfig(d_model=32, n_heads=4, n_layers=2, vocab_size=64).save_pretrained(str(tmp_path))
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["rope"] is True and written["alibi"] is False and written["scale_logits"] is False
    assert LLaDAConfig.from_pretrained(str(tmp_path)).rope is True


def reference_sparsegpt(W, H, sparsity, blocksize=128, percdamp=0.01):
    """The reference SparseGPT (unstructured), written out from the algorithm: one threshold per
    column block over all rows, ``saliency <= sorted[int(numel * sparsity)]``, OBS updates."""
    W = W.clone().float()
    H = H.clone()
    cols = W.shape[1]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += percdamp * torch.mean(torch.diag(H)) * torch.eye(cols)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    for start in range(0, cols, blocksize):
        end = min(start + blocksize, cols)
        block = W[:, start:end].clone()
        err = torch.zeros_like(block)
        h = Hinv[start:end, start:end]
        saliency = block**2 / torch.diag(h)[None, :] ** 2
        pruned = saliency <= torch.sort(saliency.flatten())[0][int(saliency.numel() * sparsity)]
        for c in range(end - start):
            kept = torch.where(pruned[:, c], torch.zeros_like(block[:, c]), block[:, c])
            e = (block[:, c] - kept) / h[c, c]
            block[:, c:] -= torch.outer(e, h[c, c:])
            block[:, c] = kept
            err[:, c] = e
        W[:, start:end] = block
        W[:, end:] -= err @ Hinv[start:end, end:]
    return W


def test_official_selection_reproduces_the_reference_rule():
    torch.manual_seed(0)
    W = torch.randn(24, 300)
    H = Hessian(300, torch.device("cpu"))
    H.add(torch.randn(4, 64, 300) * torch.linspace(0.2, 3.0, 300))
    expected = reference_sparsegpt(W, H.matrix(), 0.5)
    got, mask = sparsegpt_prune(W, H.matrix(), 0.5, selection="official")
    assert torch.equal(mask, got == 0)
    assert torch.equal(got == 0, expected == 0)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    per_row = (mask.sum(1)).unique()
    assert per_row.numel() > 1, "one threshold per block leaves rows at different sparsities"
    _, row_mask = sparsegpt_prune(W, H.matrix(), 0.5)  # the project's default: every row at the target
    assert (row_mask.sum(1) == 150).all()


def test_official_preset():
    spec = PruneSpec.official("sink_sparsegpt", 0.5, seqlen=512)
    assert spec.calibration == CalibrationSpec.official(512)
    assert (spec.calibration.nsamples, spec.calibration.seqlen, spec.calibration.T, spec.calibration.interval) == (
        128,
        512,
        50,
        5,
    )
    assert spec.sparsegpt_selection == "official" and spec.sink.tau == 0 and (spec.sink.k, spec.sink.alpha) == (2.0, 5.0)
    spec.validate()
    with pytest.raises(PruneSpecError, match="official"):
        PruneSpec("sparsegpt", 0.5, sparsegpt_selection="per_column").validate()


def test_cli_preset_refuses_explicit_calibration_settings():
    proc = subprocess.run(
        [sys.executable, "-m", "sap_core", "prune", "--model", "tiny-dlm", "--preset", "official", "--calib-nsamples", "4"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode != 0 and "--calib-nsamples" in proc.stderr and "Traceback" not in proc.stderr


def test_official_selection_prunes_a_model(one_thread, tiny_dlm):
    from sap_core.pruning import prune

    calibration = CalibrationSpec(nsamples=2, seqlen=16, batch_size=2)
    official = prune(tiny_dlm, PruneSpec("sparsegpt", 0.5, calibration=calibration, sparsegpt_selection="official"))
    per_row = prune(tiny_dlm, PruneSpec("sparsegpt", 0.5, calibration=calibration))
    assert abs(official.achieved_sparsity - 0.5) < 0.05 and abs(per_row.achieved_sparsity - 0.5) < 0.01
    assert official.summary() != per_row.summary()
