"""Sink detectors (issue 30, part 2): each formula on hand-made mass, the official default unchanged, the
agreement matrix, parse errors, the CLI option and the Sink stability page with a non-default detector."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_sinks import fake

from sap_core import viz
from sap_core.detectors import Gu, HeadScore, Official, Rulli, default_detectors, parse_detector, rank_heads
from sap_core.errors import SinkSpecError
from sap_core.sink_report import SinkReport, analyze, detector_agreement
from sap_core.sinks import SinkSpec, score_steps

ROOT = Path(__file__).resolve().parents[1]


def two_heads() -> np.ndarray:
    """One step, one layer, two heads over L = 4 positions (each head's mass sums to 4 queries):
    head 0 gives position 1 a mean attention of 0.7 per query, head 1 spreads evenly."""
    m = np.zeros((1, 1, 2, 4))
    m[0, 0, 0] = [0.4, 2.8, 0.4, 0.4]
    m[0, 0, 1] = [1.0, 1.0, 1.0, 1.0]
    return m


def test_gu_is_the_share_of_heads_whose_mean_attention_exceeds_epsilon():
    scores, flags = Gu(0.3).detect(two_heads())
    assert scores[0, 0].tolist() == [0.0, 0.5, 0.0, 0.0]  # one head of two: 0.7 > 0.3; 0.25 everywhere else
    assert flags[0, 0].tolist() == [False, True, False, False]
    assert not Gu(0.75).flags(two_heads()).any()  # 0.7 is not above 0.75


def test_rulli_is_the_head_averaged_multiple_of_uniform_attention():
    # r(1) = mean over heads of the mass = (2.8 + 1.0) / 2 = 1.9 times uniform; the others (0.4 + 1) / 2 = 0.7
    scores, flags = Rulli(1.5).detect(two_heads())
    assert flags[0, 0].tolist() == [False, True, False, False]
    assert scores[0, 0, 1] == pytest.approx(1.9 / (1.9 + 1.5)) and scores[0, 0, 0] == pytest.approx(0.7 / 2.2)
    assert not Rulli(3).flags(two_heads()).any()  # the paper's ε = 3 needs three times uniform


def test_head_score_is_the_mean_attention_over_heads_and_ranks_the_heads():
    scores, flags = HeadScore(0.3).detect(two_heads())
    assert scores[0, 0].tolist() == pytest.approx([0.175, 0.475, 0.175, 0.175])  # (0.1 + 0.25) / 2, (0.7 + 0.25) / 2
    assert flags[0, 0].tolist() == [False, True, False, False]
    ranked = rank_heads(two_heads(), layers=[3], heads=[5, 6])
    assert ranked[["rank", "layer", "head", "position"]].values.tolist() == [[1, 3, 5, 1], [2, 3, 6, 0]]
    assert ranked["score"].tolist() == pytest.approx([0.7, 0.25])


def test_a_runs_heads_are_ranked_over_its_valid_positions(tiny_dlm):
    from sap_core.attention import AttentionRecorder
    from sap_core.decoding import DecodeSpec
    from sap_core.diffusion import generate
    from sap_core.errors import SinkSpecError
    from sap_core.sink_report import ranked_heads

    traj = generate(tiny_dlm, "ROMEO.\n", DecodeSpec(8, 4, 8), recorder=AttentionRecorder())
    ranked = ranked_heads(traj)
    assert len(ranked) == tiny_dlm.n_layers * tiny_dlm.n_heads
    best = ranked.iloc[0]
    # every position is valid at every step of a diffusion run: the score is a plain mean over steps
    mean = traj.mass[:, int(best["layer"]), int(best["head"])].mean(0) / traj.mass.shape[-1]
    assert best["score"] == pytest.approx(mean.max()) and best["position"] == mean.argmax()
    with pytest.raises(SinkSpecError, match="no attention record"):
        ranked_heads(generate(tiny_dlm, "ROMEO.\n", DecodeSpec(8, 4, 8)))


def test_the_words_of_a_spec_name_its_detector():
    from sap_core.sink_report import rule_words, sink_words

    assert rule_words(SinkSpec()) == "official rule, k = 2, alpha = 5"
    assert sink_words(SinkSpec(detector="gu:0.2")).startswith("Gu et al. (share of heads with mean attention > ε), ε = 0.2, tau")
    assert rule_words(SinkSpec(detector="rulli")) == "Rulli et al. (attention above ε × uniform), ε = 3"


def test_official_detector_is_todays_rule_and_absent_positions_are_nan():
    rng = np.random.default_rng(1)
    m = rng.random((3, 2, 2, 6)) * 3
    valid = np.ones((3, 6), bool)
    valid[0, 4:] = False
    scores, flags = Official().detect(m, valid)
    summed = np.where(valid[:, None, :], m.sum(2), 0.0)
    for g in range(2):
        ref_scores, ref_flags = score_steps(summed[:, g], SinkSpec(), valid_length=valid.sum(-1))
        np.testing.assert_array_equal(scores[:, g], ref_scores)
        np.testing.assert_array_equal(flags[:, g], ref_flags)
    assert np.isnan(scores[0, :, 4:]).all() and not flags[0, :, 4:].any()


def test_default_analysis_is_unchanged_and_each_detector_flows_through_the_report(tmp_path):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 3, 4, 12, 12))
    logits[..., 3] += 3.0
    p = np.exp(logits)
    p /= p.sum(-1, keepdims=True)
    traj = fake(p.sum(-2))
    base = analyze(traj)
    same = analyze(traj, SinkSpec(), detector="official")
    np.testing.assert_array_equal(base.scores, same.scores)
    np.testing.assert_array_equal(base.layer_is_sink, same.layer_is_sink)
    assert analyze(traj, detector="official:1.5").spec.k == 1.5
    for d in default_detectors()[1:]:
        report = analyze(traj, detector=d)
        assert report.spec.detector == str(d)
        direct_scores, direct_flags = d.detect(traj.mass)  # per layer, straight from the per-head mass
        np.testing.assert_array_equal(report.layer_is_sink, direct_flags)
        np.testing.assert_allclose(report.layer_scores, direct_scores, rtol=1e-6)
        assert np.nanmax(report.scores) <= 1 and np.nanmin(report.scores) >= 0  # factors 1 - s stay factors
        assert (report.rescore(tau=0.1).is_sink == report.is_sink).all()
        back = SinkReport.from_json(report.to_json(tmp_path / f"{d.name}.json"))  # gu keeps its head counts
        np.testing.assert_array_equal(back.is_sink, report.is_sink)


def test_agreement_is_symmetric_with_one_on_the_diagonal():
    rng = np.random.default_rng(2)
    traj = fake(rng.random((5, 2, 3, 10)) * 2)
    frame = detector_agreement(traj)
    names = [str(d) for d in default_detectors()]
    assert len(frame) == 3 * len(names) ** 2  # aggregate + 2 layers
    table = frame.set_index(["layer", "first", "second"])["jaccard"]
    for layer in (-1, 0, 1):
        for a in names:
            assert table[layer, a, a] == 1.0
            for b in names:
                assert table[layer, a, b] == table[layer, b, a] and 0 <= table[layer, a, b] <= 1
    fig = viz.detector_agreement_figure(frame)
    assert len(fig.data[0].y) == len(names) * (len(names) - 1) // 2


@pytest.mark.parametrize(
    "text, message",
    [
        ("foo", "unknown detector 'foo'"),
        ("gu:1.5", "gu's ε must be in (0, 1)"),
        ("head:0", "head's ε must be in (0, 1)"),
        ("rulli:-3", "rulli's ε must be a finite number > 0"),
        ("gu:abc", "gu's ε must be a number"),
        ("official:inf", "official's k must be a finite number"),
    ],
)
def test_bad_detectors_are_one_line_errors(text, message):
    with pytest.raises(SinkSpecError, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
        parse_detector(text)
    assert "\n" not in str(info.value)
    with pytest.raises(SinkSpecError):
        SinkSpec(detector=text)


def test_parse_reads_back_its_text():
    for d in (Official(2.5), Gu(0.2), Rulli(3), HeadScore(0.4)):
        assert parse_detector(str(d)) == d
    assert parse_detector("RULLI") == Rulli(3.0) and parse_detector(" gu ") == Gu(0.3)


def run_cli(*args):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "sap_core", *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True)


def test_cli_analyze_with_a_detector(tmp_path, tiny_dlm):
    from sap_core.attention import AttentionRecorder
    from sap_core.decoding import DecodeSpec
    from sap_core.diffusion import generate

    traj = generate(tiny_dlm, "To be", DecodeSpec(gen_length=8, steps=4, block_length=8), recorder=AttentionRecorder())
    path = tmp_path / "traj.npz"
    traj.save(path)
    done = run_cli("analyze", "--trajectory", path, "--detector", "gu:0.3", "--out", tmp_path / "r.json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["spec"]["detector"] == "gu:0.3"
    assert SinkReport.from_json(tmp_path / "r.json").spec.detector == "gu:0.3"
    bad = run_cli("analyze", "--trajectory", path, "--detector", "gu:2")
    assert bad.returncode != 0 and "gu's ε must be in (0, 1)" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.slow
def test_stability_page_with_a_non_default_detector():
    from test_app import generate_small, new_app

    at = new_app()
    generate_small(at)
    at.switch_page("pages/stability.py").run()
    at.selectbox(key="sink_detector_name").set_value("rulli").run()
    assert not at.exception and not at.error
    assert at.session_state["sink_spec"].detector == "rulli:3"
    at.number_input(key="sink_detector_rulli").set_value(1.5).run()
    assert at.session_state["sink_spec"].detector == "rulli:1.5" and not at.exception
    charts = at.get("plotly_chart")
    assert any("Jaccard" in c.proto.spec for c in charts)  # the agreement view
