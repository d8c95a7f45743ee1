"""Pick tau: the variance the pruner's gate compares with tau, on the calibration windows, and which tau prunes best."""

from dataclasses import replace

import streamlit as st

import app_shared
from app_common import (
    CancelButton,
    active_model,
    calibration_control,
    context_of,
    current_trajectory,
    eval_spec,
    job,
    kept,
    model_choice,
    queued_job,
    report_for,
    sink_spec,
)
from sap_core import viz
from sap_core.animation import readable_tokens
from sap_core.pruning.spec import GATED, PATTERNS
from sap_core.sink_report import rule_words
from sap_core.sinks import parse_taus
from sap_core.sweep import run_sweep
from sap_core.tau import (
    best_tau_sentences,
    best_taus,
    calibration_gate,
    reference_bands,
    tau_sweep_spec,
    tau_table,
    trajectory_gate_inputs,
)

st.header("Pick tau")
handle = active_model()
app_shared.heavy_jobs_or_stop("Picking tau (it prunes at every tau)")
spec = sink_spec()
st.caption(
    f"The gated methods down-weight a calibration token only when it is a sink at some noised timestep and its "
    f"sink-score variance v_j over those timesteps is ≥ tau (tau = 0: every sink, never a non-sink; the official "
    f"rule, sink_wanda / sink_sparsegpt, down-weights every token and has no gate). Sink rule from "
    f"the Sink stability page: **{rule_words(spec)}** (it also finds each layer's own sinks below)."
)

with st.form("gate_form"):
    c = st.columns(4)
    calibration = calibration_control(
        c,
        handle,
        "tau",
        "Windows of the calibration text, as on the Prune page.",
        f"Tokens per window; at most the model's context ({context_of(handle)} tokens).",
    )
    c[3].write("")
    compute = c[3].form_submit_button(
        "Compute the gate's inputs",
        type="primary",
        help="One recorded pass over the noised calibration windows; moving tau afterwards costs nothing.",
    )
key = (model_choice(), calibration, replace(spec, tau=0.0))
if compute:
    bar = st.progress(0.0)
    with job("The calibration passes"):
        gate = queued_job(handle, "Calibration", lambda progress: calibration_gate(handle, calibration, spec, progress), bar)
        st.session_state["tau_gate"] = (key, gate)
    bar.empty()
stored = st.session_state.get("tau_gate")
gate = stored[1] if stored is not None and stored[0] == key else None

tau = st.slider(
    "tau (variance threshold)",
    0.0,
    0.25,
    float(spec.tau),
    0.001,
    format="%.3f",
    key="tau_pick",
    help="Moving it re-scores the stored variances; nothing runs the model.",
)
if gate is None:
    st.info("Press **Compute the gate's inputs** to see what the pruner gates for these calibration settings.")
else:
    traj = current_trajectory(handle)
    traj_gate = trajectory_gate_inputs(report_for(traj, spec)) if traj is not None else None
    m = st.columns(3)
    m[0].metric("Sink positions in the calibration windows", int(gate.is_sink.sum()))
    m[1].metric("Gated at this tau", f"{gate.gated_share(tau):.0%}")
    m[2].metric("Windows × noised timesteps", f"{gate.ids.shape[0]} × {len(calibration.timesteps)}")
    left, right = st.columns(2)
    left.plotly_chart(viz.tau_variance_figure((gate.frequency, gate.variance), tau, traj_gate))
    right.plotly_chart(viz.tau_layer_figure(gate.layer_shares(tau), tau))
    right.caption(
        "The gate reads the score of the mass summed over the selected layers: a position that is a sink of one layer "
        "but not of the sum is never gated, so a layer's share can stay below 100 % even at tau = 0."
    )
    if traj is None:
        st.caption("Generate on the **Denoising explorer** page to draw the current generation's variances beside these.")
    st.markdown("**Tokens most often gated** (sink positions of the calibration windows down-weighted at this tau)")
    st.dataframe(
        gate.top_tokens(tau, lambda ids: readable_tokens(handle.decode, ids)[0]),
        hide_index=True,
        column_config={"text": st.column_config.TextColumn("text", help="⏎ a newline, ␣ a space.")},
    )
    if st.button(f"Use tau = {tau:g} for pruning", help="Sets the tau of the app's sink settings (Prune and Compare pages)."):
        st.session_state["sink_spec"] = replace(spec, tau=float(tau))
        st.success(f"tau = {tau:g} is now the app's sink setting.")

st.subheader("Which tau?")
st.caption(
    "Prunes with each gated method at every tau, with its ungated twin (sink_wanda, sink_sparsegpt: the official rule, "
    "no gate) and with wanda and noised_wanda, at one sparsity, and scores each by masked-diffusion perplexity on the "
    "same windows and masks; errors are paired against the official twin. Calibration: the settings above. "
    f"Evaluation windows: {eval_spec().nsamples} by default, as on Compare."
)
with st.form("which_tau"):
    c = st.columns(4)
    methods = c[0].multiselect("Gated methods", sorted(GATED), default=["gated_sink_wanda"], **kept("tau_methods"))
    pattern = c[1].selectbox("Pattern", list(PATTERNS), **kept("tau_pattern"))
    sparsity = c[2].slider(
        "Sparsity", 0.1, 0.9, 0.5, 0.05, help="Unstructured only; N:M fixes it at 1 − N/M.", **kept("tau_sparsity")
    )
    default_windows = eval_spec().nsamples
    windows = c[3].number_input(
        "Evaluation windows",
        1,
        256,
        default_windows,
        help=f"Windows of 64 tokens, 4 masking draws each; default {default_windows}, the same as Compare's perplexity "
        "(fewer: a quicker, noisier sweep).",
        **kept("tau_windows"),
    )
    taus = st.text_input(
        "Taus", "0, 0.01, 0.02, 0.05, 0.1", help="Comma-separated; 0 gates every sink and no non-sink.", **kept("tau_taus")
    )
    run = st.form_submit_button("Run the tau sweep", type="primary")


cancel = CancelButton("tau_sweep", handle)
cancel.notice("Tau sweep", "no result was kept")
if run:
    cancel.running("Stops the running tau sweep; the dense model is restored.")
    bar = st.progress(0.0)
    with job("The tau sweep"):
        sweep_spec = tau_sweep_spec(
            methods, sparsity, pattern, parse_taus(taus), spec, calibration, eval_spec(seqlen=64, nsamples=int(windows), draws=4)
        )
        df = queued_job(handle, "Tau sweep", lambda progress: run_sweep(handle, sweep_spec, progress=progress), bar, False)
        st.session_state["tau_sweep"] = (model_choice(), df, float(sparsity), pattern)
    bar.empty()
cancel.idle()
result = st.session_state.get("tau_sweep")
if result is not None and result[0] == model_choice():
    _, df, sp, pat = result
    table = tau_table(df, sp, pat)
    best = best_taus(table, df)
    st.caption(
        f"From the last completed tau sweep: {int((df['method'] != 'dense').sum())} pruned models at {pat}"
        + (f", sparsity {sp:g}" if pat == "unstructured" else "")
        + (" (the run started since was cancelled)." if cancel.cancelled else ".")
    )
    st.plotly_chart(viz.tau_sweep_figure(table, best, reference_bands(table, df)))
    for sentence in best_tau_sentences(best):
        st.markdown(sentence)
    number = st.column_config.NumberColumn
    st.dataframe(
        table.drop(columns=["label"]),
        hide_index=True,
        column_config={
            "tau": number("tau", format="%g", width="small"),
            "ppl": number("perplexity", format="%.2f", width="small"),
            "ppl_se": number("± SE", format="%.2f", width="small", help="The row's own standard error (unpaired)."),
            "nll": number("NLL", format="%.4f", width="small"),
            "nll_se": number("NLL ± SE", format="%.4f", width="small"),
            "delta_nll": number("Δ NLL vs official", format="%+.4f", help="Against the ungated twin (nats/token)."),
            "se_paired": number("paired SE", format="%.4f", width="small"),
            "z": number("z", format="%+.1f", width="small", help="Δ / paired SE; below −2: beyond the noise."),
        },
    )
    st.download_button("Download tau sweep (CSV)", df.to_csv(index=False), "tau_sweep.csv", "text/csv")
