"""Denoising explorer: run a generation with attention capture, then step through it in the browser."""

import time

import streamlit as st

import app_common
import app_lab
import app_shared
from app_common import (
    active_model,
    current_trajectory,
    job,
    kept,
    length_help,
    longest_generation,
    model_choice,
    report_for,
)
from sap_core import animation, viz
from sap_core.decoding import DecodeSpec
from sap_core.diffusion import attention_map
from sap_core.sink_report import provenance, run_words
from sap_core.text import shown_prompt

st.header("Denoising explorer")
handle = active_model()
app_shared.open_linked_run(handle, animation.readable_tokens)  # /explorer?run=ID&step=N

# The model's context bounds every length input: the prompt and the generated tokens must fit in it together
# (the same bound and sentence as Compare's).
limit = longest_generation(handle)
sampler = app_common.sampler_choice(handle)  # a Dream model's sampler, outside the form: its options follow at once
with st.form("decode", enter_to_submit=False):  # Enter in a box never starts a generation: only the button does
    prompt = st.text_area(
        "Prompt", "ROMEO.\n", help="Text the model continues. It is never changed during decoding.", **kept("decode_prompt")
    )
    c = st.columns(4)
    gen_length = c[0].number_input(
        "Generation length",
        1,
        limit,
        min(64, limit),
        help=f"Tokens to generate (masked at the start); {length_help(handle)}.",
        **kept("decode_gen_length"),
    )
    decode = app_common.decoding_options(handle, sampler, int(gen_length), c[1:], limit)  # the family's options
    ablation = app_lab.ablation_choice(st.columns([1, 3]), handle)
    submitted = st.form_submit_button("Generate", type="primary", icon=":material/play_arrow:")
    st.caption(
        f"Generation length, steps and block length are {length_help(handle)}; a larger typed value is refused in its box."
    )


def run_label(spec: DecodeSpec, text: str) -> str:
    """What a run was: the label stored with its result (trajectory_label), as every stored result has one."""
    return f"prompt {shown_prompt(text)} · {run_words(spec, handle.causal)}"


failed = False
if submitted:
    length = int(gen_length)
    st.session_state["step"] = 0  # a new run opens at its step 0
    bar = st.progress(0.0, text="Generating…")
    failed = True
    with job("Generation"):  # an impossible spec shows its one-line error (DecodeSpec checks, then generate's)
        spec = DecodeSpec(**decode)
        t0 = time.perf_counter()
        traj = app_lab.generation(handle, prompt, spec, ablation, bar)  # the model's queue: place, wait, batch
        label = run_label(spec, prompt) + (f" · {app_lab.ablation_words(ablation)}" if ablation else "")
        st.session_state.update(
            trajectory=traj,
            trajectory_model=model_choice(),
            trajectory_seconds=time.perf_counter() - t0,
            trajectory_tokens=animation.readable_tokens(handle.decode, traj.final_tokens),
            trajectory_label=label,
            trajectory_ablation=ablation,
        )
        st.session_state.pop("attention", None)
        app_shared.store_run(traj, st.session_state["trajectory_label"])
        failed = False
    bar.empty()

traj = current_trajectory(handle)
if traj is None:
    st.info("Set the decoding options and press **Generate**: the attention each position receives is recorded at every step.")
    # The view's frame, empty, at its place: the browser loads the frame's code now rather than after the first
    # generation (that first-use load was ~1.2 s of Generate -> first view, bench/browser_latency.py)
    st.iframe(animation.PLACEHOLDER_HTML, height=60)
    st.stop()

label = st.session_state.get("trajectory_label", "")
if failed:
    st.warning(f"Below is the **previous run**, not the settings above: {label}", icon=":material/history:")
else:
    decoded = float(traj.step_seconds.sum())  # the decoding alone; the rest of the click's time was the queue's
    waited = st.session_state.get("trajectory_seconds", decoded) - decoded
    queue = f" after {waited:.1f} s in the queue" if waited >= 0.1 else ""
    st.success(f"{traj.n_steps} steps in {decoded:.1f} s{queue} · {label}")
# The step the person is on is the browser's: the view commits it into the hidden box "step" (kept across pages)
# without a rerun, so every rerun (a widget, Back, the sidebar) reads the newest step; the URL's ?step= (which the
# view keeps current, and which Streamlit may send stale after Back) is read only by a new session (a reload, a
# link) or a linked run just opened.
if "step" not in st.session_state or st.session_state.pop("run_opened", False):
    st.session_state["step"] = animation.view_step(st.query_params.get("step"), traj.n_steps)
elif st.session_state["step"] >= traj.n_steps:  # a step of an earlier, longer run
    st.session_state["step"] = 0
view_step = st.number_input("Step of the view", 0, traj.n_steps - 1, key="step", on_change="ignore", persist_state="session")
st.html("<style>.st-key-step { display: none; }</style>")  # hidden: written by the view, read here
app_shared.run_link(view_step)
output = traj.prompt + handle.decode(traj.generated_ids)
st.caption("Output (prompt and generated text)")
st.code(output, language=None, wrap_lines=True)
spec = app_lab.explorer_sink_spec(st.columns([2, 1, 3]))  # the Sink stability page's detector: one sink rule
report = report_for(traj, spec)
tokens = st.session_state["trajectory_tokens"]
choice = app_lab.variant_choice(traj, handle)  # a variant of the Prune page, alone or side by side with this run
shown, other = (report, tokens, traj.mass), None
if choice is not None:
    bar = st.empty()
    with job("The variant's run"):
        shift = app_lab.variant_shift(handle, traj, choice, spec, bar)
        *shown, other = app_lab.shown_runs(handle, choice, shift, report, tokens, spec)
    bar.empty()

st.subheader("Step through the run")
st.caption(
    "Drag the slider or press **Play** (or Space): every step is already in your browser, so moving "
    "through them runs neither the model nor the server. Top: each position's state at the step, its token "
    "written above once decoded. Middle: the attention mass each position receives in each layer at the step, "
    "as a multiple of the uniform mass (1 = average), sinks marked ✕. Bottom: the same for every step, the "
    "dominant sink of each step (○) and the current step (dotted line). Below (**every head**, H): one thumbnail per "
    "layer and head of the mass each position receives from that head at the step, so a sink that lives in a few heads "
    "shows. Hover for token, position and state; **Fullscreen** (F) for a projector."
)
c = st.columns(2)
color_range = c[0].radio(
    "Colour range",
    animation.COLOR_RANGES,
    format_func=animation.COLOR_RANGE_NAMES.get,
    horizontal=True,
    help="A fixed range makes the steps comparable; per step shows each step's own contrast.",
)
layer_options = [None] + list(report.layers)
trail_layer = c[1].selectbox(
    "Layer of the step × position map",
    layer_options,
    format_func=lambda l: "all layers (summed)" if l is None else f"layer {l}",
    help="Mass summed over all analysed layers, or one layer.",
)
anim_spec = animation.AnimationSpec(color_range=color_range, layer=trail_layer)
# The exports stand alone: the HTML names the run (model, prompt, settings) and the view shown; the GIF carries
# the run in its caption; every file name carries them.
run = provenance(handle, traj, spec)
about = animation.about_rows(run, anim_spec, view_step, output)
settings = animation.run_settings(traj.spec, handle.causal)


def file_name(kind: str, ext: str) -> str:
    return animation.export_name(kind, handle.name, traj.prompt, settings, ext)


views = st.session_state.setdefault("explorer_views", {})
view_key = (id(traj), spec, anim_spec, choice)
if view_key not in views:
    # one view per session: the latest trajectory and settings; rebuilt for new settings at the step it showed
    views.clear()
    views[view_key] = animation.explorer_html(
        shown[0],
        shown[1],
        anim_spec,
        start_step=view_step,
        follow_box=".st-key-map_step input",
        head_mass=shown[2],
        other=other,
        step_box=".st-key-step input",
        step_key=f"{st.session_state.get('sid')}.{id(traj)}",  # this run in this session: a reload or a link is another
        save_as=(file_name("sinks", "html"), about),  # the view's own Save HTML: the export at the step on screen
    )
st.iframe(views[view_key], height=animation.FRAME_HEIGHT)

c = st.columns(4)
c[0].download_button(
    "Animated GIF",
    lambda: animation.gif_bytes(report, tokens, anim_spec, caption=run.line()),
    file_name=file_name("sinks", "gif"),
    mime="image/gif",
    on_click="ignore",
    icon=":material/gif_box:",
    help="The mass each position receives at every step, tokens and sinks marked (Pillow, a frame per step).",
)
c[1].download_button(
    "Interactive HTML",
    lambda: animation.html_bytes(report, tokens, anim_spec, about, traj.mass, start_step=view_step),
    file_name=file_name("sinks", "html"),
    mime="text/html",
    on_click="ignore",
    icon=":material/html:",
    help="The view above as one self-contained page (opens offline, no library), headed by the model, prompt and settings, "
    "at the step the page last read from the view (a colour or layer change, Recompute map or a rerun reads it); "
    "the view's own **Save HTML** button saves it at the step on screen.",
)
sinks = animation.sinks_frame(report, tokens)
c[2].download_button(
    "Sinks per step (CSV)",
    lambda: sinks.to_csv(index=False),
    file_name=file_name("sinks-per-step", "csv"),
    mime="text/csv",
    on_click="ignore",
    icon=":material/table:",
)
c[3].download_button(
    "Positions (CSV)",
    lambda: animation.positions_frame(report, tokens).to_csv(index=False),
    file_name=file_name("positions", "csv"),
    mime="text/csv",
    on_click="ignore",
    icon=":material/table:",
)
with st.expander(f"Sinks at every step ({len(sinks)} rows)"):
    st.dataframe(
        sinks,
        hide_index=True,
        column_config={
            "mass_x_uniform": st.column_config.NumberColumn("mass × uniform", format="%.2f"),
            "score": st.column_config.NumberColumn(format="%.3f"),
        },
    )

st.subheader("Full attention map")
c = st.columns([2, 1, 1, 1, 1])


def _view_step_to_box() -> None:
    st.session_state["map_step"] = st.session_state.get("step", 0)


follow = c[0].toggle(
    "Step of the view above",
    True,
    key="map_follow",
    on_change=_view_step_to_box,  # turned off: typing starts from the view's step
    help="On: the step the view above shows (the greyed box follows it); off: type a step.",
)
if follow or st.session_state.get("map_step", 0) >= traj.n_steps:
    st.session_state["map_step"] = view_step
m_step = c[1].number_input("Step", 0, traj.n_steps - 1, key="map_step", disabled=follow)
m_layer = c[2].number_input("Layer", 0, handle.n_layers - 1, 0, key="map_layer")
m_head = c[3].number_input("Head", 0, handle.n_heads - 1, 0, key="map_head")
if c[4].button(
    "Recompute map", icon=":material/refresh:", help="Replays that step's input through the model (one forward pass)."
):
    step = view_step if follow else int(m_step)
    with job("Recomputing the map"):
        st.session_state["attention"] = (
            step,
            int(m_layer),
            int(m_head),
            attention_map(handle, traj, step, int(m_layer), int(m_head)),
        )
if "attention" in st.session_state:
    s, l, h, amap = st.session_state["attention"]
    st.plotly_chart(
        viz.attention_map_figure(amap, s, l, h, animation.tokens_at_step(report, tokens, s)), theme=None, key="attention_map"
    )
