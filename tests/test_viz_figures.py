"""The figures a researcher reads (issue 18): the sweep's Δ-vs-dense view with paired errors, the tau
sweep on a numeric axis with a best tau only beyond the noise, titles clear of plotly's toolbar, and the
calibration strip of the down-weighting factors. Synthetic records, so every number is known."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from sap_core import viz
from sap_core.evaluate import paired_se


def _sweep(shared_noise: float = 0.5, shift: float = 0.02) -> pd.DataFrame:
    """A dense row and one wanda row whose per-draw estimates share most of their noise: each row's own
    SE is large, the paired SE of their difference small."""
    rng = np.random.default_rng(0)
    common = 4.0 + shared_noise * rng.standard_normal((8, 4))
    dense_e = common + 0.001 * rng.standard_normal((8, 4))
    wanda_e = common + shift + 0.001 * rng.standard_normal((8, 4))
    rows = []
    for method, label, sparsity, e in (("dense", "dense", 0.0, dense_e), ("wanda", "wanda 50%", 0.5, wanda_e)):
        nll, se = e.mean(), math.sqrt((e.var(axis=1, ddof=1) / 4).sum()) / 8
        rows.append(
            dict(method=method, sparsity=sparsity, pattern="dense" if method == "dense" else "unstructured", label=label)
            | dict(ppl=math.exp(nll), ppl_se=math.exp(nll) * se, nll=nll, nll_se=se)
        )
    df = pd.DataFrame(rows)
    df.attrs["estimates"] = {"dense": dense_e, "wanda 50%": wanda_e}
    return df


def test_sweep_deltas_pair_the_draws():
    df = _sweep()
    d = viz.sweep_deltas(df).iloc[0]
    e = df.attrs["estimates"]
    assert d["paired"] and d["se"] == pytest.approx(paired_se(e["wanda 50%"], e["dense"]))
    assert d["delta_nll"] == pytest.approx(df["nll"][1] - df["nll"][0])
    unpaired = math.hypot(df["nll_se"][0], df["nll_se"][1])
    assert d["se"] < unpaired / 20  # the shared masking noise cancels in the difference
    assert d["z"] > 2 and d["rel_ppl"] == pytest.approx(math.expm1(d["delta_nll"]))
    assert d["rel_lo"] > 0  # the change is beyond 2 paired SE ...
    assert d["delta_nll"] - 2 * unpaired < 0  # ... which ±2 unpaired SE would hide
    # without the per-draw estimates (a causal model, an old CSV) the error is the independent one
    bare = df.copy()
    bare.attrs = {}
    b = viz.sweep_deltas(bare).iloc[0]
    assert not b["paired"] and b["se"] == pytest.approx(unpaired)
    assert viz.sweep_deltas(df[df["method"] != "dense"]).empty


def test_sweep_figure_delta_view_is_the_default():
    df = _sweep()
    fig = viz.sweep_figure(df)
    d = viz.sweep_deltas(df).iloc[0]
    line = next(t for t in fig.data if t.name == "wanda (unstructured)")
    assert line.y[0] == pytest.approx(100 * d["rel_ppl"])
    assert line.y[0] - line.error_y.arrayminus[0] == pytest.approx(100 * d["rel_lo"])
    assert line.y[0] + line.error_y.array[0] == pytest.approx(100 * d["rel_hi"])
    zero = next(t for t in fig.data if t.name.startswith("dense"))
    assert list(zero.y) == [0, 0]
    assert "Δ perplexity vs dense" in fig.layout.yaxis.title.text and "paired" in fig.layout.title.subtitle.text
    absolute = viz.sweep_figure(df, "absolute")
    assert next(t for t in absolute.data if t.name == "wanda (unstructured)").y[0] == pytest.approx(df["ppl"][1])
    assert "unpaired" in absolute.layout.title.subtitle.text
    # no dense row: the Δ view cannot be drawn; the absolute one is, and the subtitle says why
    fallback = viz.sweep_figure(df[df["method"] != "dense"])
    assert "Δ view unavailable" in fallback.layout.title.subtitle.text
    with pytest.raises(ValueError):
        viz.sweep_figure(df, "log")


def _tau_table(delta: float, se: float) -> pd.DataFrame:
    rows = [dict(kind="official", family="gated_sink_wanda", method="sink_wanda", tau=math.nan, ppl=100.0, nll=math.log(100))]
    for tau, d in ((0.0, 0.0), (0.01, 0.0), (0.05, delta / 2), (0.1, delta)):
        rows.append(
            dict(kind="gated", family="gated_sink_wanda", method="gated_sink_wanda", tau=tau)
            | dict(ppl=100 * math.exp(d), nll=math.log(100) + d, delta_nll=d, se_paired=se, z=d / se)
        )
    rows.append(dict(kind="reference", family="", method="wanda", tau=math.nan, ppl=120.0, nll=math.log(120)))
    t = pd.DataFrame(rows)
    t["label"] = [f"row{i}" for i in range(len(t))]
    return t


@pytest.mark.parametrize("delta, beats", [(-0.01, True), (-0.0015, False)])
def test_best_tau_only_beyond_two_paired_se(delta, beats):
    from sap_core.tau import best_taus

    table = _tau_table(delta, se=0.001)
    best = best_taus(table).iloc[0]
    assert best["tau"] == 0.1 and best["beats_official"] == beats  # z = -10 or -1.5
    assert best_taus(table, threshold=1.0).iloc[0]["beats_official"]  # -1.5 SE is beyond 1 SE
    fig = viz.tau_sweep_figure(table, best_taus(table))
    stars = [t for t in fig.data if t.name.startswith("best ")]
    assert len(stars) == beats
    assert ("no tau beats sink_wanda" in fig.layout.title.subtitle.text) != beats
    line = next(t for t in fig.data if t.name == "gated_sink_wanda")
    assert list(line.x) == [0.0, 0.01, 0.05, 0.1] and fig.layout.xaxis.type == "linear"  # numeric, not categories
    assert list(fig.layout.xaxis.tickvals) == [0.0, 0.01, 0.05, 0.1]
    with pytest.raises(Exception, match="standard errors"):
        best_taus(table, threshold=-1)


def test_every_title_sits_below_the_toolbar():
    df = _sweep()
    figs = [viz.sweep_figure(df), viz.sweep_figure(df, "absolute"), viz.tau_sweep_figure(_tau_table(-0.01, 0.001))]
    figs.append(viz.instability_bars(pd.DataFrame(dict(layer=[-1, 0], dominant_var=[1.0, 2.0], centroid_var=[0.5, 1.0]))))
    figs.append(
        viz.tau_layer_figure(
            pd.DataFrame(dict(layer=[0], occurrence_share=[0.5], mass_share=[0.4], gated=[1], occurrences=[2])), 0.0
        )
    )
    figs.append(viz.detector_agreement_figure(pd.DataFrame(dict(first=["a"], second=["b"], layer=[-1], jaccard=[0.5]))))
    for fig in figs:
        # axis text a projector shows (issue 31 item 8): large and dark on every axis, colour bars included
        for ax in [fig.layout[k] for k in fig.layout if k.startswith(("xaxis", "yaxis"))]:
            assert ax.tickfont.size >= 13 and ax.tickfont.color == viz.AXIS_FONT["color"] == ax.title.font.color
        assert fig.layout.font.size >= 13 and fig.layout.legend.font.color == viz.AXIS_FONT["color"]
        for t in fig.data:
            if "colorbar" in t:
                assert t.colorbar.tickfont.size >= 13
        title = fig.layout.title
        assert title.yref == "container" and title.yanchor == "top" and title.pad.t >= viz.TOOLBAR_PX
        assert fig.layout.margin.t >= title.pad.t + 40  # room for the title under the toolbar's band


def test_factor_strip_from_a_pruning_record(tiny_dlm):
    """The Prune page's strip, from a real gated run's calibration record: the official row is 1 − s̄ for
    every token, the gated row leaves every token the gate does not open at 1."""
    from sap_core.animation import readable_tokens
    from sap_core.pruning import CalibrationSpec, PruneSpec, prune
    from sap_core.sinks import SinkSpec

    spec = PruneSpec(
        "gated_sink_wanda", 0.5, sink=SinkSpec(tau=0.05), calibration=CalibrationSpec(nsamples=2, seqlen=32, batch_size=2)
    )
    record = prune(tiny_dlm, spec).calibration
    factors = record.window_factors(1)
    score, gate = factors["mean_score"].to_numpy(), factors["gate"].to_numpy()
    np.testing.assert_allclose(score, record.sink_scores[1].mean(0), rtol=1e-6)  # the mean over the noised timesteps
    np.testing.assert_array_equal(gate, record.labels[1] == "unstable")  # the variance gate at the run's tau
    tokens = readable_tokens(tiny_dlm.decode, record.ids[1])
    fig = viz.factor_strip(tokens, factors, 0.05, window=1)
    z = np.asarray(fig.data[0].z, float)
    np.testing.assert_array_equal(z[0], factors["official"])  # the record's factors, drawn as they are
    np.testing.assert_array_equal(z[1], factors["gated"])
    np.testing.assert_allclose(z[0], 1 - score, rtol=1e-6)
    np.testing.assert_allclose(z[1], np.where(gate, 1 - score, 1.0), rtol=1e-6)
    assert (z[1] >= z[0] - 1e-12).all()  # the gate only ever removes down-weighting
    assert list(fig.data[0].y) == ["official rule (no gate)", "gated at tau = 0.05"]
    marked = [int(j) for j in fig.layout.xaxis.tickvals]
    assert marked == [j for j in range(len(score)) if z[0][j] < 0.9]  # the labelled tokens are the down-weighted ones
    assert fig.data[0].customdata[0][3][0] == tokens[3]  # the hover names the token
    assert "window 1" in fig.layout.title.text and f"{int(gate.sum())} gated" in fig.layout.title.subtitle.text
    with pytest.raises(ValueError, match="one entry per position"):
        viz.factor_strip(tokens[:-1], factors, 0.05)


def test_sweep_figure_draws_a_gated_method_at_each_tau_as_its_own_line():
    import pandas as pd

    from sap_core.viz import sweep_figure

    rows = [("dense", 0.0, "dense", float("nan"), "dense")] + [
        (m, s, "unstructured", t, f"{m} {100 * s:g}%" + (f", tau={t:g}" if t == t else ""))
        for m, t in (("wanda", float("nan")), ("gated_sink_wanda", 0.0), ("gated_sink_wanda", 0.05))
        for s in (0.3, 0.5)
    ]
    df = pd.DataFrame(rows, columns=["method", "sparsity", "pattern", "tau", "label"])
    df["ppl"], df["ppl_se"], df["nll"], df["nll_se"] = 10.0 + df.index, 0.5, 2.0 + 0.01 * df.index, 0.01
    for view in ("delta", "absolute"):
        names = [t.name for t in sweep_figure(df, view).data if t.name and "(unstructured)" in t.name]
        assert names == [
            "wanda (unstructured)",
            "gated_sink_wanda, tau=0 (unstructured)",
            "gated_sink_wanda, tau=0.05 (unstructured)",
        ]
