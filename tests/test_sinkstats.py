"""Across-prompt sink statistics (issue 13): the numbers are analyze()'s, the error bars are right, the CLI writes them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from sap_core import ASSETS
from sap_core.attention import AttentionRecorder
from sap_core.decoding import DecodeSpec
from sap_core.diffusion import generate
from sap_core.errors import Cancelled, DecodeSpecError, SinkSpecError
from sap_core.models import load_model
from sap_core.sink_report import analyze
from sap_core.sinks import SinkSpec
from sap_core.sinkstats import (
    DIFFERENCE,
    STATISTICS,
    SinkStats,
    SinkStatsError,
    evaluation_prompts,
    mean_se,
    prompts_from_lines,
    report_statistics,
    run_sinkstats,
)

ROOT = Path(__file__).resolve().parents[1]
DECODE = DecodeSpec(gen_length=8, steps=8, block_length=8)


@pytest.fixture(scope="module")
def models(one_thread_module):
    return load_model("tiny-dlm", device="cpu"), load_model("tiny-ar", device="cpu")


@pytest.fixture(scope="module")
def stats(models):
    dlm, ar = models
    prompts = evaluation_prompts(dlm, 3, prompt_tokens=6)
    return run_sinkstats(ar, dlm, prompts, DECODE, SinkSpec(top_k=2))  # AR first: the order must not matter


def test_per_prompt_rows_are_the_sink_stability_pages_numbers(models, stats):
    dlm, ar = models
    assert stats.labels == ("tiny-dlm", "tiny-ar") and stats.n_prompts == 3
    f = stats.per_prompt
    assert len(f) == 3 * 2 * (1 + dlm.n_layers)
    for handle in (dlm, ar):
        traj = generate(handle, stats.prompts[1], DECODE, recorder=AttentionRecorder())
        report = analyze(traj, SinkSpec(top_k=2))
        expected = pd.DataFrame(report_statistics(report))
        got = f[(f["model"] == handle.name) & (f["prompt"] == 1)].drop(columns=["prompt", "model"]).reset_index(drop=True)
        pd.testing.assert_frame_equal(got, expected, check_dtype=False)
        agg = expected.iloc[0]
        assert agg["layer"] == -1 and agg["dominant_var"] == pytest.approx(report.aggregate.dominant_var)
        assert agg["distinct_dominant"] == len(set(report.dominant.tolist()))
        assert agg["first_token_share"] == pytest.approx(np.mean(report.dominant == 0))
        assert agg["top_k_share"] == pytest.approx(report.aggregate.top_k_share)
    # the built-in AR model keeps its raw sink on the first token; the DLM's does not stay there
    ar_rows = f[(f["model"] == "tiny-ar") & (f["layer"] == -1)]
    dlm_rows = f[(f["model"] == "tiny-dlm") & (f["layer"] == -1)]
    assert (ar_rows["first_token_share"] == 1.0).all()
    assert dlm_rows["first_token_share"].mean() < 1.0


def test_summary_means_standard_errors_and_paired_difference(stats):
    s = stats.summary()
    f = stats.per_prompt
    assert set(s["group"]) == {"tiny-dlm", "tiny-ar", DIFFERENCE} and set(s["statistic"]) == set(STATISTICS)
    for layer in (-1, 3):
        a = f[(f["model"] == "tiny-dlm") & (f["layer"] == layer)].sort_values("prompt")["dominant_var"].to_numpy()
        b = f[(f["model"] == "tiny-ar") & (f["layer"] == layer)].sort_values("prompt")["dominant_var"].to_numpy()
        rows = s[(s["layer"] == layer) & (s["statistic"] == "dominant_var")].set_index("group")
        assert rows.loc["tiny-dlm", "mean"] == pytest.approx(a.mean())
        assert rows.loc["tiny-dlm", "se"] == pytest.approx(a.std(ddof=1) / np.sqrt(3))
        d = a - b
        assert rows.loc[DIFFERENCE, "mean"] == pytest.approx(d.mean())
        assert rows.loc[DIFFERENCE, "se"] == pytest.approx(d.std(ddof=1) / np.sqrt(3))
        assert rows.loc[DIFFERENCE, "significant"] == (abs(d.mean()) > 2 * d.std(ddof=1) / np.sqrt(3))
    table = stats.table()
    assert list(table["Statistic"]) == list(STATISTICS.values())
    assert "±" in table.loc[0, "tiny-dlm"]


def test_paired_standard_error_on_known_numbers():
    # prompt effects shared by both models cancel in the paired difference
    base = np.array([1.0, 5.0, 9.0, 13.0])
    rows = []
    for i, v in enumerate(base):
        rows.append(
            {
                "prompt": i,
                "model": "D",
                "layer": -1,
                "dominant_var": v + 2.0 + (0.5 if i % 2 else -0.5),
                "distinct_dominant": 3,
                "first_token_share": 0.25,
                "top_k_share": 0.5,
            }
        )
        rows.append(
            {
                "prompt": i,
                "model": "A",
                "layer": -1,
                "dominant_var": v,
                "distinct_dominant": 3,
                "first_token_share": 0.25,
                "top_k_share": 0.5,
            }
        )
    st = SinkStats(("D", "A"), tuple("abcd"), DECODE, SinkSpec(), pd.DataFrame(rows), 0.0)
    s = st.summary().set_index(["statistic", "group"])
    assert s.loc[("dominant_var", DIFFERENCE), "mean"] == pytest.approx(2.0)
    assert s.loc[("dominant_var", DIFFERENCE), "se"] == pytest.approx(np.std([-0.5, 0.5, -0.5, 0.5], ddof=1) / 2)
    assert s.loc[("dominant_var", DIFFERENCE), "significant"]
    assert s.loc[("dominant_var", "D"), "se"] > 2  # unpaired, the prompts' spread would hide the difference
    assert s.loc[("distinct_dominant", DIFFERENCE), "mean"] == 0 and not s.loc[("distinct_dominant", DIFFERENCE), "significant"]
    assert mean_se(np.array([1.0, 3.0])) == (2.0, pytest.approx(1.0))
    assert np.isnan(mean_se(np.array([1.0]))[1])


def test_save_csv_and_json(stats, tmp_path):
    paths = stats.save(tmp_path / "out" / "stats.csv")
    assert [p.name for p in paths] == ["stats.csv", "stats.prompts.csv"]
    back = pd.read_csv(paths[0])
    pd.testing.assert_frame_equal(
        back[["layer", "statistic", "group", "mean", "n"]],
        stats.summary()[["layer", "statistic", "group", "mean", "n"]],
        check_dtype=False,
    )
    assert len(pd.read_csv(paths[1])) == len(stats.per_prompt)
    (path,) = stats.save(tmp_path / "stats.json")
    doc = json.loads(path.read_text())
    assert doc["format"] == "sinkscope.sink_stats/1" and doc["n_prompts"] == 3
    assert doc["labels"] == {"dlm": "tiny-dlm", "ar": "tiny-ar"} and doc["decode"]["gen_length"] == 8
    assert len(doc["summary"]) == len(stats.summary()) and not list(tmp_path.glob(".stats*"))  # no temporary left
    with pytest.raises(SinkStatsError, match=r"\.json or \.csv"):
        stats.save(tmp_path / "stats.txt")


def test_bad_settings_fail_before_any_work(models):
    dlm, ar = models
    calls = []

    def progress(done, total, message):
        calls.append(done)

    with pytest.raises(SinkStatsError, match="Both models are masked-diffusion"):
        run_sinkstats(dlm, dlm, ["a b", "c d"], DECODE, progress=progress)
    with pytest.raises(SinkStatsError, match="at least 2 prompts"):
        run_sinkstats(dlm, ar, ["a b"], DECODE, progress=progress)
    with pytest.raises(DecodeSpecError, match="divisible"):
        run_sinkstats(dlm, ar, ["a b", "c d"], DecodeSpec(gen_length=8, steps=8, block_length=3), progress=progress)
    with pytest.raises(SinkSpecError, match="out of range"):
        run_sinkstats(dlm, ar, ["a b", "c d"], DECODE, SinkSpec(layers=(99,)), progress=progress)
    with pytest.raises(SinkStatsError, match="different names"):
        run_sinkstats(dlm, ar, ["a b", "c d"], DECODE, labels=("x", "x"), progress=progress)
    assert calls == []
    with pytest.raises(SinkStatsError, match="2 non-empty lines, fewer than the 5"):
        prompts_from_lines("one\n\n two \n", 5)
    assert prompts_from_lines("one\n\n two \nthree\n", 2) == ["one", "two"]
    with pytest.raises(SinkStatsError, match="at least 2"):
        evaluation_prompts(dlm, 1)


def test_evaluation_prompts_are_distinct_windows(models):
    dlm, _ = models
    prompts = evaluation_prompts(dlm, 5, prompt_tokens=12)
    assert len(set(prompts)) == 5
    text = (ASSETS / "text" / "evaluation.txt").read_text(encoding="utf-8")
    assert prompts[0].strip() and prompts[0].split()[0] in text
    for p in prompts:
        assert abs(len(dlm.encode(p)) - len(dlm.encode("")) - 12) <= 2


def test_cancel_stops_the_run(models):
    dlm, ar = models
    seen = []

    def progress(done, total, message):
        seen.append((done, total, message))
        if done >= 20:
            raise Cancelled("stop")

    with pytest.raises(Cancelled):
        run_sinkstats(dlm, ar, ["To be", "or not", "to be"], DECODE, progress=progress)
    assert seen[-1][0] == 20 and seen[0][1] == 3 * (8 + 8)
    assert "prompt 1/3" in seen[0][2] and "prompt 2/3" in seen[-1][2]


def test_cli_sinkstats_writes_json_and_rejects_two_dlms(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = tmp_path / "s.json"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "sap_core",
            "sinkstats",
            "--prompts",
            "2",
            "--prompt-tokens",
            "6",
            "--gen-length",
            "8",
            "--steps",
            "8",
            "--block-length",
            "8",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    doc = json.loads(out.read_text())
    assert doc["n_prompts"] == 2 and {r["group"] for r in doc["summary"]} == {"tiny-dlm", "tiny-ar", DIFFERENCE}
    assert "sinkstats" in done.stderr  # the progress bar
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "sap_core",
            "sinkstats",
            "--models",
            "tiny-dlm,tiny-dlm",
            "--prompts",
            "2",
            "--gen-length",
            "8",
            "--steps",
            "8",
            "--block-length",
            "8",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error: Both models are masked-diffusion")
    prompts = tmp_path / "p.txt"
    prompts.write_text("only one\n")
    bad = subprocess.run(
        [sys.executable, "-m", "sap_core", "sinkstats", "--prompt-file", str(prompts), "--prompts", "2"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2 and "fewer than the 2 prompts" in bad.stderr
