"""Bit-identical numbers across refactors (issue 27): a 17-row sweep, a tau sweep, a structured sweep and an
lm-eval run on the built-in tiny-dlm, compared float for float with ``tests/golden/*.json``.

The JSON files were written by the code *before* the redesign (``python tests/test_golden.py --write`` at
commit 086d8e2); the test recomputes the same runs with the code of the day and asks for the same rows: every
number as its exact ``repr`` (timings left out), the per-draw estimates included. Regenerate them only when a
change is meant to move a number, and say so in the commit.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import one_torch_thread

GOLDEN = Path(__file__).resolve().parent / "golden"
TIMINGS = {"prune_seconds", "eval_seconds"}
SMALL_CAL = dict(nsamples=4, seqlen=64, seed=0)
SMALL_EVAL = dict(nsamples=4, draws=2, seqlen=64, seed=0)


def _value(v):
    if isinstance(v, (float, np.floating)):
        return repr(float(v))
    if isinstance(v, (np.integer,)):
        return int(v)
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return None
    return v


def _rows(df) -> list[dict]:
    return [{k: _value(v) for k, v in row.items() if k not in TIMINGS} for row in df.to_dict("records")]


def _estimates(df) -> dict:
    est = df.attrs.get("estimates") or {}
    return {label: [repr(float(x)) for x in np.asarray(a).ravel()] for label, a in sorted(est.items())}


def compute() -> dict[str, dict]:
    from sap_core.evaluate import EvalSpec
    from sap_core.lmeval.accuracy import accuracy_table
    from sap_core.lmeval.model import BenchSpec
    from sap_core.lmeval.tasks import BUILTIN_TASK
    from sap_core.models import load_model
    from sap_core.pruning import CalibrationSpec, PruneSpec, prune
    from sap_core.sinks import SinkSpec
    from sap_core.sweep import SweepSpec, run_sweep
    from sap_core.tau import tau_sweep_spec, tau_table

    handle = load_model("tiny-dlm", device="cpu")
    cal = CalibrationSpec(**SMALL_CAL)
    ev = EvalSpec(**SMALL_EVAL)
    out = {}
    methods = (
        "magnitude",
        "wanda",
        "sparsegpt",
        "sink_wanda",
        "sink_sparsegpt",
        "noised_wanda",
        "gated_sink_wanda",
        "gated_sink_sparsegpt",
    )
    spec = SweepSpec(
        methods=methods, sparsities=(0.5,), patterns=("unstructured", "2:4"), sink=SinkSpec(tau=0.05), calibration=cal, eval=ev
    )
    df = run_sweep(handle, spec)
    assert len(df) == 17
    out["sweep"] = {"rows": _rows(df), "estimates": _estimates(df)}

    tspec = tau_sweep_spec(("gated_sink_wanda",), 0.5, "unstructured", (0.0, 0.05), SinkSpec(), calibration=cal, eval=ev)
    tdf = run_sweep(handle, tspec)
    out["tau_sweep"] = {"rows": _rows(tdf), "estimates": _estimates(tdf), "table": _rows(tau_table(tdf, 0.5, "unstructured"))}

    sspec = SweepSpec(methods=("struct_wanda", "flap", "sink_flap"), sparsities=(0.25,), heads=0.25, calibration=cal, eval=ev)
    sdf = run_sweep(handle, sspec)
    out["structured_sweep"] = {"rows": _rows(sdf), "estimates": _estimates(sdf)}

    variant = prune(handle, PruneSpec("sink_wanda", 0.5, calibration=cal))
    res = accuracy_table(handle, {"sink_wanda 50%": variant}, [BUILTIN_TASK], BenchSpec(mc_num=4, batch_size=4), limit=12)
    per_doc = {f"{task}/{model}": [repr(float(x)) for x in a] for (task, model), a in sorted(res.per_doc.items())}
    out["lmeval"] = {"rows": _rows(res.table), "per_doc": per_doc}
    return out


def _canonical(obj) -> str:
    return json.dumps(obj, indent=1, sort_keys=True)


@pytest.fixture(scope="module")
def computed(one_thread_module):  # one reduction order, whatever the machine
    return compute()


@pytest.mark.parametrize("name", ["sweep", "tau_sweep", "structured_sweep", "lmeval"])
def test_rows_are_bit_identical_to_the_golden_run(computed, name):
    expected = json.loads((GOLDEN / f"{name}.json").read_text())
    assert _canonical(computed[name]) == _canonical(expected)


if __name__ == "__main__" and "--write" in sys.argv:
    with one_torch_thread():
        computed_now = compute()
    GOLDEN.mkdir(exist_ok=True)
    for name, value in computed_now.items():
        (GOLDEN / f"{name}.json").write_text(_canonical(value) + "\n")
        print("wrote", GOLDEN / f"{name}.json")
