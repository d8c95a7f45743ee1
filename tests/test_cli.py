"""The command line, run as users run it: ``python -m sap_core ...`` in a subprocess (issue 6)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
import pytest
from conftest import TEXT, make_model_dir

from sap_core import ASSETS

ROOT = Path(__file__).resolve().parents[1]
BUILTIN = ASSETS / "models" / "tiny-dlm"
ASSET_TEXTS = [ASSETS / "text" / "calibration.txt", ASSETS / "text" / "evaluation.txt"]
SUBCOMMANDS = ["generate", "analyze", "prune", "evaluate", "sweep"]


def run(*args, timeout=300, threads=None):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return subprocess.run(
        [sys.executable, "-m", "sap_core", *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The built-in DLM when it is there (a tiny random one otherwise), and texts when the built-in ones are missing."""
    tmp = tmp_path_factory.mktemp("cli")
    model = "tiny-dlm" if (BUILTIN / "config.json").exists() else str(make_model_dir(tmp / "model"))
    extra_calib, extra_eval = [], []
    if not all(p.exists() for p in ASSET_TEXTS):
        text = tmp / "text.txt"
        text.write_text(" ".join(TEXT * 20))
        extra_calib, extra_eval = ["--calib-text", text], ["--text", text]
    return tmp, model, extra_calib, extra_eval


def _generate_then_analyze(tmp, model, extra_calib, extra_eval):
    traj, summary = tmp / "traj.npz", tmp / "gen.json"
    gen = run(
        "generate",
        "--model",
        model,
        "--prompt",
        "To be, or not to be",
        "--gen-length",
        16,
        "--steps",
        8,
        "--block-length",
        8,
        "--record-attention",
        "--trajectory",
        traj,
        "--out",
        summary,
        "--device",
        "cpu",
        threads=1,
    )
    if gen.returncode:
        return gen, None
    return gen, run(
        "analyze", "--trajectory", traj, "--sink-k", 1.5, "--out", tmp / "report.json", "--csv", tmp / "tables", threads=1
    )


def _prune_chain(tmp, model, extra_calib, extra_eval):
    saved = tmp / "pruned"
    pr = run(
        "prune",
        "--model",
        model,
        "--method",
        "wanda",
        "--sparsity",
        0.5,
        "--calib-nsamples",
        2,
        "--calib-seqlen",
        32,
        *extra_calib,
        "--save",
        saved,
        "--out",
        tmp / "prune.json",
        "--device",
        "cpu",
        threads=1,
    )
    if pr.returncode:
        return pr, None, None
    ev = run(
        "evaluate",
        "--model",
        saved,
        "--seqlen",
        32,
        "--nsamples",
        2,
        "--draws",
        2,
        *extra_eval,
        "--out",
        tmp / "eval.json",
        threads=1,
    )
    cmp = run(
        "generate",
        "--model",
        model,
        "--compare",
        saved,
        "--gen-length",
        8,
        "--steps",
        4,
        "--block-length",
        8,
        "--quiet",
        threads=1,
    )
    return pr, ev, cmp


def _sweep(tmp, model, extra_calib, extra_eval):
    plot = ["--plot", tmp / "sweep.png"] if shutil.which("chromium") or os.environ.get("BROWSER_PATH") else []
    return run(
        "sweep",
        "--model",
        model,
        "--methods",
        "magnitude,wanda",
        "--sparsities",
        "0.5",
        "--calib-nsamples",
        2,
        "--calib-seqlen",
        32,
        "--seqlen",
        32,
        "--nsamples",
        2,
        "--draws",
        2,
        *extra_calib,
        *extra_eval,
        "--out",
        tmp / "sweep.csv",
        *plot,
        threads=1,
    ), bool(plot)


@pytest.fixture(scope="module")
def runs(setup):
    """The three independent chains of real runs, started together (each mostly waits on its imports)."""
    pool = ThreadPoolExecutor(max_workers=3)
    futures = {
        name: pool.submit(fn, *setup)
        for name, fn in (("prune", _prune_chain), ("generate", _generate_then_analyze), ("sweep", _sweep))
    }
    yield futures
    pool.shutdown(wait=True)


@pytest.mark.parametrize("command", [None] + SUBCOMMANDS)
def test_help(command):
    result = run(*([command] if command else []), "--help", timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: python -m sap_core")
    for word in [command, "--model", "--device", "--dtype"] if command else SUBCOMMANDS:
        assert word in result.stdout


def test_generate_then_analyze(setup, runs):
    tmp = setup[0]
    gen, analyze = runs["generate"].result()
    assert gen.returncode == 0, gen.stderr
    assert "generate" in gen.stderr  # the tqdm bar
    data = json.loads((tmp / "gen.json").read_text())
    assert data["prompt"] == "To be, or not to be" and isinstance(data["text"], str)
    assert len(data["generated_ids"]) == 16 and data["n_steps"] == 8 and len(data["step_seconds"]) == 8
    from sap_core.decoding import Trajectory

    loaded = Trajectory.load(tmp / "traj.npz")
    assert loaded.mass is not None and loaded.n_steps == 8
    assert loaded.generated_ids.tolist() == data["generated_ids"]

    assert analyze.returncode == 0, analyze.stderr
    summary = json.loads(analyze.stdout)
    assert summary["spec"]["k"] == 1.5 and summary["n_steps"] == 8
    assert sum(summary["label_counts"].values()) == loaded.length
    heads = summary["top_heads"]  # the per-head sink score's ranking, strongest first
    assert len(heads) == 5 and [h["score"] for h in heads] == sorted((h["score"] for h in heads), reverse=True)
    from sap_core.sink_report import SinkReport, read_csv

    back = SinkReport.from_json(tmp / "report.json")
    assert back.spec.k == 1.5 and back.n_steps == 8
    frames = read_csv(tmp / "tables")
    assert len(frames["positions"]) == loaded.length


def test_prune_save_then_evaluate_and_generate_the_saved_model(setup, runs):
    tmp = setup[0]
    saved = tmp / "pruned"
    pr, ev, cmp = runs["prune"].result()
    assert pr.returncode == 0, pr.stderr
    data = json.loads((tmp / "prune.json").read_text())
    assert data["method"] == "wanda" and data["achieved_sparsity"] == pytest.approx(0.5, abs=0.01)
    assert data["label"] == "wanda 50%" == json.loads((saved / "pruning.json").read_text())["label"]
    assert data["seconds"] > 0 and data["layer_sparsity"]
    assert all(row["sparsity"] == pytest.approx(0.5, abs=0.01) for row in data["layer_sparsity"])
    assert (saved / "config.json").exists() and (saved / "pruning.json").exists()

    assert ev.returncode == 0, ev.stderr
    result = json.loads((tmp / "eval.json").read_text())
    assert result["ppl"] > 1 and result["ppl_se"] >= 0 and result["kind"] == "masked-diffusion"

    assert cmp.returncode == 0, cmp.stderr
    comparison = json.loads(cmp.stdout)
    assert [r["label"] for r in comparison["runs"]] == ["dense", str(saved)]
    assert comparison["runs"][0]["divergence_step"] is None and len(comparison["runs"][1]["agreement"]) == 8


def test_sweep_writes_csv_and_plot(setup, runs):
    tmp = setup[0]
    r, plotted = runs["sweep"].result()
    assert r.returncode == 0, r.stderr
    df = pd.read_csv(tmp / "sweep.csv")
    assert list(df.columns[:6]) == ["method", "sparsity", "pattern", "ppl", "ppl_se", "prune_seconds"]
    assert df["method"].tolist() == ["dense", "magnitude", "wanda"]
    assert df["sparsity"].tolist() == [0.0, 0.5, 0.5]
    assert df["label"].tolist() == ["dense", "magnitude 50%", "wanda 50%"]
    assert "magnitude 50%" in r.stderr  # the table printed at the end names each run by its label
    if plotted:
        assert (tmp / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "args, message",
    [
        (["generate", "--model", "/no/such/model"], "No model at '/no/such/model'"),
        (["analyze", "--trajectory", "/no/such/traj.npz"], "No trajectory at"),
        (["prune", "--sparsity", "1.5"], "argument --sparsity: expected a number in [0, 1), got 1.5"),
        (["evaluate", "--nsamples", "0"], "argument --nsamples: expected a positive integer"),
        (["sweep", "--sparsities", "0.5,abc"], "argument --sparsities: expected comma-separated numbers"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
def test_bad_input_exits_2_with_one_line(args, message):
    r = run(*args, timeout=120)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert message in lines[0]
    assert "Traceback" not in r.stderr and r.stdout == ""


def test_usage_names_the_program_and_every_subcommand(monkeypatch):
    from sap_core.cli import build_parser

    parser = build_parser()
    names = list(parser._subparsers._group_actions[0].choices)
    assert {"generate", "analyze", "prune", "evaluate", "sweep", "animate", "sinkstats"} <= set(names)
    assert "{" + ",".join(names) + "}" in parser.format_usage().replace("\n", "").replace(" ", "")
    assert parser.prog == "python -m sap_core"
    monkeypatch.setattr(sys, "argv", ["/usr/local/bin/sinkscope", "--help"])
    assert build_parser().format_usage().startswith("usage: sinkscope ")


def test_prune_sparsegpt_selection_flag(tmp_path, tiny_dlm_dir, capsys):
    from sap_core.cli import main

    base = ["prune", "--model", tiny_dlm_dir, "--method", "sparsegpt", "--calib-nsamples", "2", "--calib-seqlen", "24", "--quiet"]
    base += ["--calib-text", tmp_path / "t.txt"]
    (tmp_path / "t.txt").write_text(" ".join(TEXT * 10))
    out = tmp_path / "official.json"
    assert main([str(a) for a in base + ["--sparsegpt-selection", "official", "--out", out]]) == 0
    report = json.loads(out.read_text())  # the default is per_row
    assert report["sparsegpt_selection"] == "official" and report["method"] == "sparsegpt"
    assert report["timings"]["calibration"] == 0.0  # the block-sequential pass is pruning time
    assert main([str(a) for a in base + ["--sparsegpt-selection", "per_column"]]) == 2
    assert "invalid choice: 'per_column'" in capsys.readouterr().err
