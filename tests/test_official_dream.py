"""The official Dream pruning reproduced end to end (issue 29, item 3): on a tiny random Dream checkpoint,
SinkScope's sink_wanda, wanda and sink_sparsegpt against a transcription of ``lib/prune_dream.py``
(tests/official_dream.py, source and commit named there), on the same windows with the random draws of the
forward process matched (the transcription draws from SinkScope's generator), with and without right padding.

Agreement: the noised inputs are equal token for token; the sink masks to 1e-5; the pruned masks of sink_wanda,
wanda and sink_sparsegpt are equal (every weight) on unpadded windows, and those of sink_wanda and wanda on
right-padded ones. Not reproduced, by choice: on padded windows the official ``prune_sink_sparsegpt`` runs its
block-sequential stage under the *last* window's pad mask (the Catcher keeps one), SinkScope's under none (as
``prune_wanda`` / ``prune_sparsegpt``); its sink factors still agree there.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import TEXT
from official_dream import forward_diffusion, prune_sink, prune_sink_sparsegpt, prune_wanda, sink_detection
from test_families import make_dream_dir, qwen2_reference

from sap_core.errors import PruneSpecError
from sap_core.models import load_model
from sap_core.pruning import CalibrationSpec, PruneSpec, prune
from sap_core.pruning.calibration import attended_keys, calibration_ids, noised_ids, pad_token_id, tokenize
from sap_core.pruning.spec import OFFICIAL_DREAM_SEQLEN

pytestmark = pytest.mark.usefixtures("one_thread_module")

CAL = CalibrationSpec(text=" ".join(TEXT * 12), nsamples=3, seqlen=24, T=50, interval=10, batch_size=5)


@pytest.fixture(scope="module")
def dream_dir(tmp_path_factory):
    return make_dream_dir(tmp_path_factory.mktemp("dream_prune"))


@pytest.fixture(scope="module")
def dream(dream_dir):
    return load_model(dream_dir, device="cpu")


@pytest.fixture(scope="module")
def reference(dream_dir):
    return qwen2_reference(dream_dir)


def padded(dream, n_pad: int = 6) -> CalibrationSpec:
    """A calibration whose text is exactly one window that ends in ``n_pad`` ``<|endoftext|>``: every window
    is right-padded."""
    pad = dream.tokenizer.decode([pad_token_id(dream)])
    words = " ".join(TEXT)
    text = words + pad * n_pad
    seqlen = len(tokenize(dream, CalibrationSpec(text=text, seqlen=2)))
    return CalibrationSpec(text=text, nsamples=3, seqlen=seqlen, T=50, interval=10, batch_size=5)


def masks_of(variant) -> dict[str, torch.Tensor]:
    """``{module name: pruned mask}`` of a SinkScope variant."""
    return {pname.removesuffix(".weight"): w == 0 for pname, w in variant.weights.items()}


def agreement(ours: dict, theirs: dict) -> float:
    assert ours.keys() == theirs.keys()
    same = sum(int((ours[k] == theirs[k]).sum()) for k in ours)
    return same / sum(v.numel() for v in ours.values())


@pytest.mark.parametrize("strata, nsamples", [(1, 3), (3, 4)])
def test_dream_noising_draws_as_the_official_forward_process(dream, strata, nsamples):
    cal = CalibrationSpec(text=CAL.text, nsamples=nsamples, seqlen=24, T=50, interval=5, t_strata=strata).for_family(dream.family)
    assert cal.noising == "dream"
    token_ids = tokenize(dream, cal)
    clean, g = calibration_ids(token_ids, cal)
    ours = noised_ids(clean, cal, dream.mask_id, g)
    _, g = calibration_ids(token_ids, cal)  # the same generator, at the same place
    theirs = torch.zeros_like(ours)
    for b0 in range(0, nsamples, strata):  # prune_dream: for each batch, for each sampled step
        for s in range(len(cal.timesteps)):
            theirs[b0 : b0 + strata, s] = forward_diffusion(clean[b0 : b0 + strata], dream.mask_id, cal.eps, g)
    assert torch.equal(ours, theirs)
    masked = ours == dream.mask_id
    assert not masked[..., 0].any() and not masked[..., -1].any() and masked.any()
    rates = masked[..., 1:-1].float().mean(-1)  # one t per window and draw: the rates spread over (0, 1)
    assert rates.max() - rates.min() > 0.3


def test_llada_noising_is_unchanged_for_llada(tiny_dlm):
    cal = CalibrationSpec(text=CAL.text, nsamples=2, seqlen=24)
    assert cal.for_family(tiny_dlm.family).noising == "llada"
    token_ids = tokenize(tiny_dlm, cal)
    clean, g = calibration_ids(token_ids, cal)
    a = noised_ids(clean, cal, tiny_dlm.mask_id, g)
    clean, g = calibration_ids(token_ids, cal)
    assert torch.equal(a, noised_ids(clean, cal.for_family(tiny_dlm.family), tiny_dlm.mask_id, g))


@pytest.mark.parametrize("pad", [False, True], ids=["unpadded", "right-padded"])
def test_sink_wanda_is_the_official_prune_sink(dream, reference, pad):
    cal = padded(dream) if pad else CAL
    token_ids = tokenize(dream, cal)
    clean, g = calibration_ids(token_ids, cal)
    keys = attended_keys(clean, pad_token_id(dream))
    assert (keys is not None and not keys[:, -1].any()) if pad else keys is None
    theirs, noised, sink_masks = prune_sink(
        reference, clean, 0.5, dream.mask_id, pad_token_id(dream), g, steps=len(cal.timesteps)
    )
    v = prune(dream, PruneSpec("sink_wanda", 0.5, calibration=cal))
    np.testing.assert_array_equal(v.calibration.noised, noised.numpy())
    official_weights = 1 - torch.stack(sink_masks).reshape(len(clean), -1, clean.shape[1]).numpy()
    np.testing.assert_allclose(v.calibration.token_weights, official_weights, atol=1e-5)
    assert (v.calibration.token_weights < 0.5).any()  # some sinks: the weighting matters
    if pad:  # pad keys receive no mass
        assert (v.calibration.mass[:, :, ~keys[0].numpy()] == 0).all()
    assert agreement(masks_of(v), theirs) == 1.0


@pytest.mark.parametrize("pad", [False, True], ids=["unpadded", "right-padded"])
def test_wanda_is_the_official_prune_wanda(dream, reference, pad):
    cal = padded(dream) if pad else CAL
    clean, _ = calibration_ids(tokenize(dream, cal), cal)
    theirs = prune_wanda(copy.deepcopy(reference), clean, 0.5)
    v = prune(dream, PruneSpec("wanda", 0.5, calibration=cal))
    assert agreement(masks_of(v), theirs) == 1.0


@pytest.mark.parametrize("pad", [False, True], ids=["unpadded", "right-padded"])
def test_sink_sparsegpt_is_the_official_prune_sink_sparsegpt(dream, reference, pad):
    cal = padded(dream) if pad else CAL
    clean, g = calibration_ids(tokenize(dream, cal), cal)
    v = prune(dream, PruneSpec("sink_sparsegpt", 0.5, calibration=cal, sparsegpt_selection="official"))
    if pad:  # the sink stage agrees; the official block-sequential stage then masks the last window's pads
        mean_masks, noised = sink_detection(reference, clean, dream.mask_id, pad_token_id(dream), g, len(cal.timesteps))
    else:
        theirs, mean_masks = prune_sink_sparsegpt(
            copy.deepcopy(reference), clean, 0.5, dream.mask_id, pad_token_id(dream), g, len(cal.timesteps)
        )
        assert agreement(masks_of(v), theirs) == 1.0
    np.testing.assert_allclose(v.calibration.token_weights, 1 - mean_masks.numpy(), atol=1e-5)


def test_official_preset_is_main_dream():
    spec = PruneSpec.official("sink_wanda", 0.5, seqlen=131072, family="Dream")
    cal = spec.calibration
    assert (cal.seqlen, cal.nsamples, cal.seed, cal.T, cal.interval, cal.eps) == (OFFICIAL_DREAM_SEQLEN, 128, 0, 50, 5, 1e-3)
    assert (cal.noising, cal.t_strata) == ("dream", 1) and spec.sparsegpt_selection == "official"
    llada = PruneSpec.official("sink_wanda", 0.5, seqlen=4096 * 2, family="LLaDA").calibration
    assert (llada.seqlen, llada.noising) == (8192, "llada")
    spec.validate()


@pytest.mark.parametrize(
    "kw, match", [(dict(noising="bert"), "noising must be one of llada, dream"), (dict(t_strata=0), "t_strata")]
)
def test_bad_noising_settings_are_one_line_errors(kw, match):
    with pytest.raises(PruneSpecError, match=match):
        PruneSpec("sink_wanda", 0.5, calibration=CalibrationSpec(**kw)).validate()
