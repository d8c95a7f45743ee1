"""The sink lab in the app (issue 30): the explorer's detector, its sink ablation and its variant side by side
with the dense run. The logic is the core's (:mod:`sap_core.ablation`, :mod:`sap_core.sink_shift`,
:mod:`sap_core.animation`); these functions draw its controls and keep its results in the session."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import streamlit as st

import app_shared
from app_common import (
    STABILITY_RUN,
    CancelButton,
    detector_choice,
    duration,
    eval_spec,
    job,
    kept,
    model_choice,
    queued_generation,
    queued_job,
    report_for,
    sink_spec,
)
from sap_core.ablation import SinkAblation, ablated
from sap_core.ablation_stats import MODELS, ablation_side_by_side, estimate_side_by_side
from sap_core.animation import SecondRun, readable_tokens
from sap_core.attention import AttentionRecorder
from sap_core.diffusion import generate
from sap_core.errors import SapError
from sap_core.lmeval.model import load_variant
from sap_core.pruning import numbered
from sap_core.pruning.variant import is_variant_dir
from sap_core.sink_shift import FREE_RUNNING, MODES, REPLAYED, SinkShift, sink_shift
from sap_core.sinks import SinkSpec
from sap_core.text import shown_prompt

ALONE, VARIANT, SIDE_BY_SIDE = "dense", "variant", "side by side"
SHOWN = {
    ALONE: "The run above",
    VARIANT: "The variant alone",
    SIDE_BY_SIDE: "Side by side with dense",
}


def explorer_sink_spec(cols) -> SinkSpec:
    """The app's sink settings with the detector chosen in ``cols`` (the Sink stability page's control); kept as the
    app's one sink rule (:func:`app_common.sink_spec`), so both pages mark the same sinks."""
    try:
        spec = replace(sink_spec(), detector=detector_choice(cols, sink_spec().detector))
    except SapError as exc:  # an out-of-range ε: its one line, and the marks keep the rule they had
        st.error(str(exc))
        return sink_spec()
    st.session_state["sink_spec"] = spec
    return spec


def ablation_choice(cols, handle) -> SinkAblation | None:
    """The "Ablate sinks" toggle (``cols[0]``) and its layers (``cols[1]``; none chosen: every layer), in the
    explorer's form; None when off. The sinks are found by the app's sink rule."""
    on = cols[0].toggle(
        "Ablate sinks",
        key="ablate_sinks",
        help="At every denoising step, find each chosen layer's sinks (the detector below) within the layer's own pass "
        "and remove them as keys (attention renormalised over the rest). Costs at most about 2× a plain generation.",
    )
    layers = cols[1].multiselect(
        "Ablated layers",
        list(range(handle.n_layers)),
        key="ablate_layers",
        placeholder="all layers",
        help="The layers whose sinks are removed; none chosen: every layer.",
    )
    return SinkAblation(tuple(layers) or None, sink_spec()) if on else None


def ablation_words(ablation: SinkAblation) -> str:
    """How a run's label says it was ablated: "sinks ablated (all layers)"."""
    layers = "all layers" if ablation.layers is None else "layers " + ",".join(map(str, ablation.layers))
    return f"sinks ablated ({layers}, {ablation.sink.detector})"


def generation(handle, prompt, spec, ablation: SinkAblation | None, bar):
    """The explorer's generation: through the model's queue, batched with the other sessions' (plain), or as one
    job with the sinks removed (:func:`sap_core.ablation.ablated`)."""
    if ablation is None:
        return queued_generation(handle, prompt, spec, AttentionRecorder(), bar, unit="steps")
    subject = ablated(handle, ablation)  # layers the model lacks: one line before any work
    return queued_job(
        handle,
        "Generation, sinks ablated",
        lambda progress: generate(subject, prompt, spec, recorder=AttentionRecorder(), progress=progress),
        bar,
        unit="steps",
    )


@dataclass(frozen=True)
class VariantChoice:
    """What the explorer shows of a variant: its ``name``, the comparison ``mode`` and ``shown`` (:data:`SHOWN`)."""

    name: str
    mode: str
    shown: str


def saved_variant_dirs() -> list[Path]:
    """The saved variant directories the explorer's selector offers: in shared mode this session's server-named saves
    under ``--runs`` (:meth:`~sap_core.serving.ServerSettings.saved_variant_dir`); otherwise none (the Prune page's
    :func:`load_control` reads a typed directory)."""
    s = app_shared.settings()
    if not s.shared or s.runs_dir is None:
        return []
    sid = st.session_state.get("sid")
    return [p for p in s.saved_variant_dirs(sid) if is_variant_dir(p)] if sid else []  # this session's saves only


def load_saved(handle, directory) -> dict:
    """Load the saved variant ``directory`` of the active model (:func:`sap_core.lmeval.model.load_variant`: a variant
    of another model is refused in one line) into this session's variants, as the Prune page keeps a pruned one; a
    directory loaded before is not loaded twice."""
    variants = st.session_state.setdefault("variants", [])
    path = str(Path(directory).expanduser().resolve())
    same = next((v for v in variants if v.get("loaded_from") == path and v["model"] == model_choice()), None)
    if same is not None:
        return same
    variant = load_variant(handle, path)
    name = numbered(f"{variant.label} ({Path(path).name})", [v["name"] for v in variants if v["model"] == model_choice()])
    return app_shared.keep_variant({"name": name, "variant": variant, "model": model_choice(), "loaded_from": path}, handle)


def load_control(handle) -> None:
    """The Prune page's "Load a saved variant (directory)" box (not in shared mode: the explorer lists the server's saves)."""
    if app_shared.shared():
        return
    c1, c2 = st.columns([4, 1], vertical_alignment="bottom")
    target = c1.text_input(
        "Load a saved variant (directory)",
        key="load_variant_dir",
        help="A directory saved by **Save** below or 'prune --save' from this model; it joins this session's variants.",
    )
    if c2.button("Load", key="load_variant", icon=":material/upload:", disabled=not target.strip()):
        try:
            entry = load_saved(handle, target.strip())
        except SapError as exc:
            st.error(app_shared.shown(exc))
        else:
            st.success(f"Loaded **{entry['name']}**; the Denoising explorer's **Variant** selector offers it.")


def variant_choice(traj, handle) -> VariantChoice | None:
    """The variant selector (the session's variants of this model, pages/prune.py, and in shared mode the saved ones
    under ``--runs``): which variant, the view (alone or side by side) and the comparison mode. None: the run alone.
    The choice also says which run the Sink stability page re-scores (:func:`keep_stability_run`)."""
    st.session_state.pop(STABILITY_RUN, None)  # the dense run unless a variant is shown below
    names = [v["name"] for v in st.session_state.get("variants", []) if v["model"] == model_choice()]
    loaded = {v.get("loaded_from") for v in st.session_state.get("variants", []) if v["model"] == model_choice()}
    saved = [str(p) for p in saved_variant_dirs() if str(p) not in loaded]
    if not names and not saved:
        return None
    if st.session_state.get("trajectory_ablation"):
        st.caption("The variants compare with a plain dense run: generate without **Ablate sinks** to see them side by side.")
        return None
    c = st.columns([2, 2, 3])
    name = c[0].selectbox(
        "Variant",
        [None, *names, *saved],
        format_func=lambda n: "none (the dense run)" if n is None else n if n in names else f"saved: {Path(n).name}",
        key="lab_variant",
    )
    if name is None:
        return None
    if name in saved:  # a server-named save: loaded once into this session's variants
        try:
            name = load_saved(handle, name)["name"]
        except SapError as exc:
            st.error(app_shared.shown(exc))
            return None
    shown = c[1].radio("Show", [SIDE_BY_SIDE, VARIANT], format_func=SHOWN.get, key="lab_shown")
    mode = c[2].radio(
        "Comparison",
        list(MODES),
        format_func=lambda m: (
            "Replayed (the variant on the dense run's inputs)" if m == REPLAYED else "Free-running (each decodes itself)"
        ),
        key="lab_mode",
        help=f"{MODES[REPLAYED]}. {MODES[FREE_RUNNING]}. Either costs about one generation ({traj.n_steps} steps).",
    )
    return VariantChoice(name, mode, shown)


def variant_shift(handle, traj, choice: VariantChoice, spec: SinkSpec, bar) -> SinkShift:
    """The variant against the dense run ``traj`` (:func:`sap_core.sink_shift.sink_shift`), kept for the last
    (run, variant, mode, sink settings): a slider or a colour change never runs the model again."""
    key = (id(traj), choice.name, choice.mode, spec)
    kept = st.session_state.get("lab_shift")
    if kept is None or kept[0] != key:
        variant = next(
            v["variant"] for v in st.session_state["variants"] if v["name"] == choice.name and v["model"] == model_choice()
        )
        work = lambda progress: sink_shift(  # noqa: E731
            handle, variant, traj.prompt, traj.spec, spec, choice.mode, dense=traj, label=choice.name, progress=progress
        )
        kept = (key, queued_job(handle, f"{choice.name}, {choice.mode}", work, bar, unit="steps"))
        st.session_state["lab_shift"] = kept
    return kept[1]


def shown_runs(handle, choice: VariantChoice, shift: SinkShift, report, tokens, spec: SinkSpec):
    """What the view draws for ``choice``: ``(report, tokens, head mass, second run or None)``. The variant's run is
    also what the Sink stability page re-scores (alone or side by side), with the words that say so."""
    mode = "replayed" if choice.mode == REPLAYED else "free-running"
    words = f"the variant **{choice.name}** ({mode}) of the run"
    st.session_state[STABILITY_RUN] = (id(shift.dense), shift.variant, words, f"{choice.name}, {mode}")
    vreport = report_for(shift.variant, spec)
    vtokens = tokens if choice.mode == REPLAYED else readable_tokens(handle.decode, shift.variant.final_tokens)
    if choice.shown == VARIANT:
        return vreport, vtokens, shift.variant.mass, None
    differs = np.stack([shift.differs(t) for t in range(shift.dense.n_steps)])
    label = f"{choice.name} ({choice.mode})"
    return report, tokens, shift.dense.mass, SecondRun(vreport, vtokens, label, differs)


def ablation_section(handle, traj, other, other_loaded: bool) -> None:
    """AR vs DLM's "What if the sinks are removed?": the explorer's prompt and settings decoded by the DLM and its AR
    twin, plain and ablated, and the paired change of perplexity (:func:`sap_core.ablation_stats.ablation_side_by_side`);
    settings and cost said before the run, which goes through the model's queue with a Cancel. ``other()`` loads the
    other model; ``other_loaded``: whether it is loaded already (the cost is timed only then)."""
    st.subheader("What if the sinks are removed?")
    st.caption(
        "Rulli et al. report that masking the sinks barely hurts a DLM while it breaks an AR model. Here both models "
        "decode the explorer's prompt twice, plain and with each chosen layer's sinks removed as keys at every step "
        "(found within the layer's own pass, attention renormalised over the rest), and perplexity is scored plain and "
        "ablated on the same windows: the masked-diffusion bound for the DLM, next-token for the AR model."
    )
    c = st.columns(2)
    windows = c[0].number_input(
        "Perplexity windows", 2, 64, 4, help="Windows of the evaluation text; more, smaller paired SE.", **kept("abl_windows")
    )
    layers = c[1].multiselect(
        "Ablated layers",
        list(range(handle.n_layers)),
        key="abl_layers",
        placeholder="all layers",
        help="None chosen: every layer.",
    )
    ablation, ev, d = SinkAblation(tuple(layers) or None, sink_spec()), eval_spec(nsamples=int(windows)), traj.spec
    st.markdown(
        f"**Settings:** the prompt {shown_prompt(traj.prompt)}, {d.gen_length} tokens (DLM in {d.steps} steps, the AR model "
        f"one a token), temperature {d.temperature:g}, seed {d.seed}: the Denoising explorer's last run · "
        f"{ablation.describe()} · perplexity on {ev.nsamples} windows of {ev.seqlen} tokens (DLM: {ev.draws} masking "
        "draws each), Δ paired by window."
    )
    prompt = traj.prompt or traj.final_tokens[: traj.prompt_length].tolist()
    cost_key = (model_choice(), id(traj), ablation, ev)
    cost = None
    if other_loaded:
        with job("The cost estimate"):
            cached = st.session_state.get("ablation_cost")
            if cached is None or cached[0] != cost_key:  # eight timed passes, once per setting
                pair = sorted((handle, other()), key=lambda h: bool(h.causal))
                st.session_state["ablation_cost"] = (cost_key, estimate_side_by_side(*pair, traj.prompt_length, d, ablation, ev))
            cost = st.session_state["ablation_cost"][1]
    if cost is not None:
        st.caption(
            f"Cost: 4 generations and 4 perplexity runs, {cost.passes} forward passes; about {duration(cost.seconds)} on this device."
        )
    else:
        st.caption(
            "Cost: 4 generations and 4 perplexity runs; the time is estimated once the other model is loaded (the buttons above load it)."
        )
    submitted = st.button("Run with and without the sinks", type="primary")
    cancel = CancelButton("ablation")
    cancel.notice("Sink ablation", "no result was kept and neither model was changed (no weights are touched)")
    if submitted:
        cancel.running("Stops the running sink-ablation job; nothing is changed.")
        bar = st.progress(0.0, text="Sink ablation…")
        with job("The sink-ablation run"):
            dlm, ar = sorted((handle, other()), key=lambda h: bool(h.causal))
            work = lambda progress: ablation_side_by_side(dlm, ar, prompt, d, ablation, ev, progress)  # noqa: E731
            st.session_state["ablation_side"] = (cost_key, queued_job(handle, "Sink ablation", work, bar, False))
        bar.empty()
    cancel.idle()
    result = st.session_state.get("ablation_side")
    if result is None or result[0][:2] != cost_key[:2]:
        return
    side = result[1]
    if result[0] != cost_key:
        st.caption("The result below is for the settings of its run; press the button to run the ones above.")
    for col, label in zip(st.columns(2), MODELS):
        col.markdown(f"**{label}**, plain")
        col.code(side.texts[(label, False)], language=None, wrap_lines=True)
        col.markdown(f"**{label}**, {ablation_words(side.ablation)}")
        col.code(side.texts[(label, True)], language=None, wrap_lines=True)
    st.dataframe(side.stats.table(), hide_index=True)
    st.caption(
        f"{side.stats.rows['n'].iloc[0]} windows, both models, plain and ablated, in {side.stats.seconds:.1f} s · Δ: ablated − "
        "plain NLL (nats per token), its SE paired by window; |Δ| > 2 SE is a change beyond the noise."
    )


__all__ = [
    "SHOWN",
    "ablation_section",
    "VariantChoice",
    "ablation_choice",
    "ablation_words",
    "explorer_sink_spec",
    "generation",
    "shown_runs",
    "load_control",
    "load_saved",
    "saved_variant_dirs",
    "variant_choice",
    "variant_shift",
]
