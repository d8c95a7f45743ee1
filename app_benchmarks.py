"""The Compare page's Benchmarks section: lm-eval accuracy of the dense model and chosen variants, paired.

Drawn by ``pages/compare.py`` (``benchmarks_section(handle, variants)``); the work is
:func:`sap_core.lmeval.accuracy.accuracy_table`, the cost shown first is :func:`sap_core.lmeval.accuracy.estimate_cost`.
"""

from __future__ import annotations

import streamlit as st

import app_shared
from app_common import CancelButton, duration, job, model_choice, queued_job, stored_caption
from sap_core.lmeval.accuracy import accuracy_table, estimate_cost, format_table
from sap_core.lmeval.model import BenchSpec
from sap_core.lmeval.tasks import BUILTIN_TASK

CONFIRM_SECONDS = 180  # runs estimated longer than this ask for confirmation first


def benchmarks_section(handle, variants: dict) -> None:
    st.subheader("Benchmarks")
    if not app_shared.settings().heavy_jobs:
        st.info("Benchmarks are turned off on this server by its host (heavy jobs are off).", icon=":material/block:")
        return
    st.caption(
        "Accuracy through lm-evaluation-harness, as the paper measures it. The built-in task asks which of four passages "
        "of a held-out play a line continues (chance 25 %). Every model scores the same documents with the same Monte "
        "Carlo masks, so each variant's difference from the dense model has a paired standard error; differences "
        "beyond 2 paired SE are marked *." + (" A causal model scores exactly (no Monte Carlo)." if handle.causal else "")
    )
    c = st.columns([3, 1, 1])
    tasks_text = c[0].text_input(
        "Tasks",
        BUILTIN_TASK,
        help="Comma-separated lm-eval task names. Others work when their data is cached here (no hub at run time).",
    )
    mc_num = c[1].number_input(
        "mc_num",
        1,
        1024,
        8,
        help="Monte Carlo samples per request (DLM); the official code's default is 128.",
        disabled=handle.causal,
    )
    limit = c[2].number_input("Documents", 1, 100000, 20, help="Documents per task (lm-eval's --limit).")
    chosen = st.multiselect(
        "Variants to score", list(variants), default=list(variants), key="bench_variants", help="Made on the Prune page."
    )
    tasks = [t.strip() for t in tasks_text.split(",") if t.strip()]
    spec = None
    cost = None
    with job("The cost estimate"):
        spec = BenchSpec(mc_num=int(mc_num), batch_size=int(mc_num))
        key = (model_choice(), tuple(tasks), spec.mc_num, int(limit), 1 + len(chosen))
        cached = st.session_state.get("bench_cost")
        if cached is None or cached[0] != key:  # requests built and a pass timed once per setting, not on every rerun
            st.session_state["bench_cost"] = (key, estimate_cost(handle, tasks, spec, int(limit), 1 + len(chosen)))
        cost = st.session_state["bench_cost"][1]
    if cost is not None:
        st.caption(
            f"Cost: {cost.requests} requests × {cost.models} model(s)"
            + ("" if handle.causal else f" × mc_num {spec.mc_num} / batch {spec.batch_size}")
            + f" = {cost.passes * cost.models} forward passes; about {duration(cost.seconds)} on this device."
        )
    confirmed = True
    if cost is not None and cost.seconds > CONFIRM_SECONDS:
        confirmed = st.checkbox(
            f"Run it anyway (estimated {duration(cost.seconds)})",
            key="bench_confirm",
            help="Lower Documents or mc_num for a quicker look.",
        )
    go = st.button("Score benchmarks", type="primary", disabled=cost is None or not confirmed)
    cancel = CancelButton("benchmarks", handle)
    cancel.notice("Benchmark run", "no result was kept")
    failed = False
    if go and cost is not None:
        cancel.running("Stops the running benchmark; the dense model is restored.")
        bar = st.progress(0.0, text="Benchmarks…")
        failed = True
        with job("The benchmark run"):
            picked = {n: variants[n] for n in chosen}
            result = queued_job(
                handle,
                "Scoring",
                lambda progress: accuracy_table(handle, picked, tasks, spec, limit=int(limit), progress=progress),
                bar,
                cancel=False,
            )
            st.session_state["bench_result"] = {
                "model": model_choice(),
                "table": result.table,
                "label": (
                    f"{', '.join(tasks)}, {int(limit)} documents"
                    + ("" if handle.causal else f", mc_num {spec.mc_num}")
                    + f"; models: dense{''.join(', ' + n for n in chosen)}"
                ),
            }
            failed = False
        bar.empty()
    cancel.idle()
    stored = st.session_state.get("bench_result")
    if stored is not None and stored["model"] == model_choice():
        stored_caption(stored, failed)
        st.dataframe(format_table(stored["table"]), hide_index=True)
        beyond = stored["table"][stored["table"]["beyond_2se"]]
        st.markdown(
            "Beyond 2 paired SE: " + ", ".join(f"**{m}** on {t}" for m, t in zip(beyond["model"], beyond["task"]))
            if len(beyond)
            else "No variant differs from the dense model by more than 2 paired standard errors."
        )
        st.download_button("Download benchmarks (CSV)", stored["table"].to_csv(index=False), "benchmarks.csv", "text/csv")
