"""Picking tau: calibration reused across a sweep, tau sweeps, the calibration variance (issue 14)."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import TEXT
from sap_core.errors import SapError
from sap_core.pruning import CalibrationSpec, PruneSpec, prune
from sap_core.pruning.scores import CalibrationCache
from sap_core.sinks import SinkSpec
from sap_core.sweep import EvalSpec, SweepSpec, run_sweep

torch.set_num_threads(1)
CALIB = CalibrationSpec(text=" ".join(TEXT * 10), nsamples=2, seqlen=24, seed=0, T=20, interval=5, batch_size=3)
EVAL = EvalSpec(seqlen=24, nsamples=2, draws=2, seed=0, text=" ".join(TEXT * 10))
ALL = ("magnitude", "wanda", "sparsegpt", "sink_wanda", "sink_sparsegpt", "noised_wanda", "gated_sink_wanda",
       "gated_sink_sparsegpt")


@pytest.fixture(scope="module")
def both_ways(tiny_dlm):
    spec = SweepSpec(methods=ALL, sparsities=(0.3, 0.6), patterns=("unstructured", "2:4"), sink=SinkSpec(tau=0.01),
                     sink_taus=(0.0, 0.001, 0.05), calibration=CALIB, eval=EVAL)
    new = run_sweep(tiny_dlm, spec)
    old = run_sweep(tiny_dlm, spec, reuse_calibration=False)
    return spec, new, old


def test_reused_calibration_gives_the_rows_of_recalibrating_every_job(both_ways):
    spec, new, old = both_ways
    assert len(new) == len(old) == 1 + len(spec.jobs)
    assert list(new["label"]) == list(old["label"])
    for col in ("nll", "ppl", "nll_se", "actual_sparsity"):
        np.testing.assert_allclose(new[col], old[col], rtol=1e-6, atol=1e-9, err_msg=col)
    for label, est in old.attrs["estimates"].items():
        np.testing.assert_allclose(new.attrs["estimates"][label], est, rtol=1e-6, atol=1e-9)
    # Not vacuous: the methods and taus do give different models.
    gated = new[new["method"].str.startswith("gated_sink_wanda") & (new["pattern"] == "unstructured")
                & (new["sparsity"] == 0.6)]
    assert gated["tau"].tolist() == [0.0, 0.001, 0.05] and gated["nll"].nunique() >= 2


def test_cache_computes_the_noised_pass_once_and_matches_a_plain_prune(tiny_dlm):
    cache = CalibrationCache()
    specs = [PruneSpec(m, s, sink=SinkSpec(tau=t), calibration=CALIB)
             for m in ("sink_wanda", "noised_wanda", "gated_sink_wanda") for s in (0.3, 0.6) for t in (0.0, 0.02)]
    for ps in specs:
        cache.plan(tiny_dlm, ps)
    ticks = []
    variants = [prune(tiny_dlm, ps, cache=cache, progress=lambda d, t, m: ticks.append(m)) for ps in specs]
    n_passes = len(range(0, len(CALIB.timesteps), CALIB.batch_size)) * CALIB.nsamples
    assert [v.passes for v in variants] == [n_passes] + [0] * (len(specs) - 1)
    assert cache.hits == len(specs) - 1 and any("reused" in m for m in ticks)
    for ps, v in zip(specs, variants):
        ref = prune(tiny_dlm, ps)
        for name, W in ref.weights.items():
            assert torch.equal(W, v.weights[name]), (ps.label, name)
    # The SparseGPT family takes its mass from the same pass.
    sg = prune(tiny_dlm, PruneSpec("sink_sparsegpt", 0.5, calibration=CALIB), cache=cache)
    ref = prune(tiny_dlm, PruneSpec("sink_sparsegpt", 0.5, calibration=CALIB))
    assert sg.passes == ref.passes - n_passes
    np.testing.assert_array_equal(sg.token_weights, ref.token_weights)
