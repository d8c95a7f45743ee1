"""Sink stability: tune the sink rule and the variance threshold on the stored trajectory."""
import json
import tempfile
from pathlib import Path

import streamlit as st

from app_common import active_model, ar_model, cached_model, current_trajectory, job, model_choice, progress_callback, report_for, sink_spec
from sap_core import viz
from sap_core.attention import AttentionRecorder
from sap_core.diffusion import generate
from sap_core.errors import SapError
from sap_core.sinks import RULES, SinkSpec, compare

st.header("Sink stability")
handle = active_model()
traj = current_trajectory(handle)
if traj is None:
    st.info("Run a generation on the **Denoising explorer** page first; this page re-scores its stored attention record.")
    st.stop()

old = sink_spec()
c = st.columns(5)
rule = c[0].selectbox("Rule", RULES, index=RULES.index(old.rule),
                      help="official: soft score sigmoid(alpha·(m − (mean + k·std))); leave_one_out: hard rule of the paper's figure.")
k = c[1].slider("k (std multiples)", 0.0, 6.0, float(old.k), 0.1, help="A position is a sink when its mass exceeds mean + k·std of its step.")
alpha = c[2].slider("alpha (sharpness)", 0.1, 20.0, float(old.alpha), 0.1, help="Steepness of the soft sink score.")
tau = c[3].slider("tau (variance threshold)", 0.0, 0.25, float(old.tau), 0.005, format="%.3f",
                  help="A sink whose score variance over the steps is ≥ tau is unstable and gets down-weighted by the pruner. 0 = every sink counts (the official behaviour).")
epsilon = c[4].slider("ε (leave-one-out margin)", 0.0, 5.0, float(old.epsilon), 0.1, help="Margin in units of the uniform mass; only for the leave_one_out rule.")
try:
    spec = SinkSpec(rule=rule, k=k, alpha=alpha, tau=tau, epsilon=epsilon)
except SapError as exc:
    st.error(str(exc))
    st.stop()
st.session_state["sink_spec"] = spec
report = report_for(traj, spec)

agg = report.aggregate
m = st.columns(4)
m[0].metric("Var(dominant position)", f"{agg.dominant_var:.1f} tok²")
m[1].metric("Unstable sinks", int((report.labels == "unstable").sum()))
m[2].metric("Stable sinks", int((report.labels == "stable").sum()))
m[3].metric("Top-k mass share", f"{agg.top_k_share:.2f}")
st.plotly_chart(viz.instability_bars(report.layers_frame()))
positions = report.positions_frame()
st.plotly_chart(viz.position_stability(positions, tau))
with st.expander("Per-position table (frequency, variance, label, down-weighting factor)"):
    st.dataframe(positions, hide_index=True)

c1, c2 = st.columns(2)
c1.download_button("Download positions (CSV)", positions.to_csv(index=False), "sink_positions.csv", "text/csv")
with tempfile.TemporaryDirectory() as tmp:
    report.to_json(Path(tmp) / "report.json")
    c2.download_button("Download full report (JSON)", (Path(tmp) / "report.json").read_text(), "sink_report.json", "application/json")
