"""Prune: make pruned variants of the dense model (which stays unchanged) and keep them in this session."""

import re
from pathlib import Path

import streamlit as st

import app_lab
import app_shared
from app_common import (
    CancelButton,
    active_model,
    calibration_control,
    context_of,
    job,
    kept,
    model_choice,
    queued_job,
    sink_spec,
)
from sap_core import viz
from sap_core.animation import readable_tokens
from sap_core.pruning import METHODS, PruneSpec, numbered, prune
from sap_core.pruning.spec import METHOD_ROWS, PATTERNS, STRUCTURED
from sap_core.pruning.structured import StructuredVariant

st.header("Prune")
handle = active_model()
app_shared.heavy_jobs_or_stop("Pruning")
variants = st.session_state.setdefault("variants", [])

spec_sink = sink_spec()
st.caption(
    f"Sink settings from the Sink stability page (defaults until you change them there): rule **{spec_sink.rule}**, "
    f"k = {spec_sink.k:g}, alpha = {spec_sink.alpha:g}, tau = {spec_sink.tau:g} (used by the sink-aware and gated methods)."
)
names = list(METHODS)
method = st.selectbox(
    "Method", names, index=names.index("sink_wanda"), help="Changing it shows what the method does below.", **kept("prune_method")
)
st.markdown(f":material/info: **{method}**: {METHODS[method]}  \n{METHOD_ROWS[method].traits}")
with st.form("prune", enter_to_submit=False):  # Enter in a box never starts a prune: only the button does
    c = st.columns(3)
    structured = method in STRUCTURED
    if structured:  # whole channels and heads go: a pattern of single weights does not apply
        pattern = "unstructured"
        c[0].markdown(
            "**Pattern**  \nstructured: whole MLP channels (and attention heads, below)",
            help="A structured method removes whole MLP channels (and attention heads, below): no N:M pattern.",
        )
    else:
        pattern = c[0].selectbox(
            "Pattern",
            list(PATTERNS),
            **kept("prune_pattern"),
            help="N:M keeps N of every M consecutive weights of a row (fixes the sparsity at 1 − N/M).",
        )
    sparsity = c[1].slider(
        "Sparsity",
        0.05,  # not 0: a 0% variant is the dense model itself, which Compare always shows as "dense"
        0.95,
        0.5,
        0.05,
        help=(
            "Share of each block's MLP channels removed."
            if structured
            else "Share of each row's weights set to zero (unstructured only)."
        )
        + " It starts at 0.05: a 0% variant would be the dense model itself, which the Compare page always includes as “dense”.",
        **kept("prune_sparsity"),
    )
    c = st.columns(3)
    calibration = calibration_control(
        c,
        handle,
        "prune",
        "Windows of the calibration text (sap_core/assets/text/calibration.txt); not used by magnitude.",
        f"Tokens per window; at most the model's context ({context_of(handle)} tokens), the longest input it takes.",
    )
    heads, bias_compensation = 0.0, False
    if structured:  # sparsity is then the share of each block's MLP channels removed
        c = st.columns(3)
        heads = c[0].number_input(
            "Heads removed",
            0.0,
            0.95,
            0.0,
            0.05,
            help="Fraction of each block's attention heads removed (0: MLP channels only). Only the project's LLaDA "
            "class loads a head-pruned model (the official one derives the head size from d_model // n_heads); "
            "refused, with a one-line reason, for GQA models and Dream.",
            **kept("prune_heads"),
        )
        if METHOD_ROWS[method].statistic.compensates:
            bias_compensation = c[1].checkbox(
                "Bias compensation",
                help="FLAP's: adds the removed channels' mean contribution to the output projection's bias "
                "(models whose output projections have a bias only).",
                **kept("prune_bias_compensation"),
            )
    submitted = st.form_submit_button("Prune", type="primary")


cancel = CancelButton("prune", handle)
cancel.notice("Pruning", "no variant was made")
mine = [v for v in variants if v["model"] == model_choice()]
if submitted:
    spec = PruneSpec(
        method,
        float(sparsity),
        pattern,
        sink=spec_sink,
        calibration=calibration,
        heads=float(heads),
        bias_compensation=bool(bias_compensation),
    )
    same = next((v for v in mine if v["variant"].spec == spec), None)  # one variant per spec: pruning is deterministic
    if same is not None:
        submitted = False
        st.info(f"**{same['name']}** has exactly these settings already; pruning again would make the same variant.")
        st.button(  # a callback: the rerun of the click draws no form result, so the button's value would be lost
            f"Show {same['name']}",
            icon=":material/visibility:",
            key="prune_show_same",
            on_click=st.session_state.update,
            kwargs={"prune_open": same["name"]},
        )
if submitted:
    cancel.running("Stops the running pruning job; the dense model is never touched.")
    bar = st.progress(0.0, text="Pruning…")
    with job("Pruning"):
        app_shared.check_caps(calibration_samples=calibration.nsamples)
        with app_shared.room_for(spec, handle):  # the server's memory budget, held before anything is allocated
            variant = queued_job(
                handle, f"Pruning {spec.label}", lambda progress: prune(handle, spec, progress=progress), bar, cancel=False
            )
            name = numbered(spec.label, [v["name"] for v in variants if v["model"] == model_choice()])
            variant = app_shared.keep_variant({"name": name, "variant": variant, "model": model_choice()}, handle)["variant"]
        st.session_state["prune_open"] = name
        st.success(f"Made **{name}** in {variant.seconds:.1f} s ({variant.removed_summary(handle)}).")
    bar.empty()
cancel.idle()

USED = {
    "official": "this variant used the **official rule** row (every token by its score)",
    "gated": "this variant used the **gated** row (only the unstable sinks)",
    "none": "this variant weighted every token 1 (a control: neither row)",
}


def factor_strip(name: str, variant) -> None:
    """What the pruner down-weighted: one calibration window's tokens coloured by their factor, official rule
    against gated at the variant's tau (from the run's calibration record: no extra model pass)."""
    record = variant.calibration
    if record is None or record.record is None:
        st.caption(
            f"No token was down-weighted: {variant.spec.method} weighs every calibration token alike. The sink-aware "
            "methods (sink_wanda, gated_sink_wanda, …) are the ones that down-weight sink tokens."
        )
        return
    n = record.ids.shape[0]
    window = 0
    if n > 1:
        window = int(
            st.number_input(
                "Calibration window shown", 0, n - 1, 0, key=f"win_{name}", help=f"One of the {n} calibration windows."
            )
        )
    tokens = readable_tokens(handle.decode, record.ids[window])
    st.plotly_chart(viz.factor_strip(tokens, record.window_factors(window), variant.spec.sink.tau, window), key=f"fs_{name}")
    st.caption(
        f"Dark tokens had their layer inputs scaled down before the weights were scored; {USED[variant.spec.row.factors]}. "
        "Hover a token for its position, sink score and both factors."
    )


app_lab.load_control(handle)  # a variant saved before (not in shared mode: the explorer lists the server's saves)
mine = [v for v in variants if v["model"] == model_choice()]
opened = st.session_state.get("prune_open")
opened = opened if opened in [v["name"] for v in mine] else (mine[-1]["name"] if mine else None)
if not mine:
    st.info("No variants yet in this session. Choose a method and press **Prune**.")
else:
    st.subheader(f"Variants of {handle.name} made in this session ({len(mine)})")
for entry in mine:
    variant = entry["variant"]
    with st.expander(
        f"{entry['name']} · {variant.removed_summary(handle)} · {variant.seconds:.1f} s",
        expanded=entry["name"] == opened,
    ):
        st.table(variant.settings_table())
        structured = isinstance(variant, StructuredVariant)
        st.plotly_chart(viz.sparsity_heatmap(variant.layer_sparsity, removed=structured), key=f"sp_{entry['name']}")
        factor_strip(entry["name"], variant)
        c1, c2 = st.columns([3, 1])
        app_shared.drop_button(entry, c2)
        if app_shared.shared():  # no path asked or shown: saved under --runs with a name the server makes
            app_shared.save_shared(entry, handle, c1)
            continue
        target = c1.text_input(
            "Save to directory",
            "runs/" + re.sub(r"[^\w.-]+", "_", entry["name"]).strip("_"),
            key=f"dir_{entry['name']}",
            help="A new or empty directory, or a variant saved before (replaced only with the box below "
            "ticked). Never the loaded model's own directory.",
        )
        if target.strip():
            c1.caption(f"Writes to `{Path(target.strip()).expanduser().resolve()}`")
        overwrite = c1.checkbox(
            "Replace the variant already saved there",
            key=f"overwrite_{entry['name']}",
            help="Without this, saving into a directory that holds a variant is refused.",
        )
        if c2.button("Save", key=f"save_{entry['name']}", icon=":material/save:"):
            with job("Saving"):
                path = variant.save(target.strip(), handle, overwrite=overwrite)
                st.success(f"Saved to {path}; load it in the sidebar as a local directory.")
