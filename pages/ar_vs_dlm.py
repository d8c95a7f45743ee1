"""AR vs DLM: does a diffusion model's sink move more than an autoregressive model's? One prompt side by side, then many."""

import json
from dataclasses import replace
from pathlib import Path

import streamlit as st

import app_lab
import app_shared
from app_common import (
    CancelButton,
    active_model,
    ar_model,
    cached_model,
    current_trajectory,
    duration,
    is_cached,
    job,
    kept,
    model_choice,
    queued_generation,
    queued_job,
    sink_spec,
)
from sap_core import viz
from sap_core.attention import AttentionRecorder
from sap_core.errors import SapError
from sap_core.sink_report import COMPARE_METRICS, METRIC_TITLES, compare
from sap_core.sinks import VIEW_NOTES
from sap_core.sinkstats import estimate_cost, evaluation_prompts, prompts_from_lines, run_sinkstats

st.header("AR vs DLM")
st.caption(
    "The paper's premise: an autoregressive (AR) model's attention sink sits still on the first token, while a "
    "diffusion language model's (DLM) sinks move across the denoising steps. Check it on one prompt, then on many."
)
handle = active_model()
traj = current_trajectory(handle)
if traj is None:
    st.info("Run a generation on the **Denoising explorer** page first; this page decodes the same prompt with the other model.")
    st.stop()

default_other = "tiny-dlm" if handle.causal else ar_model()
if app_shared.shared():  # a class: the models the server offers, by name (never a path)
    names = app_shared.settings().model_names()
    other_source = app_shared.settings().source_of(
        st.selectbox("Other model", names, names.index(default_other), key="other_model_name", help="A model of the other kind.")
    )
else:
    other_source = st.text_input(
        "Other model",
        default_other,
        key="other_model",
        help="A model of the other kind: the built-in twin, or a local model directory. "
        f"The active model is {'causal (AR)' if handle.causal else 'a masked-diffusion model (DLM)'}.",
    )
views = ["raw", "uniform", "expected"]
view = st.radio(
    "Mass view",
    views,
    format_func=lambda v: VIEW_NOTES[v][0],
    horizontal=True,
    key="ar_view",
    help="Raw is the paper's view and the Sink stability page's: the numbers here then equal that page's.",
)
_, corrects, distorts = VIEW_NOTES[view]
st.caption(f"**Corrects:** {corrects}  \n**Distorts:** {distorts}")
spec = replace(sink_spec(), normalize=view)
st.caption(
    f"Sink settings from the Sink stability page: rule **{spec.rule}**, k = {spec.k:g}, alpha = {spec.alpha:g}, "
    f"top-k = {spec.top_k}; decoding settings from the Denoising explorer."
)


def load_other():
    other = cached_model(other_source.strip(), *model_choice()[1:])
    if other.causal == handle.causal:
        raise SapError(
            f"'{other.name}' is {'causal' if other.causal else 'a masked-diffusion model'} like the active model; "
            f"pick a model of the other kind (e.g. {default_other})."
        )
    return other


st.subheader("One prompt, side by side")
run_key = (model_choice(), other_source.strip(), id(traj))
if st.button("Run the other model on this prompt", type="primary"):
    bar = st.progress(0.0)
    with job("The other model's run"):
        other = load_other()
        prompt = traj.prompt or traj.final_tokens[: traj.prompt_length].tolist()
        other_traj = queued_generation(other, prompt, traj.spec, AttentionRecorder(), bar, f"{other.name} decoding", unit="steps")
        st.session_state.update(other_trajectory=other_traj, other_trajectory_key=run_key)
    bar.empty()
other_traj = st.session_state.get("other_trajectory") if st.session_state.get("other_trajectory_key") == run_key else None
if other_traj is None:
    st.info(
        f"Press the button to decode the Denoising explorer's prompt with **{Path(other_source).name if app_shared.shared() else other_source}** under the same settings."
    )
else:
    ar_traj, dlm_traj = (other_traj, traj) if other_traj.causal else (traj, other_traj)
    comparison = compare(ar_traj, dlm_traj, spec=spec, labels=("AR", "DLM"))
    ar_report, dlm_report = comparison.reports
    m = st.columns(4)
    m[0].metric("AR: Var(dominant position)", f"{ar_report.aggregate.dominant_var:.1f} tok²")
    m[1].metric("DLM: Var(dominant position)", f"{dlm_report.aggregate.dominant_var:.1f} tok²")
    m[2].metric("AR: distinct dominant positions", len(set(ar_report.dominant.tolist())))
    m[3].metric("DLM: distinct dominant positions", len(set(dlm_report.dominant.tolist())))
    st.plotly_chart(viz.sink_trajectory_pair({"AR": ar_report, "DLM": dlm_report}, view))
    metric = st.selectbox("Per-layer figure", COMPARE_METRICS, format_func=METRIC_TITLES.get, key="ar_metric")
    frame = comparison.frame()
    st.plotly_chart(viz.comparison_bars(frame, ("AR", "DLM"), metric))
    st.dataframe(comparison.readable_frame(), hide_index=True)
    st.download_button(
        "Download comparison (JSON)", json.dumps(comparison.summary(), default=float), "ar_vs_dlm.json", "application/json"
    )

st.subheader("Across prompts")
st.caption(
    "One prompt is an anecdote. Decode N prompts with both models and compare the raw-mass statistics with ±1 "
    "standard-error bars; the difference DLM − AR is paired by prompt. Prompts are windows of the evaluation text, "
    "or your own file (one prompt a line)."
)
d = traj.spec
st.markdown(
    f"**Decoding settings** (the Denoising explorer's last run; change them there): {d.gen_length} tokens generated, "
    f"DLM in {d.steps} steps (blocks of {d.block_length}), the AR model one step per token; temperature "
    f"{d.temperature:g}, seed {d.seed}."
)
c = st.columns(3)  # no form: the estimate below follows every change, and only the button starts the run
n_prompts = c[0].number_input(
    "Prompts",
    2,
    512,
    16,
    help="More prompts, smaller error bars; each costs one generation per model.",
    **kept("ar_n_prompts"),
)
prompt_tokens = c[1].number_input(
    "Prompt length (tokens)",
    1,
    256,
    16,
    help="Tokens of each prompt (a window of the evaluation text); not the generation length, which is the explorer's "
    f"({d.gen_length}). Unused with a prompt file.",
    **kept("ar_prompt_tokens"),
)
upload = c[2].file_uploader("Prompt file (optional)", type=["txt"], help="UTF-8 text, one prompt a line.")
cost = None
if is_cached(other_source.strip(), *model_choice()[1:]):
    with job("The cost estimate"):
        key = (model_choice(), other_source.strip(), int(n_prompts), int(prompt_tokens), d)
        cached = st.session_state.get("sinkstats_cost")
        if cached is None or cached[0] != key:  # two timed passes per model, once per setting
            st.session_state["sinkstats_cost"] = (key, estimate_cost(handle, load_other(), int(n_prompts), int(prompt_tokens), d))
        cost = st.session_state["sinkstats_cost"][1]
if cost is not None:
    st.caption(
        f"Cost: {cost.n_prompts} prompts × ({d.steps} DLM steps + {d.gen_length} AR steps) = {cost.passes} forward passes "
        f"with the attention recorded; about {duration(cost.seconds)} on this device."
    )
else:
    st.caption(
        f"Cost: {int(n_prompts)} prompts × ({d.steps} DLM steps + {d.gen_length} AR steps) = "
        f"{int(n_prompts) * (d.steps + d.gen_length)} forward passes; the time is estimated once the other model "
        "is loaded (the run, or the side-by-side button above, loads it)."
    )
submitted = st.button("Run across prompts", type="primary")
cancel = CancelButton("across_prompts")
cancel.notice("Across-prompts run", "no result was kept and neither model was changed (no weights are touched)")
if submitted:
    cancel.running("Stops the running across-prompts job; nothing is changed.")
    bar = st.progress(0.0, text="Across prompts…")
    with job("The across-prompts run"):
        other = load_other()
        dlm_handle = other if handle.causal else handle
        if upload is not None:
            try:
                text = upload.getvalue().decode("utf-8")
            except UnicodeDecodeError:
                raise SapError("The prompt file is not UTF-8 text; save it as UTF-8, one prompt a line.") from None
            prompts = prompts_from_lines(text, int(n_prompts))
        else:
            prompts = evaluation_prompts(dlm_handle, int(n_prompts), int(prompt_tokens))
        raw = replace(spec, normalize="raw")
        stats = queued_job(
            handle,
            "Across prompts",
            lambda progress: run_sinkstats(handle, other, prompts, traj.spec, raw, progress=progress),
            bar,
            False,
            unit="decoding steps",
        )
        st.session_state.update(sinkstats=stats, sinkstats_model=model_choice())
    bar.empty()
cancel.idle()
stats = st.session_state.get("sinkstats") if st.session_state.get("sinkstats_model") == model_choice() else None
if stats is not None:
    st.caption(
        f"{stats.n_prompts} prompts × 2 models in {stats.seconds:.1f} s · gen length {stats.decode.gen_length}, "
        f"DLM steps {stats.decode.steps} (the AR model takes one step per token) · raw mass."
    )
    st.plotly_chart(viz.sinkstats_figure(stats.summary(), stats.labels))
    st.dataframe(stats.table(), hide_index=True)
    c1, c2 = st.columns(2)
    c1.download_button("Download summary (CSV)", stats.summary().to_csv(index=False), "sinkstats.csv", "text/csv")
    c2.download_button("Download everything (JSON)", json.dumps(stats.to_dict(), indent=1), "sinkstats.json", "application/json")

app_lab.ablation_section(handle, traj, load_other, is_cached(other_source.strip(), *model_choice()[1:]))
