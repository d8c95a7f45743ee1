"""The sink lab in the app (issue 30): the explorer's detector, its sink ablation and its variant side by side
with the dense run. The logic is the core's (:mod:`sap_core.ablation`, :mod:`sap_core.sink_shift`,
:mod:`sap_core.animation`); these functions draw its controls and keep its results in the session."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import streamlit as st

from app_common import detector_choice, model_choice, queued_generation, queued_job, report_for, sink_spec
from sap_core.ablation import SinkAblation, ablated
from sap_core.animation import SecondRun, readable_tokens
from sap_core.attention import AttentionRecorder
from sap_core.diffusion import generate
from sap_core.errors import SapError
from sap_core.sink_shift import FREE_RUNNING, MODES, REPLAYED, SinkShift, sink_shift
from sap_core.sinks import SinkSpec

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


def variant_choice(traj) -> VariantChoice | None:
    """The variant selector (where the session has variants of this model, pages/prune.py): which variant, the
    view (alone or side by side) and the comparison mode. None: the run alone."""
    names = [v["name"] for v in st.session_state.get("variants", []) if v["model"] == model_choice()]
    if not names:
        return None
    if st.session_state.get("trajectory_ablation"):
        st.caption("The variants compare with a plain dense run: generate without **Ablate sinks** to see them side by side.")
        return None
    c = st.columns([2, 2, 3])
    name = c[0].selectbox(
        "Variant", [None, *names], format_func=lambda n: "none (the dense run)" if n is None else n, key="lab_variant"
    )
    if name is None:
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
    """What the view draws for ``choice``: ``(report, tokens, head mass, second run or None)``."""
    vreport = report_for(shift.variant, spec)
    vtokens = tokens if choice.mode == REPLAYED else readable_tokens(handle.decode, shift.variant.final_tokens)
    if choice.shown == VARIANT:
        return vreport, vtokens, shift.variant.mass, None
    differs = np.stack([shift.differs(t) for t in range(shift.dense.n_steps)])
    label = f"{choice.name} ({choice.mode})"
    return report, tokens, shift.dense.mass, SecondRun(vreport, vtokens, label, differs)


__all__ = [
    "SHOWN",
    "VariantChoice",
    "ablation_choice",
    "ablation_words",
    "explorer_sink_spec",
    "generation",
    "shown_runs",
    "variant_choice",
    "variant_shift",
]
