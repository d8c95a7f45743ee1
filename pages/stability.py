"""Sink stability: tune the sink rule and the variance threshold on the stored trajectory."""

from dataclasses import replace

import streamlit as st

import app_shared
from app_common import active_model, detector_choice, report_for, sink_spec, stability_run
from sap_core import viz
from sap_core.animation import export_name, readable_tokens, run_settings
from sap_core.decoding import decoding_words
from sap_core.errors import SapError
from sap_core.sink_report import detector_agreement, provenance, ranked_heads, with_provenance
from sap_core.sinks import RULES, SinkSpec, separating_tau
from sap_core.text import shown_prompt

st.header("Sink stability")
handle = active_model()
traj, which, variant = stability_run(handle)  # the dense run, or the variant's the explorer shows
if traj is None:
    st.info("Run a generation on the **Denoising explorer** page first; this page re-scores its stored attention record.")
    st.page_link("pages/explorer.py", label="Go to the Denoising explorer", icon=":material/animation:")
    st.stop()

d = traj.spec
st.info(
    f"Re-scoring {which} (the stored generation) of the prompt **{shown_prompt(traj.prompt)}**: {d.gen_length} tokens in {d.steps} steps "
    f"({decoding_words(d, handle.causal)}, temperature {d.temperature:g}, seed {d.seed}). "
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


def rescore() -> None:
    """The settings and everything they change. What does not depend on tau (the per-layer figure, the token
    texts) is kept between reruns, so a tau change re-scores in numpy and rebuilds only the labels, the
    per-position figure and the tables. (An ``st.fragment`` here was measured slower: its rerun ended
    about 0.7 s after its last element, against 0.1 s for a whole-page rerun.)"""
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
    detector = detector_choice(st.columns([2, 1, 3]), old.detector)
    try:
        spec = SinkSpec(
            rule=rule,
            k=k,
            alpha=alpha,
            tau=tau,
            epsilon=epsilon,
            detector=detector,
        )
    except SapError as exc:
        st.error(app_shared.shown(exc))
        return
    st.session_state["sink_spec"] = spec
    report = report_for(traj, spec)

    agg = report.aggregate
    m = st.columns(4)
    m[0].metric(
        "Dominant-sink variance",
        f"{agg.dominant_var:.0f} tok²",
        help=f"Variance over the steps of the position that receives the most mass ({agg.dominant_var:.1f} tokens²). "
        "Does not depend on the sliders.",
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
        f"Top-{spec.top_k} mass share",
        f"{agg.top_k_share:.0%}",
        help="Share of the mean attention mass held by the most-attended positions. Does not depend on the sliders.",
    )
    if spec.tau == 0 and (report.labels != "none").any():
        split = separating_tau(report.positions.frequency, report.positions.variance)
        st.info(
            "**Why every sink is unstable here:** at tau = 0 the variance gate opens for every sink (any variance "
            "is ≥ 0), so every position that is a sink at some step counts as unstable and none as stable or "
            "transient; a position that is never a sink stays 'none'. Raise tau to separate the sinks that come "
            "and go (variance ≥ tau: unstable, down-weighted by the gated pruners) from those that stay"
            + (
                f": on this run, tau = {split:.3f} (the median score variance of its sinks) splits them about in half."
                if split is not None
                else "."
            ),
            icon=":material/help:",
        )
        if split is not None:  # the app's tau (Prune's too) changes only when asked: tau = 0 is the official rule
            st.button(
                f"See the stable sinks: tau = {split:.3f}",
                on_click=st.session_state.update,
                kwargs={"sink_tau": split},
                icon=":material/balance:",
                help="Sets the tau slider (and so the app's sink settings used by Prune) to this run's median sink variance.",
            )
    st.caption(
        "Independent of the sliders: the dominant-sink variance, the top-positions mass share and the mean mass "
        "(they come from the mass alone). The sink sets, the centre of the sinks, the labels and the pruner's factors "
        "follow the rule, k, alpha, ε and tau; tau changes only the labels and factors. Moving a slider never runs the "
        "model: the stored record is re-scored in numpy (milliseconds), then the page reruns to redraw, which takes "
        "about as long as any rerun of this app (a few hundred ms; bench/stability_latency.py)."
    )

    layers, bars = _layers(traj, spec)
    st.plotly_chart(bars)
    positions = report.positions_frame()
    positions.insert(2, "token_text", _token_texts(traj, positions["token"]))
    st.plotly_chart(viz.position_stability(positions, tau))

    number = st.column_config.NumberColumn
    with st.expander("Per-position table (label, variance, down-weighting factor, frequency)"):
        st.dataframe(
            positions,
            hide_index=True,
            column_order=[
                "position",
                "token_text",
                "label",
                "variance",
                "weight",
                "frequency",
                "mean_score",
                "mean_mass",
                "decoded_at",
            ],
            column_config={
                "position": number("pos.", format="%d", width="small", pinned=True),
                "token_text": st.column_config.TextColumn(
                    "token", width="small", pinned=True, help="⏎ a newline, ␣ a space (the CSV adds the token id)."
                ),
                "label": st.column_config.TextColumn("label", width="small"),
                "variance": number("score var.", format="%.4f", width="small", help="Variance of the sink score over the steps."),
                "weight": number(
                    "factor",
                    format="%.3f",
                    width="small",
                    help="Gated pruner's factor, 1 − gate · mean sink score (gate: unstable sink): what the gated "
                    "sink-aware pruner multiplies this token's activations by. The official methods use 1 − mean sink "
                    "score for every token.",
                ),
                "frequency": number("sink share", format="%.2f", width="small", help="Share of the steps at which it is a sink."),
                "mean_score": number("mean score", format="%.3f", width="small", help="Mean sink score over the steps."),
                "mean_mass": number(
                    "mean mass",
                    format="%.3f",
                    width="small",
                    help="Mean attention mass received (summed over layers, heads and queries).",
                ),
                "decoded_at": number("decoded at", format="%d", width="small", help="Step it was decoded at; -1: prompt."),
            },
        )
    with st.expander("Per-layer table (variance of the sink positions over the steps)"):
        shown = layers.copy()
        shown["layer"] = ["all layers" if int(v) == -1 else f"layer {int(v)}" for v in shown["layer"]]
        st.dataframe(
            shown,
            hide_index=True,
            column_config={
                "layer": st.column_config.TextColumn(
                    "layer", width="small", pinned=True, help="all layers: summed over the layers"
                ),
                "dominant_var": number(
                    "dominant var.", format="%.2f", width="small", help="Variance of the dominant sink's position (tokens²)."
                ),
                "dominant_var_norm": number("… / L²", format="%.4f", width="small", help="Divided by the squared length."),
                "centroid_var": number(
                    "centre var.", format="%.2f", width="small", help="Variance of the mass-weighted sink centre (tokens²)."
                ),
                "centroid_var_norm": number("… / L²", format="%.4f", width="small", help="Divided by the squared length."),
                "sink_steps": number("sink steps", format="%d", width="small", help="Steps with a sink."),
                "entropy": number("entropy", format="%.3f", width="small", help="Entropy of the mean mass (nats)."),
                "entropy_norm": number("… / ln L", format="%.3f", width="small", help="Entropy / ln(positions)."),
                "top_k_share": number(
                    f"top-{spec.top_k} share", format="%.2f", width="small", help="Mass share of the top positions."
                ),
            },
        )

    with st.expander("Do the detectors agree? Overlap of their sink sets, per layer"):
        st.plotly_chart(_agreement(traj, spec))
        st.caption("Each detector at its default parameter (docs/sinks.md); 1 = the same sinks, 0 = none in common.")

    with st.expander("Which heads hold the sinks? The heads ranked by their sink score"):
        st.dataframe(
            _heads(traj).head(12),
            hide_index=True,
            column_config={"score": st.column_config.NumberColumn(format="%.3f")},
        )
        st.caption(
            "A head's sink score: the most attention one position receives in that head, as the mean over queries and "
            "steps (the per-head detector, docs/sinks.md); position: where that head's sink sits. The 12 strongest "
            "heads of all layers; the explorer's **every head** grid draws them step by step."
        )

    # the downloads say what they are: the run (model, prompt, settings) inside, named after it as the explorer's
    run = provenance(handle, traj, spec, variant)
    c1, c2 = st.columns(2)
    c1.download_button(
        "Download positions (CSV)",
        lambda: with_provenance(positions, run).to_csv(index=False),
        file_name=_file_name("sink-positions", "csv"),
        mime="text/csv",
        on_click="ignore",
        help="One row per position; the columns model, prompt, decoding and sinks say which run and settings.",
    )
    c2.download_button(
        "Download full report (JSON)",
        lambda: report.json_text(run),
        file_name=_file_name("sink-report", "json"),
        mime="application/json",
        on_click="ignore",
        help='The whole report (SinkReport.from_json reads it back), with the run under "run".',
    )


def _file_name(kind: str, ext: str) -> str:
    model = handle.name if variant is None else f"{handle.name}-{variant}"  # a variant's run is named after it
    return export_name(kind, model, traj.prompt, run_settings(traj.spec, handle.causal), ext)


def _layers(traj, spec: SinkSpec):
    """The per-layer frame and its figure, which do not depend on tau: kept for the last (run, settings
    without tau), so a tau change neither rebuilds nor resends a new figure."""
    key = (id(traj), replace(spec, tau=0.0))
    cached = st.session_state.get("_stability_layers")
    if cached is None or cached[0] != key:
        layers = report_for(traj, spec).layers_frame()
        cached = (key, layers, viz.instability_bars(layers))
        st.session_state["_stability_layers"] = cached
    return cached[1], cached[2]


def _agreement(traj, spec: SinkSpec):
    """The detectors' agreement figure, kept for the last (run, official settings)."""
    key = (id(traj), replace(spec, tau=0.0, detector="official"))
    cached = st.session_state.get("_stability_agreement")
    if cached is None or cached[0] != key:
        cached = (key, viz.detector_agreement_figure(detector_agreement(traj, key[1])))
        st.session_state["_stability_agreement"] = cached
    return cached[1]


def _heads(traj):
    """The heads ranked by their sink score (sink_report.ranked_heads), kept for the last run: no tau or rule in it."""
    cached = st.session_state.get("_stability_heads")
    if cached is None or cached[0] != id(traj):
        cached = (id(traj), ranked_heads(traj))
        st.session_state["_stability_heads"] = cached
    return cached[1]


def _token_texts(traj, ids) -> list[str]:
    """Readable token texts (⏎ newline, ␣ space) of the run, decoded once per run."""
    cached = st.session_state.get("_stability_tokens")
    if cached is None or cached[0] != id(traj):
        cached = (id(traj), readable_tokens(handle.decode, ids))
        st.session_state["_stability_tokens"] = cached
    return cached[1]


rescore()
