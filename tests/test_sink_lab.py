"""The sink lab (issue 30, parts 1 and 3): did pruning move the sinks (replayed / free-running), and sink ablation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sap_core.ablation import AblationError, SinkAblation, ablated
from sap_core.attention import AttentionRecorder, attention_with_mass
from sap_core.decoding import DecodeSpec
from sap_core.diffusion import generate
from sap_core.errors import SapError
from sap_core.models import load_model
from sap_core.pruning import PruneSpec, prune
from sap_core.sink_shift import FREE_RUNNING, MODES, REPLAYED, SinkShiftError, run_shift_stats, sink_shift
from sap_core.sinks import SinkSpec

ROOT = Path(__file__).resolve().parents[1]
DECODE = DecodeSpec(gen_length=16, steps=16, block_length=16)
NO_SINKS = SinkSpec(k=1e6)  # mean + 1e6·std: nothing is ever above it


@pytest.fixture(scope="module")
def dlm():
    return load_model("tiny-dlm")


@pytest.fixture(scope="module")
def ar():
    return load_model("tiny-ar")


@pytest.fixture(scope="module")
def wanda(dlm):
    return prune(dlm, PruneSpec(method="wanda", sparsity=0.5))


def _identity(dlm, variant):
    """A variant whose weights are the dense ones: pruning nothing."""
    params = dict(dlm.module.named_parameters())
    return type(variant)(**{**variant.__dict__, "weights": {n: params[n].data.clone() for n in variant.weights}})


def test_replayed_dense_against_itself_is_jaccard_one_everywhere(dlm, wanda):
    same = _identity(dlm, wanda)
    shift = sink_shift(dlm, same, "ROMEO.\n", DECODE, mode=REPLAYED)
    assert shift.jaccard.shape == (16, 1 + dlm.n_layers)
    assert (shift.jaccard == 1).all() and shift.same_dominant.all() and (shift.sink_mass_change == 0).all()
    assert shift.dense_flags.any(), "the dense model has sinks, so Jaccard 1 is not 'both empty'"
    assert np.array_equal(shift.variant.mass, shift.dense.mass)


def test_modes_are_named_and_differ(dlm, wanda):
    assert set(MODES) == {"replayed", "free-running"} and "dense" in MODES[REPLAYED] and "itself" in MODES[FREE_RUNNING]
    replayed = sink_shift(dlm, wanda, "ROMEO.\n", DECODE, mode=REPLAYED)
    free = sink_shift(dlm, wanda, "ROMEO.\n", DECODE, mode=FREE_RUNNING, dense=replayed.dense)
    assert replayed.mode == REPLAYED and free.mode == FREE_RUNNING
    assert np.array_equal(replayed.variant.tokens, replayed.dense.tokens)  # the variant read the dense input
    assert not np.array_equal(free.variant.final_tokens, free.dense.final_tokens)  # it decoded its own text
    assert (replayed.jaccard < 1).any()
    summary = replayed.summary()
    assert list(summary["layer"]) == [-1, *range(dlm.n_layers)]
    assert summary[["jaccard", "same_dominant"]].apply(lambda c: c.between(0, 1)).all().all()
    d = replayed.differs(0)
    assert d.dtype == bool and np.array_equal(d, replayed.dense_flags[0, 0] ^ replayed.variant_flags[0, 0])
    with pytest.raises(SinkShiftError, match="mode must be one of"):
        sink_shift(dlm, wanda, "ROMEO.\n", DECODE, mode="replay")


def test_a_variant_of_another_model_is_refused_in_one_line(dlm, ar):
    other = prune(ar, PruneSpec(method="magnitude", sparsity=0.5))
    with pytest.raises(SapError) as err:
        sink_shift(dlm, other, "ROMEO.\n", DECODE)
    assert "another model" in str(err.value) and "\n" not in str(err.value)


def test_shift_stats_over_prompts_have_errors_and_the_variance_change(dlm, wanda):
    stats = run_shift_stats(dlm, {"wanda": wanda}, ["ROMEO.\n", "To be, or"], DECODE)
    s = stats.summary()
    row = s[(s["layer"] == -1) & (s["statistic"] == "dominant_var_change")].iloc[0]
    f = stats.per_prompt[stats.per_prompt["layer"] == -1]
    assert row["n"] == 2 and np.isclose(row["mean"], (f["dominant_var_variant"] - f["dominant_var_dense"]).mean())
    assert np.isfinite(s["se"]).all()
    json.dumps(stats.to_dict(), allow_nan=False)


def test_ablation_without_sinks_is_plain_generation_exactly(dlm, ar):
    for handle in (dlm, ar):
        plain = generate(handle, "ROMEO.\n", DECODE, recorder=AttentionRecorder())
        none = generate(ablated(handle, SinkAblation(sink=NO_SINKS)), "ROMEO.\n", DECODE, recorder=AttentionRecorder())
        assert np.array_equal(none.tokens, plain.tokens) and np.array_equal(none.mass, plain.mass)
        assert np.array_equal(generate(handle, "ROMEO.\n", DECODE).final_tokens, none.final_tokens)
        changed = generate(ablated(handle, SinkAblation()), "ROMEO.\n", DECODE, recorder=AttentionRecorder())
        assert not np.array_equal(changed.final_tokens, plain.final_tokens)


@pytest.mark.parametrize("causal", [False, True])
def test_ablation_masks_exactly_the_flagged_keys(causal):
    torch.manual_seed(0)
    B, H, T, d = 2, 4, 10, 8
    q, k, v = torch.randn(B, H, T, d), torch.randn(B, 2, T, d), torch.randn(B, 2, T, d)
    flags = torch.zeros(B, T, dtype=torch.bool)
    flags[0, [0, 3]] = True
    flags[1, 5] = True
    maps = {}
    for name, mask in (("plain", None), ("ablated", lambda layer, mass: flags if layer == 2 else None)):
        rec = AttentionRecorder(chunk_size=3, full_map=(2, 1), ablate_keys=mask)
        rec.start_pass()
        attention_with_mass(q, k, v, causal, rec, 2)
        maps[name] = (rec.last_map, rec.end_pass()[:, 0], rec.removed)
    full, mass, removed = maps["ablated"]
    plain = maps["plain"][0]
    assert torch.equal(removed[2], flags)
    rows = torch.ones(B, T, dtype=torch.bool)
    if causal:
        rows[0, 0] = False  # query 0 sees key 0 only: with it removed there is nothing left, it keeps its attention
        assert torch.equal(full[0, 0], plain[0, 0])
    assert torch.allclose(full.sum(-1), torch.ones(B, T))
    for b in range(B):
        gone = flags[b]
        assert (full[b][rows[b]][:, gone] == 0).all()
        kept = plain[b][rows[b]][:, ~gone]
        assert torch.allclose(full[b][rows[b]][:, ~gone], kept / kept.sum(-1, keepdim=True), atol=1e-6)
    assert torch.allclose(mass.sum(-1), torch.full((B, H), float(T)))


def test_ablation_layers_the_model_lacks_fail_in_one_line(dlm):
    with pytest.raises(AblationError, match=r"do not exist: tiny-dlm has 6 layers \(0..5\)"):
        ablated(dlm, SinkAblation(layers=(2, 9)))
    with pytest.raises(AblationError, match="whole numbers"):
        SinkAblation(layers=("a",))


def _cli(*args, timeout=400):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-m", "sap_core", *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


SMALL = ["--prompts", "2", "--prompt-tokens", "6", "--gen-length", "8", "--steps", "8", "--block-length", "8", "--quiet"]


def test_cli_sinkstats_methods_and_ablate(tmp_path):
    done = _cli("sinkstats", "--methods", "magnitude", "--compare", "free-running", *SMALL, "--out", tmp_path / "s.json")
    assert done.returncode == 0, done.stderr
    doc = json.loads((tmp_path / "s.json").read_text())
    assert doc["mode"] == "free-running" and doc["variants"] == ["magnitude 50%"] and doc["n_prompts"] == 2
    assert {"jaccard", "dominant_var_change"} <= {r["statistic"] for r in doc["summary"]}
    done = _cli(
        "sinkstats",
        "--ablate",
        "--ablate-layers",
        "0,1",
        "--windows",
        "2",
        "--docs",
        "0",
        "--quiet",
        "--out",
        tmp_path / "a.json",
    )
    assert done.returncode == 0, done.stderr
    rows = json.loads((tmp_path / "a.json").read_text())["rows"]
    assert [(r["model"], r["kind"], r["measure"]) for r in rows] == [
        ("tiny-dlm", "diffusion", "nll"),
        ("tiny-ar", "causal", "nll"),
    ]
    assert all(r["n"] == 2 and np.isfinite(r["se_delta"]) for r in rows)


def test_cli_evaluate_ablate_sinks_and_bad_layers(tmp_path):
    done = _cli("evaluate", "--model", "tiny-ar", "--ablate-sinks", "--nsamples", "2", "--seqlen", "32", "--quiet")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["rows"][0]["kind"] == "causal"
    done = _cli("evaluate", "--model", "tiny-dlm", "--ablate-sinks", "--ablate-layers", "7", "--quiet")
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0 and "6 layers" in done.stderr
    done = _cli("sinkstats", "--ablate", "--ablate-layers", "0,40", "--quiet")
    assert done.returncode == 2 and "do not exist" in done.stderr and "\n" not in done.stderr.strip()


def test_side_by_side_gives_four_texts_and_the_paired_table_after_its_estimate(dlm, ar):
    from sap_core.ablation_stats import MODELS, ablation_side_by_side, estimate_side_by_side
    from sap_core.evaluate import EvalSpec

    decode, ev, abl = DecodeSpec(gen_length=8, steps=8, block_length=8), EvalSpec(seqlen=32, nsamples=2, draws=2), SinkAblation()
    cost = estimate_side_by_side(dlm, ar, 4, decode, abl, ev)
    assert cost.passes == 2 * (8 + 1) + 2 * (8 + 1) and cost.seconds > 0
    seen = []
    out = ablation_side_by_side(dlm, ar, "ROMEO.\n", decode, abl, ev, progress=lambda d, t, m: seen.append((d, t)))
    assert set(out.runs) == {(m, a) for m in MODELS for a in (False, True)}
    assert out.runs[("DLM", False)].final_tokens.tolist() == generate(dlm, "ROMEO.\n", decode).final_tokens.tolist()
    assert all(t.startswith("“") for t in out.texts.values())
    assert list(out.outputs()["model"]) == list(MODELS)
    assert list(out.stats.rows["model"]) == [dlm.name, ar.name] and (out.stats.rows["n"] == 2).all()
    assert seen[-1][0] == seen[-1][1] == 500 and all(a <= b for (a, _), (b, _) in zip(seen, seen[1:]))
    with pytest.raises(AblationError, match="DLM"):
        ablation_side_by_side(ar, dlm, "x", decode, abl, ev)
    with pytest.raises(AblationError, match="do not exist"):
        estimate_side_by_side(dlm, ar, 4, decode, SinkAblation((99,)), ev)
