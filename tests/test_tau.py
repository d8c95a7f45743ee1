"""Picking tau: calibration reused across a sweep, tau sweeps, the calibration variance (issue 14)."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import TEXT

from sap_core.errors import SapError
from sap_core.evaluate import EvalSpec
from sap_core.pruning import CalibrationSpec, PruneSpec, prune
from sap_core.pruning.scores import CalibrationCache
from sap_core.sinks import SinkSpec
from sap_core.sweep import SerialExecutor, SweepSpec, run_sweep
from sap_core.tau import calibration_gate

pytestmark = pytest.mark.usefixtures("one_thread_module")  # conftest.py
CALIB = CalibrationSpec(text=" ".join(TEXT * 10), nsamples=2, seqlen=24, seed=0, T=20, interval=5, batch_size=3)
EVAL = EvalSpec(seqlen=24, nsamples=2, draws=2, seed=0, text=" ".join(TEXT * 10))
ALL = (
    "magnitude",
    "wanda",
    "sparsegpt",
    "sink_wanda",
    "sink_sparsegpt",
    "noised_wanda",
    "gated_sink_wanda",
    "gated_sink_sparsegpt",
)


@pytest.fixture(scope="module")
def both_ways(tiny_dlm):
    spec = SweepSpec(
        methods=ALL,
        sparsities=(0.3, 0.6),
        patterns=("unstructured", "2:4"),
        sink=SinkSpec(tau=0.01),
        sink_taus=(0.0, 0.001, 0.05),
        calibration=CALIB,
        eval=EVAL,
    )
    new = run_sweep(tiny_dlm, spec)
    old = run_sweep(tiny_dlm, spec, executor=SerialExecutor(reuse_calibration=False))
    return spec, new, old


def test_reused_calibration_gives_the_rows_of_recalibrating_every_job(both_ways):
    spec, new, old = both_ways
    assert len(new) == len(old) == 1 + len(spec.jobs)
    assert list(new["label"]) == list(old["label"])
    for col in ("nll", "ppl", "nll_se", "achieved_sparsity"):
        np.testing.assert_allclose(new[col], old[col], rtol=1e-6, atol=1e-9, err_msg=col)
    for label, est in old.attrs["estimates"].items():
        np.testing.assert_allclose(new.attrs["estimates"][label], est, rtol=1e-6, atol=1e-9)
    # Not vacuous: the methods and taus do give different models.
    gated = new[new["method"].str.startswith("gated_sink_wanda") & (new["pattern"] == "unstructured") & (new["sparsity"] == 0.6)]
    assert gated["tau"].tolist() == [0.0, 0.001, 0.05] and gated["nll"].nunique() >= 2


def test_cache_computes_the_noised_pass_once_and_matches_a_plain_prune(tiny_dlm):
    cache = CalibrationCache()
    specs = [
        PruneSpec(m, s, sink=SinkSpec(tau=t), calibration=CALIB)
        for m in ("sink_wanda", "noised_wanda", "gated_sink_wanda")
        for s in (0.3, 0.6)
        for t in (0.0, 0.02)
    ]
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


# --- the gate on the calibration windows ------------------------------------------------------------

SINK = SinkSpec(k=1.0)  # the random 2-layer test model has few k=2 sinks per layer; k=1 gives dozens


@pytest.fixture(scope="module")
def gate(tiny_dlm):
    calls = []
    data = calibration_gate(tiny_dlm, CALIB, SINK, progress=lambda d, t, m: calls.append((d, t)))
    return data, calls


def test_calibration_gate_is_what_the_pruner_gates(tiny_dlm, gate):
    data, calls = gate
    N, L = CALIB.nsamples, CALIB.seqlen
    assert data.variance.shape == data.frequency.shape == data.ids.shape == (N, L)
    assert calls[-1][0] == calls[-1][1] == N * len(CALIB.timesteps)
    for tau in (0.0, 0.002, 0.02):
        v = prune(tiny_dlm, PruneSpec("gated_sink_wanda", 0.5, sink=replace(SINK, tau=tau), calibration=CALIB))
        np.testing.assert_allclose(data.variance, v.calibration.variance, rtol=1e-6, atol=1e-9)
        np.testing.assert_array_equal(data.gate(tau), v.calibration.gate)
        np.testing.assert_array_equal(data.ids, v.calibration.ids)
    assert data.is_sink.any() and (~data.is_sink).any()
    np.testing.assert_array_equal(data.gate(0.0), data.is_sink)  # tau = 0: every sink, never a non-sink
    assert data.sink_variance.size == int(data.is_sink.sum())


def independent_heads(handle) -> np.ndarray:
    """The per-head mass ``float32 [N, S, layers, heads, L]`` of CALIB's noised windows, one forward per timestep
    with its own recorder: the loop the calibration record is checked against."""
    from sap_core.attention import AttentionRecorder
    from sap_core.pruning import taps as tp
    from sap_core.pruning.calibration import calibration_ids, noised_ids, tokenize

    clean, generator = calibration_ids(tokenize(handle, CALIB), CALIB)
    noised = noised_ids(clean, CALIB, handle.mask_id, generator)
    taps = tp.make_taps(handle)
    N, S, _ = noised.shape
    out = []
    for n in range(N):
        for t in range(S):
            recorder = AttentionRecorder()
            recorder.start_pass()
            h = tp.embed(handle, noised[n, t : t + 1])
            for tap in taps:
                h = tap(h, recorder, capture=False)
            out.append(recorder.end_pass()[0].numpy())  # [layers, heads, L]
    return np.stack(out).reshape(N, S, *out[0].shape)


def test_calibration_gate_runs_the_pruners_pass_loop(tiny_dlm, gate):
    """The per-layer statistics of the calibration record equal an independent loop over the
    same noised windows (one forward per timestep with its own recorder)."""
    from sap_core import sinks

    data, _ = gate
    heads = independent_heads(tiny_dlm)  # [N, S, layers, heads, L]
    N = heads.shape[0]
    per_layer = heads.sum(3).transpose(2, 0, 1, 3)  # [layers, N, S, L]
    occ = np.stack([[sinks.sink_flags(per_layer[i, n], SINK).sum(0) for n in range(N)] for i in range(tiny_dlm.n_layers)])
    np.testing.assert_array_equal(data.layer_occurrences, occ)
    assert occ.sum() > 0
    flags = [sinks.sink_flags(per_layer[:, n].sum(0), SINK) for n in range(N)]
    np.testing.assert_allclose(data.frequency, np.stack([f.mean(0) for f in flags]))


def test_per_layer_sinks_follow_the_chosen_detector():
    """With another detector than the official rule (here Gu et al.'s), each layer's own sinks are that detector's
    on the layer's heads, as the record's sinks are: an independent loop over the same noised windows."""
    from sap_core.models import load_model

    tiny_dlm = load_model("tiny-dlm")  # the trained model: the random test model attends uniformly, no head has a sink
    spec = SinkSpec(detector="gu")
    data = calibration_gate(tiny_dlm, CALIB, spec)
    heads = independent_heads(tiny_dlm)  # [N, S, layers, heads, L]
    N, L = heads.shape[0], heads.shape[-1]
    occ = np.zeros((tiny_dlm.n_layers, N, L), np.int64)
    for n in range(N):
        for i in range(tiny_dlm.n_layers):
            occ[i, n] = spec.sink_detector.detect(heads[n][:, i][:, None])[1][:, 0].sum(0)
    np.testing.assert_array_equal(data.layer_occurrences, occ)
    official = calibration_gate(tiny_dlm, CALIB, SinkSpec(k=1.0)).layer_occurrences
    assert occ.sum() > 0 and not np.array_equal(occ, official)  # the detector, not the official rule


def test_layer_shares_and_top_tokens_follow_tau(tiny_dlm, gate):
    data, _ = gate
    v = np.sort(data.sink_variance)
    mid = float(np.median(v[v > 0]))
    full, part, none = data.layer_shares(0.0), data.layer_shares(mid), data.layer_shares(float(v.max()) + 1)
    assert list(full["layer"]) == list(range(tiny_dlm.n_layers)) and (full["occurrences"] > 0).any()
    # tau = 0 gates the aggregate's sink positions only: a layer's sink occurrence elsewhere stays ungated
    np.testing.assert_array_equal(full["gated"], np.where(data.is_sink[None], data.layer_occurrences, 0).sum((1, 2)))
    assert (none["gated"] == 0).all()
    assert (part["gated"] <= full["gated"]).all() and 0 < part["gated"].sum() < full["gated"].sum()
    g = data.gate(mid)
    i = int(np.argmax(full["occurrences"].to_numpy()))
    assert part["gated"].iloc[i] == np.where(g, data.layer_occurrences[i], 0).sum()
    assert data.gated_share(0.0) == 1.0 and 0 < data.gated_share(mid) < 1
    top = data.top_tokens(mid, tiny_dlm.decode, n=5)
    assert 0 < len(top) <= 5 and list(top["gated"]) == sorted(top["gated"], reverse=True)
    t = top.iloc[0]
    assert t["text"] == tiny_dlm.decode([int(t["token"])])
    assert t["gated"] == int(((data.ids.numpy() == t["token"]) & g & data.is_sink).sum()) and t["gated"] <= t["sinks"]
    with pytest.raises(SapError, match="tau must be"):
        data.gate(-1)


def test_calibration_gate_refuses_impossible_settings_before_any_pass(tiny_dlm):

    calls = []
    with pytest.raises(SapError, match="out of range"):
        calibration_gate(tiny_dlm, CALIB, SinkSpec(layers=(7,)), progress=lambda *a: calls.append(a))
    with pytest.raises(SapError, match="seqlen"):
        calibration_gate(tiny_dlm, replace(CALIB, seqlen=1), progress=lambda *a: calls.append(a))
    assert calls == []


def test_variance_figure_marks_tau_and_both_distributions(gate):
    from sap_core.viz import tau_layer_figure, tau_variance_figure

    data, _ = gate
    traj = (data.frequency[0], data.variance[0])  # one window's positions, as a generation's would be
    fig = tau_variance_figure((data.frequency, data.variance), 0.01, traj)
    assert len(fig.data) == 2 and len(fig.data[0].x) == data.sink_variance.size
    assert len(fig.data[1].x) == int((data.frequency[0] > 0).sum())
    assert f"{(data.sink_variance >= 0.01).mean():.0%} gated" in fig.data[0].name
    assert f"{data.gated_share(0.01):.0%} gated" in fig.data[0].name  # the figure reads the record's share
    assert fig.layout.shapes[0].x0 == 0.01 and "variance" in fig.layout.xaxis.title.text
    bars = tau_layer_figure(data.layer_shares(0.01), 0.01)
    np.testing.assert_allclose(np.asarray(bars.data[0].y, float), data.layer_shares(0.01)["occurrence_share"])


# --- tau sweeps --------------------------------------------------------------------------------------


def test_tau_table_and_best_tau(both_ways):
    from sap_core.evaluate import paired_se
    from sap_core.tau import best_tau_sentences, best_taus, reference_bands, tau_table
    from sap_core.viz import tau_sweep_figure

    _, df, _ = both_ways
    at = (df["sparsity"] == 0.6) & (df["pattern"] == "unstructured")
    table = tau_table(df, 0.6, "unstructured")
    assert list(table["kind"]) == ["official"] + ["gated"] * 3 + ["official"] + ["gated"] * 3 + ["reference"] * 2
    official = table[(table["kind"] == "official") & (table["family"] == "gated_sink_wanda")].iloc[0]
    assert official["method"] == "sink_wanda" and math.isnan(official["tau"])
    gated = table[(table["kind"] == "gated") & (table["method"] == "gated_sink_wanda")]
    assert gated["tau"].tolist() == [0.0, 0.001, 0.05] and set(gated["family"]) == {"gated_sink_wanda"}
    o = df[at & (df["method"] == "sink_wanda")].iloc[0]
    assert official["ppl"] == o["ppl"]
    # every tau, 0 included, is compared with the official twin, draw by draw
    for row, tau in zip(gated.itertuples(), ("0", "0.001", "0.05")):
        r = df[at & (df["method"] == "gated_sink_wanda") & (df["tau"] == float(tau))].iloc[0]
        assert row.delta_nll == pytest.approx(r["nll"] - o["nll"])
        se = paired_se(df.attrs["estimates"][r["label"]], df.attrs["estimates"][o["label"]])
        assert row.se_paired == pytest.approx(se) and se > 0 and row.z == pytest.approx(row.delta_nll / se)
    assert gated.iloc[0]["delta_nll"] != 0  # tau = 0 gates no non-sink: it is not the official rule
    sg = table[table["family"] == "gated_sink_sparsegpt"]
    assert sg.iloc[0]["method"] == "sink_sparsegpt" and sg["se_paired"].iloc[1:].gt(0).all()
    assert set(table[table["kind"] == "reference"]["method"]) == {"wanda", "noised_wanda"}
    best = best_taus(table, df)
    b = best[best["method"] == "gated_sink_wanda"].iloc[0]
    assert b["ppl"] == gated["ppl"].min() and b["tau"] == gated.loc[gated["ppl"].idxmin(), "tau"]
    assert b["official"] == "sink_wanda" and b["official_ppl"] == o["ppl"]
    assert b["delta_nll"] == pytest.approx(gated["nll"].min() - o["nll"])
    w = df[at & (df["method"] == "wanda")].iloc[0]
    assert b["delta_wanda"] == pytest.approx(gated["nll"].min() - w["nll"]) and b["se_wanda"] > 0
    sentence = dict(zip(best["method"], best_tau_sentences(best)))["gated_sink_wanda"]  # what Pick tau shows
    assert sentence.startswith("**gated_sink_wanda**: ") and sentence.endswith(f"± {b['se_noised_wanda']:.4f}.")
    assert ("best tau =" in sentence) == bool(b["beats_official"]) and f"; against wanda {b['delta_wanda']:+.4f}" in sentence
    assert len(tau_table(df, 0.5, "2:4")) == 10  # 2 gated methods x (official + 3 taus) + 2 references
    fig = tau_sweep_figure(table, best)
    names = [t.name for t in fig.data]
    assert "gated_sink_wanda" in names and any(n.startswith("wanda ") for n in names)
    starred = any(n.startswith("best gated_sink_wanda: tau") and "Δnll vs sink_wanda" in n for n in names)
    assert starred == bool(b["beats_official"]) == (b["z"] < -2)  # a star only beyond 2 paired SE
    assert f"sink_wanda {o['ppl']:.2f} (official rule, no gate)" in names
    # each reference in its paired error band against the twin, inside the y range (issue 31 item 6)
    bands = reference_bands(table, df)
    first = table[table["kind"] == "official"].iloc[0]  # the twin of the first gated method (sorted): sink_sparsegpt
    assert list(bands["method"]) == ["wanda", "noised_wanda"] and set(bands["against"]) == {first["method"]}
    se_w = paired_se(df.attrs["estimates"][w["label"]], df.attrs["estimates"][first["label"]])
    assert bands.iloc[0]["se_paired"] == pytest.approx(se_w) and se_w > 0
    assert bands.iloc[0]["delta_nll"] == pytest.approx(w["nll"] - first["nll"])
    fig = tau_sweep_figure(table, best, bands)
    band = next(t for t in fig.data if t.name == "wanda ±2 paired SE")
    lo, hi = min(band.y), max(band.y)
    assert lo == pytest.approx(w["ppl"] * math.exp(-2 * se_w)) and hi == pytest.approx(w["ppl"] * math.exp(2 * se_w))
    y0, y1 = fig.layout.yaxis.range
    assert y0 < lo and hi < y1 and y0 < table["ppl"].min() and table["ppl"].max() < y1
    line = next(t for t in fig.data if t.name == "gated_sink_wanda")
    np.testing.assert_allclose(line.y, gated["ppl"])
    np.testing.assert_allclose(line.error_y.array, gated["ppl"] * np.expm1(2 * gated["se_paired"]))  # ±2 paired SE
    np.testing.assert_allclose(line.x, gated["tau"])  # a numeric axis, not categories
    # without the official twin (an older sweep), the rows are there but no difference is claimed
    no_twin = df[df["method"] != "sink_wanda"]
    no_twin.attrs = df.attrs
    t2 = tau_table(no_twin, 0.6, "unstructured")
    assert t2[t2["family"] == "gated_sink_wanda"]["delta_nll"].isna().all() and "sink_wanda" not in set(t2["method"])


def test_sink_taus_spec_and_errors():
    from sap_core.sweep import SweepSpecError
    from sap_core.tau import tau_sweep_spec

    spec = SweepSpec(methods=("wanda", "gated_sink_wanda"), sparsities=(0.5,), sink=SinkSpec(k=3.0), sink_taus=[0, "0.05"])
    keys = [m.key for m in spec.settings]
    assert keys == [("wanda",), ("sink_wanda",), ("gated_sink_wanda", 0.0), ("gated_sink_wanda", 0.05)]  # the twin: reference
    assert [m.name for m in spec.settings][2:] == ["gated_sink_wanda"] * 2  # the method column: bare, tau a number
    assert spec.settings[3].sink == SinkSpec(k=3.0, tau=0.05)
    assert [spec.tau_of(m) for m in spec.settings][2:] == [0.0, 0.05] and math.isnan(spec.tau_of(spec.settings[1]))
    listed = SweepSpec(methods=("gated_sink_sparsegpt", "sink_sparsegpt"), sparsities=(0.5,), sink_taus=(0.1,))
    assert [m.key for m in listed.settings] == [("gated_sink_sparsegpt", 0.1), ("sink_sparsegpt",)]  # listed once
    ws = tau_sweep_spec(["gated_sink_wanda"], 0.5, "unstructured", [0.05, 0], SinkSpec())
    assert [m.key for m in ws.settings] == [
        ("wanda",),
        ("noised_wanda",),
        ("sink_wanda",),
        ("gated_sink_wanda", 0.0),
        ("gated_sink_wanda", 0.05),
    ]
    assert [m.key for m in tau_sweep_spec(["gated_sink_wanda"], 0.5, "2:4", [0.05], SinkSpec()).settings][2:] == [
        ("sink_wanda",),
        ("gated_sink_wanda", 0.05),
    ]  # tau = 0 is an ordinary point, not added
    with pytest.raises(SapError, match="at least one tau"):
        tau_sweep_spec(["gated_sink_wanda"], 0.5, "unstructured", [], SinkSpec())
    for kwargs, match in (
        (dict(sink_taus=(-0.1,)), "finite and >= 0"),
        (dict(sink_taus=(0.1, 0.1)), "twice"),
        (dict(sink_taus=(float("nan"),)), "finite"),
        (dict(methods=("wanda",), sink_taus=(0.1,)), "gated methods only"),
    ):
        with pytest.raises(SweepSpecError, match=match):
            SweepSpec(**{**dict(methods=("gated_sink_wanda",), sparsities=(0.5,)), **kwargs}).validate()
    with pytest.raises(SweepSpecError, match="numbers"):
        SweepSpec(methods=("gated_sink_wanda",), sparsities=(0.5,), sink_taus=("x",))


def test_cli_sweep_takes_sink_taus(tmp_path, tiny_dlm_dir):
    import subprocess
    import sys

    text = tmp_path / "t.txt"
    text.write_text(" ".join(TEXT * 10))
    out = tmp_path / "taus.csv"
    cmd = [
        sys.executable,
        "-m",
        "sap_core",
        "sweep",
        "--model",
        str(tiny_dlm_dir),
        "--device",
        "cpu",
        "--quiet",
        "--methods",
        "noised_wanda,gated_sink_wanda",
        "--sink-taus",
        "0,0.01",
        "--sparsities",
        "0.5",
        "--calib-text",
        str(text),
        "--calib-nsamples",
        "2",
        "--calib-seqlen",
        "24",
        "--text",
        str(text),
        "--seqlen",
        "24",
        "--nsamples",
        "2",
        "--draws",
        "2",
        "--out",
        str(out),
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    df = pd.read_csv(out)
    assert list(df["method"]) == ["dense", "noised_wanda", "sink_wanda", "gated_sink_wanda", "gated_sink_wanda"]
    assert df["tau"].tolist()[3:] == [0.0, 0.01]
    bad = subprocess.run(cmd[:-2] + ["--sink-taus", "0,x", "--out", str(out)], capture_output=True, text=True)
    assert bad.returncode != 0 and "comma-separated numbers" in bad.stderr


# --- the page ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_pick_tau_page_computes_the_gate_redraws_and_runs_a_tau_sweep():
    from pathlib import Path

    from streamlit.testing.v1 import AppTest

    from sap_core.tau import best_taus, tau_table

    at = AppTest.from_file(str(Path(__file__).resolve().parents[1] / "app.py"), default_timeout=600)
    at.run()
    at.switch_page("pages/tau.py").run()
    assert not at.exception and any("Compute the gate" in i.value for i in at.info)
    form = {n.label: n for n in at.number_input}
    form["Calibration samples"].set_value(2)
    form["Calibration length"].set_value(32)
    next(b for b in at.button if b.label == "Compute the gate's inputs").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    gate = at.session_state["tau_gate"][1]
    assert gate.ids.shape == (2, 32)
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Sink positions in the calibration windows"] == str(int(gate.is_sink.sum()))
    assert metrics["Gated at this tau"] == f"{gate.gated_share(at.slider(key='tau_pick').value):.0%}"
    top = at.dataframe[0].value
    assert list(top.columns) == ["token", "text", "gated", "sinks", "gated_share"]
    # Moving tau re-scores the stored variances: same calibration record, no new pass.
    at.slider(key="tau_pick").set_value(0.0).run()
    assert at.session_state["tau_gate"][1] is gate
    assert {m.label: m.value for m in at.metric}["Gated at this tau"] == "100%"
    assert any("never gated" in c.value for c in at.caption)  # why a layer's share can stay below 100 % at tau = 0
    next(b for b in at.button if b.label.startswith("Use tau = 0")).click().run()
    assert at.session_state["sink_spec"].tau == 0.0
    # Which tau?
    wf = {n.label: n for n in at.number_input}
    wf["Evaluation windows"].set_value(1)
    at.text_input[0].set_value("0.001, 0.05")
    next(b for b in at.button if b.label == "Run the tau sweep").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    _, df, sp, pat = at.session_state["tau_sweep"]
    assert list(df["method"]) == [
        "wanda",
        "noised_wanda",
        "sink_wanda",
        "gated_sink_wanda",
        "gated_sink_wanda",
    ]
    assert list(df["tau"])[3:] == [0.001, 0.05]
    best = [m.value for m in at.markdown if "best tau" in m.value or "no tau beats" in m.value]  # a best tau only beyond 2 SE
    assert len(best) == 1 and "paired SE" in best[0] and "against wanda" in best[0]
    b = best_taus(tau_table(df, sp, pat), df).iloc[0]
    assert ("best tau =" in best[0]) == bool(b["beats_official"]) and ("no tau beats" in best[0]) == (not b["beats_official"])
    captions = [c.value for c in at.caption]
    assert any(c.startswith("From the last completed tau sweep: 5 pruned models at unstructured") for c in captions), captions
    table = at.dataframe[-1].value
    official = table[table["kind"] == "official"].iloc[0]
    assert official["method"] == "sink_wanda" and f"against sink_wanda (official rule, no gate; {official['ppl']:.2f})" in best[0]
    assert table[table["kind"] == "gated"]["se_paired"].gt(0).all()
    at.text_input[0].set_value("0, x")
    next(b for b in at.button if b.label == "Run the tau sweep").click().run()
    assert any("comma-separated numbers" in e.value for e in at.error)


def test_pick_tau_in_a_browser(app_url, page):
    from conftest import CHROMIUM, generate_in_browser, no_streamlit_exception
    from playwright.sync_api import expect

    if not __import__("pathlib").Path(CHROMIUM).exists():
        pytest.skip("no Chromium")
    generate_in_browser(page, app_url, 32)
    page.locator("[data-testid='stSidebarNav']").get_by_role("link", name="Pick tau", exact=True).click()
    page.get_by_role("spinbutton", name="Calibration samples").fill("4")
    page.get_by_role("button", name="Compute the gate's inputs").click()
    expect(page.get_by_text("Tokens most often gated")).to_be_visible()
    expect(page.get_by_text("current generation:", exact=False)).to_be_visible()
    page.wait_for_timeout(1500)
    page.shot("1-gate")
    page.get_by_role("spinbutton", name="Evaluation windows").fill("1")
    page.get_by_role("button", name="Run the tau sweep").click()
    # a best tau only when it beats the official twin beyond 2 paired SE; otherwise the page says so
    verdict = page.get_by_text("best tau =", exact=False).or_(page.get_by_text("no tau beats", exact=False)).first
    expect(verdict).to_be_visible()
    verdict.scroll_into_view_if_needed()
    page.wait_for_timeout(1500)
    page.shot("2-which-tau")
    expect(page.get_by_text("(official rule, no gate)", exact=False).first).to_be_attached()  # the twin's line
    page.get_by_text("Perplexity against tau", exact=False).first.scroll_into_view_if_needed()
    page.wait_for_timeout(1000)
    page.shot("3-tau-plot")
    no_streamlit_exception(page)
