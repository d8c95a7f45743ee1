"""Sweeps over Ray (sap_core.distributed): same rows as the serial sweep, nothing lost, clear cluster errors.

One local Ray for the module (2 CPUs, no dashboard), shut down at the end; tiny sweeps on the tiny random model.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from sap_core.distributed import LOCAL_CONFIG, ClusterError, RayExecutor, workers_import_this_checkout
from sap_core.errors import Cancelled
from sap_core.evaluate import EvalSpec
from sap_core.models import load_model
from sap_core.pruning.spec import CalibrationSpec
from sap_core.sweep import MethodSetting, SweepSpec, SweepWriter, load_sweep, partial_path, run_sweep

ray = pytest.importorskip("ray")

CAL = CalibrationSpec(nsamples=2, seqlen=32, T=10, interval=5)
EVAL = EvalSpec(seqlen=32, nsamples=2, draws=2)
TIMINGS = ["prune_seconds", "eval_seconds"]


@pytest.fixture(scope="module")
def cluster():
    with workers_import_this_checkout():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False, _system_config=LOCAL_CONFIG)
    yield
    ray.shutdown()


def grid(**changes) -> SweepSpec:
    kwargs = dict(
        methods=("magnitude", "wanda", "sink_wanda", "noised_wanda", "gated_sink_wanda", "sparsegpt", "sink_sparsegpt"),
        sparsities=(0.5,),
        patterns=("unstructured", "2:4"),
        calibration=CAL,
        eval=EVAL,
    )
    kwargs.update(changes)
    return SweepSpec(**kwargs)


def same_rows(a: pd.DataFrame, b: pd.DataFrame) -> None:
    pd.testing.assert_frame_equal(a.drop(columns=TIMINGS), b.drop(columns=TIMINGS), check_exact=True)
    assert list(a.attrs["estimates"]) == list(b.attrs["estimates"])
    for label, est in a.attrs["estimates"].items():
        assert np.array_equal(est, b.attrs["estimates"][label]), label


def test_ray_sweep_rows_equal_the_serial_sweep_bit_for_bit(cluster, one_thread, tiny_dlm):
    spec = grid()
    serial = run_sweep(tiny_dlm, spec)
    executor = RayExecutor(workers=2)
    seen, arrived = [], []
    distributed = run_sweep(
        tiny_dlm,
        spec,
        executor=executor,
        progress=lambda done, total, message: seen.append((done, total, message)),
        on_result=lambda row, est: arrived.append(row["label"]),
    )
    same_rows(serial, distributed)  # same windows, masks, seeds: identical perplexities, in job order
    assert sorted(arrived) == sorted(serial["label"]) and len(arrived) == len(set(arrived))
    # one calibration for the whole noised Wanda and sink SparseGPT families (same calibration, same sink layers)
    assert {k: executor.stats[k] for k in ("calibrations", "retries", "workers")} == {
        "calibrations": 1,
        "retries": 0,
        "workers": 2,
    }
    assert seen[-1][:2] == (len(serial), len(serial)) and "w0" in seen[-1][2] and "w1" in seen[-1][2]
    assert not executor.status  # workers gone


def test_ray_sweep_retries_a_killed_worker_keeps_a_failing_job_alone_and_resumes(cluster, one_thread, tiny_dlm, tmp_path):
    bad = MethodSetting("wanda", label="short", options=(("calibration", CalibrationSpec(text="To be.", seqlen=32)),))
    spec = grid(methods=("magnitude", "sink_wanda", bad, "noised_wanda"), patterns=("unstructured",), sparsities=(0.6,))
    serial = run_sweep(
        tiny_dlm, grid(methods=("magnitude", "sink_wanda", "noised_wanda"), patterns=("unstructured",), sparsities=(0.6,))
    )
    executor = RayExecutor(workers=2, retries=1)
    killed = []

    def kill_once(done, total, message):  # SIGKILL the process of a worker that is running a job
        if killed:
            return
        for name, s in executor.status.items():
            if s["pid"] and s["job"] not in ("idle", "starting", "dense") and not s["job"].startswith("calibrating"):
                os.kill(s["pid"], signal.SIGKILL)
                killed.append((name, s["job"]))
                return

    out = tmp_path / "sweep.csv"
    writer = SweepWriter(out)
    df = run_sweep(tiny_dlm, spec, executor=executor, progress=kill_once, on_result=writer.add)
    assert killed and executor.stats["retries"] == 1 and executor.stats["workers"] == 3
    assert list(df["label"]) == ["dense", "magnitude 60%", "sink_wanda 60%", "short: wanda 60%", "noised_wanda 60%"]
    failed = df[df["error"] != ""]
    assert list(failed["label"]) == ["short: wanda 60%"]
    assert all(e.startswith("PruneSpecError: The calibration text is") for e in failed["error"])
    assert failed["ppl"].isna().all()
    good = df[df["error"] == ""].drop(columns=["error"]).reset_index(drop=True)
    good.attrs = df.attrs
    same_rows(serial, good)
    partial = load_sweep(partial_path(out))  # every row exactly once, the killed job's included
    assert sorted(partial["label"]) == sorted(df["label"])
    assert set(partial.attrs["estimates"]) == set(good["label"])

    # --resume: the good rows are kept, only the failed jobs run again (and fail again, alone)
    resumed = SweepWriter(out, resume=True)
    assert len(resumed.rows) == 4 and resumed.done is not None
    again = []
    df2 = run_sweep(
        tiny_dlm, spec, executor=RayExecutor(workers=1), done=resumed.done, on_result=lambda r, e: again.append(r["label"])
    )
    assert again == ["short: wanda 60%"]
    pd.testing.assert_frame_equal(df2.drop(columns=TIMINGS), df.drop(columns=TIMINGS), check_exact=True)


def test_ctrl_c_stops_the_workers_keeps_the_partial_csv_and_says_how_to_resume(
    cluster, tiny_dlm_dir, tmp_path, capsys, monkeypatch
):
    import sap_core.cli as cli
    import sap_core.distributed as distributed

    pids = []
    await_ready = distributed.RayExecutor._await_ready

    def record_pids(self, workers):
        await_ready(self, workers)
        pids.extend(s["pid"] for s in self.status.values())

    def interrupt(self, done, total, message=""):
        if done >= 1:  # a row is in the partial CSV: the user presses Ctrl-C
            raise KeyboardInterrupt

    monkeypatch.setattr(distributed.RayExecutor, "_await_ready", record_pids)
    monkeypatch.setattr(cli.Bar, "__call__", interrupt)
    out = tmp_path / "s.csv"
    argv = ["sweep", "--model", str(tiny_dlm_dir), "--device", "cpu", "--methods", "magnitude", "--sparsities", "0.3,0.5,0.7"]
    argv += ["--seqlen", "32", "--nsamples", "2", "--draws", "2", "--out", str(out), "--executor", "ray"]
    assert cli.main(argv) == 130
    err = capsys.readouterr().err
    assert f"are in {partial_path(out)}" in err and "run the same command with --resume to continue" in err
    assert not out.exists() and len(load_sweep(partial_path(out))) >= 1
    assert len(pids) == 2 and ray.is_initialized()  # the module's Ray is left running
    deadline = time.monotonic() + 60
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(p) for p in pids)


def test_cancelling_a_ray_sweep_while_it_starts(cluster, tiny_dlm):
    messages = []

    def cancel(done, total, message):  # the app's Cancel button raises Cancelled from the progress callback
        messages.append(message)
        raise Cancelled("stop")

    executor = RayExecutor(workers=1)
    with pytest.raises(Cancelled):
        run_sweep(tiny_dlm, grid(methods=("magnitude",), patterns=("unstructured",)), executor=executor, progress=cancel)
    assert messages == ["starting Ray and 1 worker(s)"] and not executor.status and ray.is_initialized()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie that Ray has not reaped yet is dead
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_ray_sweep_refuses_a_model_that_a_node_cannot_read(cluster, tiny_dlm_dir, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(tiny_dlm_dir, copy)
    handle = load_model(copy, device="cpu")
    shutil.rmtree(copy)  # gone from the (only) node
    with pytest.raises(ClusterError, match="cannot be read on node .*same path"):
        run_sweep(handle, grid(methods=("magnitude",), patterns=("unstructured",)), executor=RayExecutor())


def test_ray_executor_refuses_impossible_settings(cluster, tiny_dlm):
    for bad in (
        dict(workers=0),
        dict(workers=1.5),
        dict(gpus_per_worker=-1),
        dict(gpus_per_worker=float("nan")),
        dict(address=" "),
    ):
        with pytest.raises(ClusterError):
            RayExecutor(**bad)
    with pytest.raises(ClusterError, match="3 workers need 3 CPUs .* has 2 CPUs"):
        run_sweep(tiny_dlm, grid(methods=("magnitude",), patterns=("unstructured",)), executor=RayExecutor(workers=3))


def test_cli_sweep_on_ray_resumes_from_the_partial_csv(cluster, one_thread, tiny_dlm, tiny_dlm_dir, tmp_path, capsys):
    from sap_core.cli import main

    out = tmp_path / "s.csv"
    common = [
        "sweep",
        "--model",
        str(tiny_dlm_dir),
        "--device",
        "cpu",
        "--methods",
        "magnitude,sink_wanda",
        "--sparsities",
        "0.5",
    ]
    common += ["--calib-nsamples", "2", "--calib-seqlen", "32", "--seqlen", "32", "--nsamples", "2", "--draws", "2", "--quiet"]
    assert main(common + ["--out", str(out)]) == 0  # serial reference
    reference = load_sweep(out)
    writer = SweepWriter(tmp_path / "r.csv")  # an interrupted run that finished the dense row only
    writer.add(reference.iloc[0].to_dict(), reference.attrs["estimates"]["dense"])
    capsys.readouterr()
    argv = common + ["--out", str(tmp_path / "r.csv"), "--executor", "ray", "--workers", "2", "--resume"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "resuming: 1 finished row(s)" in err
    same_rows(reference, load_sweep(tmp_path / "r.csv"))
    assert not partial_path(tmp_path / "r.csv").exists()
    assert main(common + ["--out", str(tmp_path / "x.csv"), "--address", "localhost:1"]) == 2
    assert "--address needs --executor ray" in capsys.readouterr().err


@pytest.mark.slow
def test_compare_page_sweep_runs_on_the_cluster_named_by_the_environment(cluster, monkeypatch):
    from pathlib import Path

    from streamlit.testing.v1 import AppTest

    import sap_core.distributed as distributed

    calls = []
    original = distributed.RayExecutor.run

    def recorded(self, handle, spec, jobs, progress, finished):
        calls.append((self.address, self.workers, [j.label for j in jobs]))
        return original(self, handle, spec, jobs, progress, finished)

    monkeypatch.setattr(distributed.RayExecutor, "run", recorded)
    monkeypatch.setenv(distributed.ADDRESS_ENV, "auto")  # the Ray of this process is used as it is
    at = AppTest.from_file(str(Path(__file__).resolve().parents[1] / "app.py"), default_timeout=300)
    at.run()
    at.switch_page("pages/compare.py").run()
    assert any("runs on the Ray cluster at auto" in c.value for c in at.caption)
    nums = {n.label: n for n in at.number_input}
    nums["Windows"].set_value(2)
    nums["Monte Carlo draws"].set_value(2)
    ms = {m.label: m for m in at.multiselect}
    ms["Methods"].set_value(["magnitude"])
    ms["Sparsities"].set_value([0.5])
    [b for b in at.button if b.label == "Run sweep"][0].click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert calls == [("auto", 2, ["dense", "magnitude 50%"])]
    sweep = at.dataframe[-1].value
    assert list(sweep["label"]) == ["dense", "magnitude 50%"] and sweep["ppl"].notna().all()
    assert ray.is_initialized()  # the app stays connected


def test_a_local_ray_runs_this_checkouts_sap_core(cluster, monkeypatch):
    import sap_core

    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    with workers_import_this_checkout():
        first, *rest = os.environ["PYTHONPATH"].split(os.pathsep)
        assert first == str(Path(sap_core.__file__).resolve().parent.parent) and rest == ["/elsewhere"]
    assert os.environ["PYTHONPATH"] == "/elsewhere"  # only while Ray starts
    with workers_import_this_checkout(local=False):
        assert os.environ["PYTHONPATH"] == "/elsewhere"  # joining a cluster changes nothing here

    @ray.remote(num_cpus=0)
    def where() -> str:
        import sap_core as worker_copy

        return worker_copy.__file__

    assert ray.get(where.remote()) == sap_core.__file__  # the module's Ray started under the context
