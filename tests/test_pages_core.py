"""The sap_core pieces behind the Model, Sink stability, Prune and Compare pages: their figures
(sap_core.viz), the perplexity table with paired errors (sap_core.compare) and the memory check."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from sap_core import viz
from sap_core.attention import AttentionRecorder
from sap_core.compare import noise_verdict, perplexity_table
from sap_core.decoding import DecodeSpec
from sap_core.diffusion import generate
from sap_core.evaluate import EvalSpec, paired_se, perplexity
from sap_core.memory import available, estimate
from sap_core.pruning import PruneSpec, prune
from sap_core.sink_report import analyze
from sap_core.sinks import SinkSpec

pytestmark = pytest.mark.usefixtures("one_thread_module")  # conftest.py


def _positions(labels: list[str]) -> pd.DataFrame:
    n = len(labels)
    return pd.DataFrame(
        {
            "position": np.arange(n),
            "variance": np.linspace(0, 0.2, n),
            "label": labels,
            "frequency": np.full(n, 0.5),
            "weight": np.ones(n),
            "token_text": [f"t{i}" for i in range(n)],
        }
    )


def test_position_stability_draws_one_bar_per_position_on_a_fixed_range():
    # two unstable sinks far apart: with one bar trace per label plotly made them 60-position slabs
    labels = ["none"] * 79
    labels[3], labels[70], labels[10] = "unstable", "unstable", "stable"
    fig = viz.position_stability(_positions(labels), tau=0.05)
    bars = [t for t in fig.data if t.type == "bar"]
    assert len(bars) == 1 and len(bars[0].x) == 79
    assert list(fig.layout.xaxis.range) == [-0.5, 78.5]
    assert bars[0].width == 0.8
    colours = list(bars[0].marker.color)
    assert colours[3] == colours[70] == viz.LABEL_COLORS["unstable"] and colours[10] == viz.LABEL_COLORS["stable"]
    assert colours[0] == viz.LABEL_COLORS["none"]
    assert {t.name for t in fig.data if t.type == "scatter"} >= set(viz.LABEL_COLORS)  # a legend entry per label
    assert "t70" in {row[0] for row in bars[0].customdata}  # the hover names the token


def test_position_stability_on_a_real_report(tiny_dlm):
    traj = generate(tiny_dlm, "To be", DecodeSpec(16, 16, 16), recorder=AttentionRecorder())
    report = analyze(traj, SinkSpec(tau=0.01))
    fig = viz.position_stability(report.positions_frame(), 0.01)
    assert list(fig.layout.xaxis.range) == [-0.5, report.length - 0.5]
    assert sum(t.type == "bar" for t in fig.data) == 1
    fig = viz.instability_bars(report.layers_frame())
    assert list(fig.data[0].x)[:2] == ["all layers", "layer 0"] and "dominant" in fig.data[0].name


def test_sparsity_heatmap_in_forward_order_with_every_block_labelled(tiny_dlm):
    variant = prune(tiny_dlm, PruneSpec("magnitude", 0.5))
    fig = viz.sparsity_heatmap(variant.layer_sparsity)
    forward = list(dict.fromkeys(variant.layer_sparsity["module"]))
    assert list(fig.data[0].x) == forward
    assert (
        forward.index("q_proj")
        < forward.index("k_proj")
        < forward.index("v_proj")
        < forward.index("attn_out")
        < forward.index("ff_out")
    )
    blocks = [f"block {i}" for i in range(tiny_dlm.n_layers)]
    assert list(fig.data[0].y) == blocks and list(fig.layout.yaxis.tickvals) == blocks
    assert np.allclose(fig.data[0].z, 0.5, atol=0.01)


def test_agreement_strip_is_variants_by_positions():
    table = {"dense": np.array([True] * 4), "a": np.array([True, False, True, True]), "b": np.array([False] * 4)}
    tokens = {"dense": list("wxyz"), "a": list("wqyz"), "b": list("qqqq")}
    fig = viz.agreement_figure(table, prompt_length=5, tokens=tokens)
    heat = fig.data[0]
    assert heat.type == "heatmap" and list(heat.y) == ["dense", "a", "b"] and list(heat.x) == [5, 6, 7, 8]
    assert np.array_equal(np.asarray(heat.z), [[1, 1, 1, 1], [1, 0, 1, 1], [0, 0, 0, 0]])
    assert list(heat.customdata[1][1]) == ["q", "x"]  # the variant's token and the dense one
    assert list(fig.layout.xaxis.range) == [4.5, 8.5]
    for stop, colour in viz.AGREEMENT_SCALE:  # outside Streamlit's placeholder codes #000001-#000010
        assert not colour.lower().startswith("#0000")


def test_perplexity_table_pairs_every_variant_with_the_dense_model(tiny_dlm):
    spec = EvalSpec(seqlen=32, nsamples=3, draws=3)
    strong, weak = prune(tiny_dlm, PruneSpec("magnitude", 0.7)), prune(tiny_dlm, PruneSpec("magnitude", 0.05))
    seen = []
    table = perplexity_table(tiny_dlm, {"strong": strong, "weak": weak}, spec, progress=lambda d, t, m: seen.append((d, t, m)))
    assert list(table["model"]) == ["dense", "strong", "weak"]
    dense = perplexity(tiny_dlm, spec)
    with strong.applied(tiny_dlm):
        alone = perplexity(tiny_dlm, spec)
    row = table.set_index("model").loc["strong"]
    assert row["ppl"] == pytest.approx(alone.ppl) and row["delta_ppl"] == pytest.approx(alone.ppl - dense.ppl)
    assert row["delta_nll"] == pytest.approx(alone.nll - dense.nll)
    assert bool(row["paired"]) and row["se_delta"] == pytest.approx(paired_se(alone.estimates, dense.estimates))
    assert row["z"] == pytest.approx(row["delta_nll"] / row["se_delta"])
    # common random numbers: the paired error is smaller than treating the two errors as independent
    assert row["se_delta"] < math.hypot(alone.nll_se, dense.nll_se)
    assert seen[-1][0] == seen[-1][1] and "weak (3/3)" in seen[-1][2] and "dense (1/3)" in seen[0][2]


def test_noise_verdict_names_what_is_beyond_noise():
    table = pd.DataFrame({"model": ["dense", "a", "b"], "z": [math.nan, 5.0, 0.4]})
    text = noise_verdict(table)
    assert "a (+5.0 SE)" in text and "Within noise: b" in text
    assert "within noise" in noise_verdict(table.iloc[[0, 2]])
    assert "Only the dense model" in noise_verdict(table.iloc[[0]])


def test_memory_totals_and_what_is_available(tiny_dlm):
    est = estimate(tiny_dlm, 128, 64)
    assert est.generation_total == est.weights + est.capture_record + est.capture_peak + est.activations
    assert est.pruning_total == est.weights + est.pruning_copy + est.pruning_calibration
    free, where = available("cpu")
    assert free > 0 and "RAM" in where
    with open("/proc/meminfo") as f:
        total = int(next(line for line in f if line.startswith("MemTotal:")).split()[1]) * 1024
    assert free <= total


# --- issue 31: what the pages say before and after a job ---------------------------------------------------


def test_shown_prompt_is_one_rendering_for_every_page():
    from sap_core.text import shown_prompt

    assert shown_prompt("ROMEO.\n") == "“ROMEO.⏎”"
    long = shown_prompt("a b\n" * 40, limit=20)
    assert long.startswith("“a b⏎") and long.endswith("…”") and len(long) == 22


def test_separating_tau_splits_the_sinks_of_a_run():
    from sap_core.sinks import separating_tau, stability_labels

    freq = np.array([0.0, 0.9, 0.8, 1.0, 0.2, 0.6])
    var = np.array([0.0, 0.002, 0.01, 0.07, 0.2, 0.004])
    tau = separating_tau(freq, var)
    labels = stability_labels(freq, var, SinkSpec(tau=tau))
    assert tau == pytest.approx(0.01) and "stable" in labels and "unstable" in labels
    assert separating_tau(np.array([0.5, 0.0]), np.array([0.1, 0.0])) is None  # one sink: nothing to split
    assert separating_tau(np.array([0.5, 0.9]), np.array([0.1, 0.1])) is None  # one variance: no tau splits them


def test_a_structured_variant_records_what_it_removes_not_a_pattern(tiny_dlm):
    spec = PruneSpec("struct_wanda", 0.25, heads=0.5)
    assert spec.structure == "structured: MLP channels and attention heads"
    assert PruneSpec("flap", 0.25).structure == "structured: MLP channels"
    assert PruneSpec("wanda", 0.5, "2:4").structure == "2:4"
    variant = prune(tiny_dlm, PruneSpec("flap", 0.25, calibration=_small_calibration()))
    assert variant.settings_table().loc["pattern", "value"] == "structured: MLP channels"
    assert variant.summary()["pattern"] == "structured: MLP channels" and variant.summary()["structure"] == "channels"


def _small_calibration():
    from sap_core.pruning import CalibrationSpec

    return CalibrationSpec(nsamples=2, seqlen=16)


def test_masked_variants_speed_is_called_timing_noise(tiny_dlm):
    from sap_core.compare import compare_generations

    variant = prune(tiny_dlm, PruneSpec("magnitude", 0.5))
    result = compare_generations(tiny_dlm, {"m": variant}, "ROMEO.\n", DecodeSpec(8, 8, 8))
    note = result.speed_note()
    assert result["m"].masked and not result.dense.masked
    assert "timing noise" in note and "ms (10th–90th percentile)" in note
    assert compare_generations(tiny_dlm, {}, "ROMEO.\n", DecodeSpec(8, 8, 8)).speed_note() == ""


def test_sinkstats_cost_is_said_before_the_run(tiny_dlm, tiny_ar):
    from sap_core.sinkstats import SinkStatsError, estimate_cost

    decode = DecodeSpec(8, 4, 8)
    cost = estimate_cost(tiny_ar, tiny_dlm, 3, 6, decode)  # either order
    assert cost.passes == 3 * (4 + 8) and cost.seconds > 0 and all(s > 0 for s in cost.step_seconds)
    assert cost.seconds == pytest.approx(3 * (4 * cost.step_seconds[0] + 8 * cost.step_seconds[1]))
    with pytest.raises(SinkStatsError, match="Both models are causal"):
        estimate_cost(tiny_ar, tiny_ar, 3, 6, decode)
