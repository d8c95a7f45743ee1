"""Cost of a sweep with calibration reused across its jobs against recalibrating every job.

Runs the README's sweep (tiny-dlm; magnitude, wanda, sparsegpt, sink_wanda, sink_sparsegpt,
noised_wanda, gated_sink_wanda at tau 0.05; sparsities 0.3, 0.5, 0.7; unstructured and 2:4; the
default calibration and evaluation settings) both ways in one process, ``--rounds`` times each in the
order recalibrate, reuse, reuse, recalibrate (so a drift in the machine's speed cancels in the means; one
run each was seen to swing the ratio between 0.58x and 0.74x): with ``run_sweep``'s default
(:class:`sap_core.pruning.scores.CalibrationCache`) and with ``SerialExecutor(reuse_calibration=False)`` (every job
recalibrates, as before issue 14). Checks that both give the same rows and prints the wall and CPU
times, the pruning and evaluation parts (evaluation CPU time counted around ``sap_core.evaluate.perplexity``,
pruning = the rest), and the ratios. ``--taus`` adds a tau sweep of gated_sink_wanda;
``--quick`` shrinks calibration and evaluation to 4 windows (a smoke run on a busy machine).
Target (issue 14): <= 0.5x.

    python bench/sweep_cost.py [--quick] [--rounds 2] [--taus 0,0.01,0.02,0.05,0.1] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

import sap_core.evaluate as evaluate_module
from sap_core.evaluate import EvalSpec
from sap_core.models import load_model
from sap_core.pruning import CalibrationSpec
from sap_core.sinks import SinkSpec
from sap_core.sweep import SerialExecutor, SweepSpec, run_sweep

README_METHODS = ("magnitude", "wanda", "sparsegpt", "sink_wanda", "sink_sparsegpt", "noised_wanda", "gated_sink_wanda")
EVAL_CPU = [0.0]  # CPU seconds spent in the sweep's evaluations (the rows only record their wall time)


def timed_perplexity(*args, **kwargs):
    c0 = time.process_time()
    try:
        return PERPLEXITY(*args, **kwargs)
    finally:
        EVAL_CPU[0] += time.process_time() - c0


PERPLEXITY, evaluate_module.perplexity = evaluate_module.perplexity, timed_perplexity


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="4 calibration and 4 evaluation windows instead of 16")
    ap.add_argument("--taus", default="", help="comma-separated taus for gated_sink_wanda (default: the README's 0.05)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--rounds",
        type=int,
        default=2,
        help="rounds of both runs, in the order recalibrate, reuse, reuse, recalibrate, ... (ABBA: a drift in the "
        "machine's speed cancels); 1 = one run each",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    handle = load_model("tiny-dlm", device="cpu")
    n = 4 if args.quick else 16
    taus = tuple(float(t) for t in args.taus.split(",") if t.strip())
    spec = SweepSpec(
        methods=README_METHODS,
        sparsities=(0.3, 0.5, 0.7),
        patterns=("unstructured", "2:4"),
        sink=SinkSpec(tau=0.05),
        sink_taus=taus,
        calibration=CalibrationSpec(nsamples=n),
        eval=EvalSpec(nsamples=n),
    )
    print(
        f"{len(spec.jobs)} jobs + dense; calibration {n} windows x {len(spec.calibration.timesteps)} timesteps; "
        f"evaluation {n} windows x {spec.eval.draws} draws; {args.threads} thread(s); "
        f"load average at start {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    run_sweep(handle, SweepSpec(methods=("magnitude",), sparsities=(0.5,), eval=EvalSpec(nsamples=1, draws=2)))  # warm-up
    names = {False: "recalibrate every job", True: "reuse calibration"}
    order = (
        [False, True]
        if args.rounds == 1
        else [r for k in range(args.rounds) for r in ((False, True) if k % 2 == 0 else (True, False))]
    )
    runs = {False: [], True: []}
    for reuse in order:
        EVAL_CPU[0] = 0.0
        t0, c0 = time.perf_counter(), time.process_time()
        df = run_sweep(handle, spec, executor=SerialExecutor(reuse_calibration=reuse))
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        runs[reuse].append((df, wall, cpu, EVAL_CPU[0]))
        print(
            f"{names[reuse]:>22}: {wall:7.1f} s wall, {cpu:7.1f} s CPU (pruning {df['prune_seconds'].sum():6.1f} s wall, "
            f"{cpu - EVAL_CPU[0]:6.1f} s CPU; evaluation {df['eval_seconds'].sum():6.1f} s wall, {EVAL_CPU[0]:6.1f} s CPU); "
            f"load average {os.getloadavg()[0]:.2f}",
            flush=True,
        )
    frames = [df for reuse in (False, True) for df, *_ in runs[reuse]]
    diff = max(float(np.max(np.abs(df["nll"].to_numpy() - frames[0]["nll"].to_numpy()))) for df in frames)
    print(f"same rows: max |delta nll| = {diff:.2e} over {len(frames[0])} rows and {len(frames)} runs")
    mean = {r: np.mean([[wall, cpu, e, df["prune_seconds"].sum()] for df, wall, cpu, e in runs[r]], axis=0) for r in runs}
    (t_old, c_old, e_old, p_old), (t_new, c_new, e_new, p_new) = mean[False], mean[True]
    print(
        f"ratio (reuse / recalibrate, means over {len(runs[True])} run(s) each), whole sweep: {t_new / t_old:.2f}x wall, "
        f"{c_new / c_old:.2f}x CPU time (CPU time is the fairer figure on a shared machine); evaluation CPU "
        f"{e_old:.1f} s vs {e_new:.1f} s (the same work)"
    )
    print(f"ratio, pruning part only: {p_new / p_old:.2f}x wall, {(c_new - e_new) / (c_old - e_old):.2f}x CPU time")
    out = {names[r]: runs[r][-1] for r in (False, True)}
    per_method = {name: df.groupby("method", sort=False)["prune_seconds"].sum() for name, (df, *_) in out.items()}
    print(
        "pruning wall seconds per method, recalibrate -> reuse: "
        + ", ".join(
            f"{m} {per_method['recalibrate every job'][m]:.1f} -> {t:.1f}"
            for m, t in per_method["reuse calibration"].items()
            if m != "dense"
        )
    )


if __name__ == "__main__":
    main()
