"""Sparsity sweeps: methods x sparsities x patterns -> DataFrame -> CSV and a plotly figure (issue 6)."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import TEXT

from sap_core.compare import perplexity_table
from sap_core.errors import Cancelled, SapError
from sap_core.evaluate import EvalSpec, Perplexity, Score, perplexity
from sap_core.pruning import CalibrationSpec
from sap_core.sinks import SinkSpec
from sap_core.sweep import COLUMNS, MethodSetting, SweepSpec, load_sweep, run_job, run_sweep, save_sweep, sweep_settings

CALIB = CalibrationSpec(text=" ".join(TEXT * 10), nsamples=2, seqlen=24, seed=0)
EVAL = EvalSpec(seqlen=24, nsamples=2, draws=2, seed=0, text=" ".join(TEXT * 10))


def _state(handle):
    return {k: v.detach().clone() for k, v in handle.module.state_dict().items()}


@pytest.fixture(scope="module")
def sweep(tiny_dlm):
    spec = SweepSpec(methods=("magnitude", "wanda"), sparsities=(0.3, 0.6), calibration=CALIB, eval=EVAL)
    calls = []
    before = _state(tiny_dlm)
    df = run_sweep(tiny_dlm, spec, progress=lambda d, t, m: calls.append((d, t, m)))
    return df, calls, before


def test_two_methods_by_two_sparsities_give_the_expected_frame(tiny_dlm, sweep):
    df, _, before = sweep
    assert list(df.columns[:6]) == ["method", "sparsity", "pattern", "ppl", "ppl_se", "prune_seconds"]
    assert list(df.columns) == COLUMNS
    assert len(df) == 5
    assert df.iloc[0][["method", "sparsity", "pattern", "prune_seconds"]].tolist() == ["dense", 0.0, "dense", 0.0]
    rest = df.iloc[1:]
    assert list(zip(rest["method"], rest["sparsity"], rest["pattern"])) == [
        ("magnitude", 0.3, "unstructured"),
        ("magnitude", 0.6, "unstructured"),
        ("wanda", 0.3, "unstructured"),
        ("wanda", 0.6, "unstructured"),
    ]
    assert (df["ppl"] > 1).all() and np.isfinite(df["ppl"]).all() and (df["ppl_se"] >= 0).all()
    np.testing.assert_allclose(df["ppl"], np.exp(df["nll"]), rtol=1e-6)
    assert (rest["prune_seconds"] > 0).all() and (df["eval_seconds"] > 0).all()
    np.testing.assert_allclose(rest["achieved_sparsity"], rest["sparsity"], atol=0.01)
    # The dense model is intact after the sweep, and its row is the dense perplexity.
    after = _state(tiny_dlm)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert df.iloc[0]["ppl"] == pytest.approx(perplexity(tiny_dlm, EVAL).ppl)


def test_sweep_rows_are_the_variants_perplexities(tiny_dlm, sweep):
    from sap_core.pruning import PruneSpec, prune

    df, _, _ = sweep
    variant = prune(tiny_dlm, PruneSpec("wanda", 0.6, calibration=CALIB))
    with variant.applied(tiny_dlm):
        expected = perplexity(tiny_dlm, EVAL).ppl
    row = df[(df["method"] == "wanda") & (df["sparsity"] == 0.6)].iloc[0]
    assert row["ppl"] == pytest.approx(expected)
    assert row["ppl"] != pytest.approx(df.iloc[0]["ppl"])  # pruning 60 % changes the model


def test_progress_spans_the_whole_sweep(sweep):
    _, calls, _ = sweep
    totals = {t for _, t, _ in calls}
    assert len(totals) == 1
    total = totals.pop()
    done = [d for d, _, _ in calls]
    assert done == sorted(done) and done[0] == 0 and done[-1] == total
    assert any("wanda" in m for _, _, m in calls)


def test_per_draw_estimates_reproduce_each_row(sweep):
    from sap_core.evaluate import paired_se

    df, _, _ = sweep
    estimates = df.attrs["estimates"]
    assert list(estimates) == df["label"].tolist()
    assert df["label"].tolist() == ["dense", "magnitude 30%", "magnitude 60%", "wanda 30%", "wanda 60%"]  # PruneSpec.label
    for _, row in df.iterrows():
        e = estimates[row["label"]]
        assert e.shape == (EVAL.nsamples, EVAL.draws)
        assert e.mean() == pytest.approx(row["nll"], rel=1e-6)  # float32 sums in another order
        # The evaluator's own standard error is the paired error against a constant.
        assert paired_se(e, np.zeros_like(e)) == pytest.approx(row["nll_se"], rel=1e-5)
    assert paired_se(estimates["dense"], estimates["dense"]) == 0.0


def test_csv_round_trip(sweep, tmp_path):
    df, _, _ = sweep
    path = save_sweep(df, tmp_path / "out" / "sweep.csv")
    back = load_sweep(path)
    pd.testing.assert_frame_equal(back, df, check_dtype=False)
    assert back.attrs["estimates"].keys() == df.attrs["estimates"].keys()
    for label, e in df.attrs["estimates"].items():
        np.testing.assert_array_equal(back.attrs["estimates"][label], e)
    with pytest.raises(SapError):
        load_sweep(tmp_path / "missing.csv")
    (tmp_path / "other.csv").write_text("a,b\n1,2\n")
    with pytest.raises(SapError, match="not a sweep CSV"):
        load_sweep(tmp_path / "other.csv")


def test_an_older_csv_with_actual_sparsity_reads_as_achieved_sparsity(sweep, tmp_path):
    df, _, _ = sweep
    old = tmp_path / "old.csv"
    df.rename(columns={"achieved_sparsity": "actual_sparsity"}).to_csv(old, index=False)
    back = load_sweep(old)
    assert "actual_sparsity" not in back.columns
    np.testing.assert_allclose(back["achieved_sparsity"], df["achieved_sparsity"])
    assert list(back.columns) == COLUMNS


def test_nm_pattern_runs_once_per_method_and_gated_label():
    spec = SweepSpec(
        methods=("wanda", "gated_sink_wanda"),
        sparsities=(0.3, 0.5, 0.7),
        patterns=("unstructured", "2:4"),
        sink=SinkSpec(tau=0.1),
    )
    jobs = [(m.name, spec.tau_of(m), p, s) for m, p, s in spec.jobs]
    assert jobs == [
        ("wanda", pytest.approx(math.nan, nan_ok=True), "unstructured", 0.3),
        ("wanda", pytest.approx(math.nan, nan_ok=True), "unstructured", 0.5),
        ("wanda", pytest.approx(math.nan, nan_ok=True), "unstructured", 0.7),
        ("wanda", pytest.approx(math.nan, nan_ok=True), "2:4", 0.5),
        ("gated_sink_wanda", 0.1, "unstructured", 0.3),
        ("gated_sink_wanda", 0.1, "unstructured", 0.5),
        ("gated_sink_wanda", 0.1, "unstructured", 0.7),
        ("gated_sink_wanda", 0.1, "2:4", 0.5),
    ]
    assert [spec.label_of(m, p, s) for m, p, s in spec.jobs][3:5] == ["wanda 2:4", "gated_sink_wanda 30%, tau=0.1"]
    own = MethodSetting("gated_sink_sparsegpt", label="gated", sink=SinkSpec(tau=0.2))
    assert own.name == "gated_sink_sparsegpt" and own.key == ("gated",)  # the method column is the bare method
    assert spec.label_of(own, "unstructured", 0.5) == "gated: gated_sink_sparsegpt 50%, tau=0.2"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(methods=("nope",), sparsities=(0.5,)), "Unknown pruning method"),
        (dict(methods=("wanda",), sparsities=(1.2,)), r"sparsity must be in \[0, 1\)"),
        (dict(methods=("wanda",), sparsities=(0.5,), patterns=("3:2",)), "N < M"),
        (dict(methods=(), sparsities=(0.5,)), "at least one"),
        (dict(methods=("wanda",), sparsities=(0.5,), eval=EvalSpec(nsamples=0)), "nsamples"),
        (dict(methods=("wanda",), sparsities=(0.5, 0.5)), "same run"),
        (dict(methods=("wanda",), sparsities=(0.5,), patterns=("2:4", "2:4")), "same run"),
    ],
)
def test_bad_sweeps_fail_before_any_work(tiny_dlm, kwargs, match):
    calls = []
    with pytest.raises(SapError, match=match):
        run_sweep(tiny_dlm, SweepSpec(**kwargs), progress=lambda *a: calls.append(a))
    assert calls == []


def test_cancel_stops_the_sweep_with_the_dense_model_restored(tiny_dlm):
    spec = SweepSpec(methods=("magnitude",), sparsities=(0.5, 0.7), calibration=CALIB, eval=EVAL)
    before = _state(tiny_dlm)
    seen = []

    def cancel_during_variant_eval(done, total, message):
        seen.append(message)
        if "magnitude 50%: evaluate" in message and done > 200:
            raise Cancelled("stop")

    with pytest.raises(Cancelled):
        run_sweep(tiny_dlm, spec, progress=cancel_during_variant_eval)
    assert not any("70%" in m for m in seen)
    after = _state(tiny_dlm)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_sweep_figure(sweep):
    from sap_core.viz import sweep_figure

    df, _, _ = sweep
    extra = pd.DataFrame([dict(method="wanda", sparsity=0.5, pattern="2:4", ppl=50.0, ppl_se=2.0, prune_seconds=0.1)])
    fig = sweep_figure(pd.concat([df, extra], ignore_index=True), "absolute")
    names = [t.name for t in fig.data]
    assert "magnitude (unstructured)" in names and "wanda (unstructured)" in names and "wanda (2:4)" in names
    dense = [t for t in fig.data if t.name and t.name.startswith("dense")]
    assert len(dense) == 1 and set(dense[0].y) == {df.iloc[0]["ppl"]}
    wanda = next(t for t in fig.data if t.name == "wanda (unstructured)")
    rows = df[df["method"] == "wanda"]
    np.testing.assert_allclose(wanda.y, rows["ppl"])
    np.testing.assert_allclose(wanda.error_y.array, rows["ppl_se"])
    np.testing.assert_allclose(np.asarray(wanda.customdata)[:, 0], rows["sparsity"])
    assert list(wanda.text) == ["wanda 30%", "wanda 60%"]  # the hover names each run by its label
    assert list(next(t for t in fig.data if t.name == "wanda (2:4)").text) == ["wanda (2:4)"]  # a row without one
    assert "sparsity" in fig.layout.xaxis.title.text and "perplexity" in fig.layout.yaxis.title.text
    empty = sweep_figure(df.iloc[:0])
    assert len(empty.data) == 0 and empty.layout.annotations


def test_method_differences(sweep):
    from sap_core.sweep import method_differences

    df, _, _ = sweep
    diff = method_differences(df, [("wanda", "magnitude"), ("sink_wanda", "wanda")])
    assert len(diff) == 2 and set(diff["method"]) == {"wanda"}  # no sink_wanda rows in this sweep
    row = diff[diff["sparsity"] == 0.6].iloc[0]
    w = df[(df["method"] == "wanda") & (df["sparsity"] == 0.6)].iloc[0]
    m = df[(df["method"] == "magnitude") & (df["sparsity"] == 0.6)].iloc[0]
    assert row["delta_ppl"] == pytest.approx(w["ppl"] - m["ppl"])
    assert row["se_indep"] == pytest.approx(math.hypot(w["nll_se"], m["nll_se"]))
    d = df.attrs["estimates"][w["label"]] - df.attrs["estimates"][m["label"]]
    assert row["se_paired"] == pytest.approx(math.sqrt((d.var(axis=1, ddof=1) / d.shape[1]).sum()) / d.shape[0])
    assert row["z"] == pytest.approx((w["nll"] - m["nll"]) / row["se_paired"])
    # Without the estimates (e.g. a CSV alone) the independent error is used.
    bare = df.copy()
    bare.attrs = {}
    row = method_differences(bare, [("wanda", "magnitude")]).iloc[-1]
    assert math.isnan(row["se_paired"]) and row["z"] == pytest.approx(row["delta_nll"] / row["se_indep"])


def test_causal_model_sweep(tiny_ar):
    spec = SweepSpec(
        methods=("magnitude",),
        sparsities=(0.5,),
        calibration=CALIB,
        eval=EvalSpec(seqlen=24, nsamples=3, text=EVAL.text, prefix="To"),
    )
    df = run_sweep(tiny_ar, spec)
    assert df["method"].tolist() == ["dense", "magnitude"] and np.isfinite(df["ppl"]).all()
    assert (df["ppl_se"] > 0).all()


def test_old_csv_with_tau_in_the_method_name_loads_bare(tmp_path):
    """Older sweeps wrote a gated method as ``gated_sink_wanda(tau=0.05)``: it loads as the bare method
    with tau a number, and the tau table reads it like a new sweep."""
    from sap_core.tau import tau_table

    old = tmp_path / "old.csv"
    old.write_text(
        "method,sparsity,pattern,ppl,ppl_se,prune_seconds,nll,nll_se,achieved_sparsity,eval_seconds,label,tau\n"
        "sink_wanda,0.5,unstructured,20.0,0.5,1.0,3.0,0.02,0.5,1.0,sink_wanda 50%,\n"
        'gated_sink_wanda(tau=0.05),0.5,unstructured,19.0,0.5,1.0,2.9,0.02,0.5,1.0,"gated_sink_wanda 50%, tau=0.05",\n'
        'gated_sink_wanda(tau=0.1),0.5,unstructured,21.0,0.5,1.0,3.1,0.02,0.5,1.0,"gated_sink_wanda 50%, tau=0.1",0.1\n'
    )
    df = load_sweep(old)
    assert list(df["method"]) == ["sink_wanda", "gated_sink_wanda", "gated_sink_wanda"]
    assert df["tau"].iloc[1] == 0.05 and df["tau"].iloc[2] == 0.1 and math.isnan(df["tau"].iloc[0])
    table = tau_table(df, 0.5)
    assert list(table["kind"]) == ["official", "gated", "gated"] and list(table["tau"].iloc[1:]) == [0.05, 0.1]
    no_tau_column = tmp_path / "older.csv"
    no_tau_column.write_text("\n".join(line.rsplit(",", 1)[0] for line in old.read_text().splitlines()) + "\n")
    assert list(load_sweep(no_tau_column)["tau"].iloc[1:]) == [0.05, 0.1]


def test_paired_se_if_known_is_the_one_guard():
    from sap_core.evaluate import paired_se, paired_se_if_known

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(3, 4)), rng.normal(size=(3, 4))
    assert paired_se_if_known(a, b) == paired_se(a, b) > 0
    assert math.isnan(paired_se_if_known(a, None)) and math.isnan(paired_se_if_known(None, b))
    assert math.isnan(paired_se_if_known(a, b[:, :2]))  # other windows or draws: not paired


def test_resume_refuses_rows_computed_with_other_settings(tiny_dlm_dir, tmp_path, capsys, monkeypatch):
    from sap_core import sweep as sw
    from sap_core.cli import main
    from sap_core.sweep import partial_path

    out = tmp_path / "s.csv"
    argv = ["sweep", "--model", str(tiny_dlm_dir), "--device", "cpu", "--methods", "magnitude", "--sparsities", "0.3,0.5"]
    argv += ["--seqlen", "32", "--nsamples", "2", "--draws", "2", "--out", str(out), "--quiet"]
    real, calls = sw.run_job, []

    def interrupted(*args, **kwargs):  # the dense row is saved, then Ctrl-C
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(sw, "run_job", interrupted)
    assert main(argv) == 130
    monkeypatch.setattr(sw, "run_job", real)
    kept = load_sweep(partial_path(out))
    assert list(kept["label"]) == ["dense"] and kept.attrs["settings"]["model"] == str(tiny_dlm_dir.resolve())

    changed = [a if a != "2" or argv[i - 1] != "--nsamples" else "3" for i, a in enumerate(argv)]  # --nsamples 3
    assert main(changed + ["--resume"]) == 2
    err = capsys.readouterr().err
    assert "computed with another evaluation (evaluation: EvalSpec(" in err and "start afresh" in err
    assert load_sweep(partial_path(out)).equals(kept) and not out.exists()  # nothing lost, nothing mixed

    assert main(argv + ["--resume"]) == 0  # the same command goes on from the saved row
    assert "resuming: 1 finished row(s)" in capsys.readouterr().err
    done = load_sweep(out)
    assert list(done["label"]) == ["dense", "magnitude 30%", "magnitude 50%"] and done.attrs["settings"] == kept.attrs["settings"]
    pd.testing.assert_frame_equal(done.iloc[:1], kept, check_exact=True)


def test_estimates_whose_settings_are_not_an_object_read_as_damaged(sweep, tmp_path):
    from sap_core.errors import SweepSpecError
    from sap_core.sweep import estimates_path

    out = save_sweep(sweep[0], tmp_path / "s.csv")
    assert load_sweep(out).attrs["settings"]["evaluation"] == repr(EVAL)  # saved with the estimates
    with np.load(estimates_path(out)) as data:
        fields = {k: data[k] for k in data.files}
    fields["settings"] = np.array("[1, 2]")  # a hand-edited or hostile file
    np.savez_compressed(estimates_path(out), **fields)
    with pytest.raises(SweepSpecError, match="damaged"):
        load_sweep(out)


class TokenCount:
    """A toy metric (the :class:`~sap_core.evaluate.Metric` protocol, nothing else): the vocabulary size and
    whether a variant is applied (its first pruned weight holds zeros), as two columns of every row."""

    name = "toy"

    def __init__(self, fail: bool = False):
        self.fail, self.calls = fail, 0

    def validate(self) -> None:
        if self.fail:
            raise SapError("toy metric: refused before any work")

    def score(self, handle, progress=None) -> Score:
        self.calls += 1
        weight = next(m.weight for m in handle.module.modules() if isinstance(m, torch.nn.Linear))
        return Score({"vocab": handle.vocab_size, "zeros": float((weight == 0).float().mean())})


def test_a_new_metric_adds_its_columns_to_every_row(tiny_dlm):
    toy = TokenCount()
    spec = SweepSpec(methods=("magnitude",), sparsities=(0.5,), eval=EVAL, metrics=(toy,))
    df = run_sweep(tiny_dlm, spec)
    assert list(df.columns) == COLUMNS + ["vocab", "zeros"] and toy.calls == 2
    assert df["vocab"].tolist() == [tiny_dlm.vocab_size] * 2
    assert df["zeros"].iloc[0] == 0.0 and df["zeros"].iloc[1] > 0.4  # scored on the dense model, then with the variant applied
    plain = run_sweep(tiny_dlm, SweepSpec(methods=("magnitude",), sparsities=(0.5,), eval=EVAL))
    assert (
        df[COLUMNS].drop(columns=["prune_seconds", "eval_seconds"]).equals(plain.drop(columns=["prune_seconds", "eval_seconds"]))
    )
    assert (
        sweep_settings("m", spec)["metrics"] != sweep_settings("m", replace(spec, metrics=()))["metrics"]
    )  # a resume compares them
    with pytest.raises(SapError, match="refused before any work"):
        run_sweep(tiny_dlm, replace(spec, metrics=(TokenCount(fail=True),)))
    table = perplexity_table(tiny_dlm, {}, EVAL, metrics=(toy,))  # Compare takes the same metrics
    assert list(table.columns[-2:]) == ["vocab", "zeros"] and table["vocab"].tolist() == [tiny_dlm.vocab_size]


def test_eval_spec_is_perplexity_only(tiny_dlm):
    with pytest.raises(TypeError, match="metric"):
        EvalSpec(metric="acc:sinkscope_nextline")
    metric = Perplexity(EvalSpec(seqlen=24, nsamples=2, draws=2, text=EVAL.text))
    assert metric.name == "ppl" and metric.score(tiny_dlm).columns["nll"] == perplexity(tiny_dlm, metric.spec).nll


class ReversedExecutor:
    """A toy executor (the protocol is one method): the jobs in reverse order through run_job, no shared calibration."""

    def run(self, handle, spec, jobs, progress, finished) -> None:
        for job in reversed(jobs):
            finished(*run_job(handle, spec, job))


def test_a_custom_executor_gives_the_serial_rows_in_job_order(tiny_dlm, sweep):
    serial, _, _ = sweep
    spec = SweepSpec(methods=("magnitude", "wanda"), sparsities=(0.3, 0.6), calibration=CALIB, eval=EVAL)
    arrived = []
    df = run_sweep(tiny_dlm, spec, executor=ReversedExecutor(), on_row=lambda row: arrived.append(row["label"]))
    assert arrived == list(serial["label"])[::-1]
    timings = ["prune_seconds", "eval_seconds"]
    pd.testing.assert_frame_equal(df.drop(columns=timings), serial.drop(columns=timings), check_exact=True)
    assert list(df.attrs["estimates"]) == list(serial.attrs["estimates"])
    for label, est in serial.attrs["estimates"].items():
        assert np.array_equal(df.attrs["estimates"][label], est), label


@pytest.mark.parametrize("executor", ["ray", "serial", object()])
def test_run_sweep_takes_only_executor_objects(tiny_dlm, executor):
    calls = []
    with pytest.raises(SapError, match=r"is not an executor: pass SerialExecutor\(\) or RayExecutor\(\.\.\.\)\.$"):
        run_sweep(
            tiny_dlm, SweepSpec(methods=("magnitude",), sparsities=(0.5,)), progress=lambda *a: calls.append(a), executor=executor
        )
    assert calls == []
