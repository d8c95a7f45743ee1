"""Sink stability: tune the sink rule and the variance threshold on the stored trajectory."""

import tempfile
from pathlib import Path

import streamlit as st

from app_common import active_model, current_trajectory, report_for, sink_spec, token_texts
from sap_core import viz
from sap_core.errors import SapError
from sap_core.sinks import RULES, SinkSpec

st.header("Sink stability")
handle = active_model()
traj = current_trajectory(handle)
if traj is None:
    st.info("Run a generation on the **Denoising explorer** page first; this page re-scores its stored attention record.")
    st.page_link("pages/explorer.py", label="Go to the Denoising explorer", icon=":material/animation:")
    st.stop()

d = traj.spec
shown_prompt = traj.prompt if len(traj.prompt) <= 60 else traj.prompt[:57] + "…"
st.info(
    f"Re-scoring the stored generation of the prompt **{shown_prompt!r}**: {d.gen_length} tokens in {d.steps} steps "
    f"(blocks of {d.block_length}, {d.remasking}, temperature {d.temperature:g}, seed {d.seed}). "
    "Moving the sliders never runs the model; generate again on the Denoising explorer to study another run.",
    icon=":material/history:",
)
with st.expander("What the labels mean", expanded=False):
    st.markdown(
        "A position's **sink score** at a step says how far its attention mass stands above the others "
        "(official rule: sigmoid(alpha·(mass − (mean + k·std))); a score above 0.5 makes it a sink at that step). "
        "Over the steps at which the position exists:\n"
        "- **none**: never a sink;\n"
        "- **transient**: a sink at some steps but fewer than half of them, with a score variance below tau;\n"
        "- **stable**: a sink at half of the steps or more, with a score variance below tau (it stays put);\n"
        "- **unstable**: a sink at some step with a score variance of tau or more (it comes and goes). "
        "The gated pruning methods down-weight only these; tau = 0 makes every sink unstable (never a non-sink). "
        "The official methods (sink_wanda, sink_sparsegpt) have no gate: they down-weight every position by its score."
    )

old = sink_spec()
# Widget keys seeded from the app's sink settings: they survive a visit to another page (Streamlit drops
# the state of widgets a page did not draw) because sink_spec() keeps the last settings.
for key, value in (
    ("sink_rule", old.rule),
    ("sink_k", float(old.k)),
    ("sink_alpha", float(old.alpha)),
    ("sink_tau", float(old.tau)),
    ("sink_epsilon", float(old.epsilon)),
):
    st.session_state.setdefault(key, value)
c = st.columns(5)
rule = c[0].selectbox(
    "Rule",
    RULES,
    key="sink_rule",
    help="official: soft score sigmoid(alpha·(mass − (mean + k·std))); leave_one_out: the paper figure's "
    "hard rule, mass above the mean of the other positions + ε.",
)
official = rule == "official"
k = c[1].slider(
    "k (std multiples)",
    0.0,
    6.0,
    step=0.1,
    key="sink_k",
    disabled=not official,
    help="Official rule: a position is a sink when its mass exceeds mean + k·std of its step.",
)
alpha = c[2].slider(
    "alpha (sharpness)",
    0.1,
    20.0,
    step=0.1,
    key="sink_alpha",
    disabled=not official,
    help="Official rule: steepness of the soft sink score.",
)
tau = c[3].slider(
    "tau (variance threshold)",
    0.0,
    0.25,
    step=0.005,
    format="%.3f",
    key="sink_tau",
    help="A sink whose score variance over the steps is ≥ tau is unstable and gets down-weighted by the gated "
    "pruning methods. 0 = every sink counts; a position that is never a sink is never gated.",
)
epsilon = c[4].slider(
    "ε (leave-one-out margin)",
    0.0,
    5.0,
    step=0.1,
    key="sink_epsilon",
    disabled=official,
    help="Only for the leave_one_out rule: margin in units of the step's uniform mass.",
)
try:
    spec = SinkSpec(rule=rule, k=k, alpha=alpha, tau=tau, epsilon=epsilon)
except SapError as exc:
    st.error(str(exc))
    st.stop()
st.session_state["sink_spec"] = spec
report = report_for(traj, spec)

agg = report.aggregate
m = st.columns(4)
m[0].metric(
    "Dominant-sink position variance",
    f"{agg.dominant_var:.1f} tokens²",
    help="Variance over the steps of the position that receives the most mass. Does not depend on the sliders.",
)
m[1].metric(
    "Unstable sinks",
    int((report.labels == "unstable").sum()),
    help="Positions labelled unstable (depends on k, alpha, ε and tau).",
)
m[2].metric(
    "Stable sinks", int((report.labels == "stable").sum()), help="Positions labelled stable (depends on k, alpha, ε and tau)."
)
m[3].metric(
    f"Mass share of the top {spec.top_k} positions",
    f"{agg.top_k_share:.0%}",
    help="Share of the mean attention mass held by the most-attended positions. Does not depend on the sliders.",
)
st.caption(
    "Independent of the sliders: the dominant-sink variance, the top-positions mass share and the mean mass "
    "(they come from the mass alone). The sink sets, the centre of the sinks, the labels and the pruner's factors "
    "follow the rule, k, alpha, ε and tau."
)

layers = report.layers_frame()
st.plotly_chart(viz.instability_bars(layers))
positions = report.positions_frame()
positions.insert(2, "token_text", token_texts(handle, positions["token"]))
st.plotly_chart(viz.position_stability(positions, tau))

number = st.column_config.NumberColumn
with st.expander("Per-position table (frequency, variance, label, down-weighting factor)"):
    st.dataframe(
        positions,
        hide_index=True,
        column_config={
            "position": number("position", format="%d"),
            "token": number("token id", format="%d"),
            "token_text": st.column_config.TextColumn("token"),
            "is_prompt": st.column_config.CheckboxColumn("prompt"),
            "decoded_at": number("decoded at step", format="%d", help="-1: part of the prompt"),
            "valid_steps": number("steps present", format="%d"),
            "mean_mass": number(
                "mean mass", format="%.3f", help="Mean attention mass received (summed over layers, heads and queries)."
            ),
            "frequency": number("share of steps as a sink", format="%.2f"),
            "mean_score": number("mean sink score", format="%.3f"),
            "variance": number("sink-score variance", format="%.4f"),
            "label": st.column_config.TextColumn("label"),
            "weight": number(
                "gated pruner's factor",
                format="%.3f",
                help="1 − gate · mean sink score (gate: unstable sink): what the gated sink-aware pruner multiplies this "
                "token's activations by. The official methods use 1 − mean sink score for every token.",
            ),
        },
    )
with st.expander("Per-layer table (variance of the sink positions over the steps)"):
    st.dataframe(
        layers,
        hide_index=True,
        column_config={
            "layer": number("layer", format="%d", help="-1: all layers together"),
            "dominant_var": number("dominant-sink variance (tokens²)", format="%.2f"),
            "dominant_var_norm": number("dominant-sink variance / L²", format="%.4f"),
            "centroid_var": number("sink-centre variance (tokens²)", format="%.2f"),
            "centroid_var_norm": number("sink-centre variance / L²", format="%.4f"),
            "sink_steps": number("steps with a sink", format="%d"),
            "entropy": number("entropy of the mean mass (nats)", format="%.3f"),
            "entropy_norm": number("entropy / ln(positions)", format="%.3f"),
            "top_k_share": number(f"mass share of the top {spec.top_k}", format="%.2f"),
        },
    )

c1, c2 = st.columns(2)
c1.download_button("Download positions (CSV)", positions.to_csv(index=False), "sink_positions.csv", "text/csv")
with tempfile.TemporaryDirectory() as tmp:
    report.to_json(Path(tmp) / "report.json")
    c2.download_button(
        "Download full report (JSON)", (Path(tmp) / "report.json").read_text(), "sink_report.json", "application/json"
    )
