"""A sweep on a Ray that the executor starts and stops itself (tests/test_distributed.py runs on one module-wide Ray).

Same rows as the serial sweep; Ray's processes import this checkout's ``sap_core`` without a ``runtime_env``; Ray is
down afterwards, its autoscaler monitor included (stopped first: see ``distributed._stop_autoscaler_monitor``).
"""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest

from sap_core.distributed import RayExecutor
from sap_core.evaluate import EvalSpec
from sap_core.pruning.spec import CalibrationSpec
from sap_core.sweep import SweepSpec, run_sweep

ray = pytest.importorskip("ray")

TIMINGS = ["prune_seconds", "eval_seconds"]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"  # a zombie is dead
    except FileNotFoundError:
        return False


def test_a_sweep_starts_ray_runs_the_serial_rows_and_leaves_nothing_running(one_thread, tiny_dlm, monkeypatch):
    if ray.is_initialized():  # another module's Ray: this test is about one the executor starts
        ray.shutdown()
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    spec = SweepSpec(
        methods=("magnitude", "sink_wanda"),
        sparsities=(0.5,),
        calibration=CalibrationSpec(nsamples=2, seqlen=32, T=10, interval=5),
        eval=EvalSpec(seqlen=32, nsamples=2, draws=2),
    )
    serial = run_sweep(tiny_dlm, spec)
    seen = {}

    def look(done, total, message):  # while the sweep runs: Ray's own process table (private; the workaround reads it)
        if ray.is_initialized() and "monitor" not in seen:
            from ray._private import ray_constants

            node = ray._private.worker._global_node
            seen["monitor"] = [p.process.pid for p in node.all_processes[ray_constants.PROCESS_TYPE_MONITOR]]
            seen["pythonpath"] = os.environ["PYTHONPATH"]

    shutdown = ray.shutdown

    def shutdown_after_the_monitor(*args, **kwargs):  # Ray stops its GCS before the monitor, which then hangs 1 s
        seen["monitor alive at shutdown"] = [_alive(pid) for pid in seen["monitor"]]
        return shutdown(*args, **kwargs)

    monkeypatch.setattr(ray, "shutdown", shutdown_after_the_monitor)
    executor = RayExecutor(workers=1)
    distributed = run_sweep(tiny_dlm, spec, executor=executor, progress=look)
    pd.testing.assert_frame_equal(serial.drop(columns=TIMINGS), distributed.drop(columns=TIMINGS), check_exact=True)
    assert all(np.array_equal(v, distributed.attrs["estimates"][k]) for k, v in serial.attrs["estimates"].items())
    assert not ray.is_initialized() and executor.stats["calibrations"] == 1
    assert executor.stats["init_seconds"] > 0 and executor.stats["shutdown_seconds"] > 0
    assert len(seen["monitor"]) == 1 and seen["monitor alive at shutdown"] == [False] and not _alive(seen["monitor"][0])
    assert seen["pythonpath"] == os.environ["PYTHONPATH"] == "/elsewhere"  # set only while Ray started
