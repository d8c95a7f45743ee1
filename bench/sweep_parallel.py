"""The README sweep serial against Ray with 2 workers (one torch thread each), Ray's start-up included.

Runs the README's sweep (tiny-dlm; magnitude, wanda, sparsegpt, sink_wanda, sink_sparsegpt, noised_wanda,
gated_sink_wanda at tau 0.05; sparsities 0.3, 0.5, 0.7; unstructured and 2:4; default calibration and
evaluation) once serially in this process (one torch thread) and once with
``run_sweep(..., executor=RayExecutor(workers=2))``, which starts a local Ray (``ray.init``), starts the two
workers (each loads the model) and stops Ray again, all inside the timed call. Checks that the rows are
identical and prints both wall times and their ratio (target, issue 20: <= 0.65x), Ray's start-up cost
(``ray.init`` + the per-node model probe + the workers loading the model) and the per-job overhead (a job's
round trip as the driver sees it minus the time the worker spent in it: scheduling, argument and result
transfer, fetching the shared calibration). ``--quick``: 4 calibration and evaluation windows and one
sparsity (a smoke run). ``--ray-first`` swaps the order; ``--rounds 2`` runs serial, ray, ray, serial and
reports the means (a drift in the machine's load cancels). The load average is printed after every run: the
machine is shared, so figures are only comparable within one invocation.

Where the time goes: Ray's parts (``ray.init``; the workers ready; the jobs; ``ray.shutdown``) and, for each run,
the CPU time the whole machine spent (``/proc/stat``, every process: the sweep, Ray's daemons, its workers).
That busy time over the machine's cores is the shortest wall time any schedule could reach; over the serial
wall time it is the ratio's floor. ``--joined``: the Ray sweeps join a Ray started before the timing (as
after ``ray start --head``), so they pay the workers' start, not Ray's. ``--scale K``: K times the evaluation
windows (a longer sweep: the same fixed costs over more work).

    python bench/sweep_parallel.py [--quick] [--workers 2] [--ray-first] [--rounds 2] [--joined] [--scale 2]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import pandas as pd
import torch

from sap_core.distributed import RayExecutor, workers_import_this_checkout
from sap_core.evaluate import EvalSpec
from sap_core.models import load_model
from sap_core.pruning import CalibrationSpec
from sap_core.sinks import SinkSpec
from sap_core.sweep import SweepSpec, run_sweep


def busy_core_seconds() -> float:
    """CPU seconds the whole machine has spent busy since boot (every process; /proc/stat, user to steal)."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:9]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # less idle and iowait


README_METHODS = ("magnitude", "wanda", "sparsegpt", "sink_wanda", "sink_sparsegpt", "noised_wanda", "gated_sink_wanda")
TIMINGS = ["prune_seconds", "eval_seconds"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="4 calibration and 4 evaluation windows, sparsity 0.5 only")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--ray-first", action="store_true", help="run the Ray sweep before the serial one")
    ap.add_argument("--rounds", type=int, default=1, help="rounds of both runs in ABBA order (2: serial, ray, ray, serial)")
    ap.add_argument("--joined", action="store_true", help="join a Ray started before the timing instead of starting one")
    ap.add_argument("--scale", type=int, default=1, help="K times the evaluation windows (a longer sweep)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    handle = load_model("tiny-dlm", device="cpu")
    n = 4 if args.quick else 16
    spec = SweepSpec(
        methods=README_METHODS,
        sparsities=(0.5,) if args.quick else (0.3, 0.5, 0.7),
        patterns=("unstructured", "2:4"),
        sink=SinkSpec(tau=0.05),
        calibration=CalibrationSpec(nsamples=n),
        eval=EvalSpec(nsamples=n * args.scale),
    )
    print(
        f"{len(spec.jobs)} jobs + dense; calibration {n} windows; evaluation {spec.eval.nsamples} windows x {spec.eval.draws} draws; "
        f"{os.cpu_count()} CPUs; load average at start {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    run_sweep(handle, SweepSpec(methods=("magnitude",), sparsities=(0.5,), eval=EvalSpec(nsamples=1, draws=2)))  # warm-up

    executor = RayExecutor(workers=args.workers)
    if args.joined:
        import ray

        with workers_import_this_checkout():
            ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False, configure_logging=False)
        time.sleep(5)  # Ray's daemons settle before the first timing
    pair = ("ray", "serial") if args.ray_first else ("serial", "ray")
    order = [name for r in range(args.rounds) for name in (pair if r % 2 == 0 else pair[::-1])]
    walls: dict[str, list[float]] = {"serial": [], "ray": []}
    busy: dict[str, list[float]] = {"serial": [], "ray": []}
    frames, startups, overhead, parts = {}, [], [], []
    for name in order:
        b0, t0 = busy_core_seconds(), time.perf_counter()
        df = run_sweep(handle, spec, executor=executor if name == "ray" else None)
        walls[name].append(time.perf_counter() - t0)
        busy[name].append(busy_core_seconds() - b0)
        frames.setdefault(name, df)
        print(
            f"{name:>6}: {walls[name][-1]:7.1f} s wall, {busy[name][-1]:6.1f} core-s busy (load average {os.getloadavg()[0]:.2f})",
            flush=True,
        )
        pd.testing.assert_frame_equal(
            frames["serial" if "serial" in frames else name].drop(columns=TIMINGS), df.drop(columns=TIMINGS), check_exact=True
        )
        if name == "ray":
            stats = executor.stats
            startups.append(stats["startup_seconds"])
            parts.append((stats["init_seconds"], stats["startup_seconds"], stats.get("shutdown_seconds", 0.0)))
            work = df.set_index("label")[TIMINGS].sum(axis=1)
            overhead += [stats["round_trips"][label] - work[label] for label in stats["round_trips"]]

    serial, distributed = frames["serial"], frames["ray"]
    pd.testing.assert_frame_equal(serial.drop(columns=TIMINGS), distributed.drop(columns=TIMINGS), check_exact=True)
    assert all(np.array_equal(v, distributed.attrs["estimates"][k]) for k, v in serial.attrs["estimates"].items())
    t_serial, t_ray = np.mean(walls["serial"]), np.mean(walls["ray"])
    print(f"identical rows: yes ({len(serial)} rows, every run)")
    print(f"ray / serial wall: {t_ray / t_serial:.2f}x (means of {len(walls['ray'])} run(s) each; target <= 0.65x)")
    init, startup, shutdown = np.mean(parts, axis=0)
    print(
        f"ray start-up {startup:.1f} s (ray.init {init:.1f} s, then {args.workers} workers loading the model "
        f"{startup - init:.1f} s); jobs {t_ray - startup - shutdown:.1f} s; ray.shutdown {shutdown:.1f} s"
        + (" (Ray joined, not started)" if args.joined else "")
    )
    cores = os.cpu_count() or 1
    b_serial, b_ray = np.mean(busy["serial"]), np.mean(busy["ray"])
    print(
        f"CPU: serial {b_serial:.1f} core-s, ray {b_ray:.1f} core-s (+{b_ray - b_serial:.1f}: Ray's daemons and workers "
        f"starting, the jobs in two processes); {b_ray:.1f} / {cores} cores = {b_ray / cores:.1f} s at the least: "
        f"floor {b_ray / cores / t_serial:.2f}x serial"
    )
    print(
        f"per-job overhead (round trip - work): median {np.median(overhead) * 1000:.0f} ms, "
        f"max {max(overhead) * 1000:.0f} ms over {len(overhead)} jobs; calibrations computed per run: {executor.stats['calibrations']}"
    )
    print(f"load average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
