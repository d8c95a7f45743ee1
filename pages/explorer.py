"""Denoising explorer: run a generation with attention capture, then step through it."""
import time

import streamlit as st

from app_common import active_model, current_trajectory, job, model_choice, progress_callback, report_for, sink_spec, token_texts
from sap_core import viz
from sap_core.attention import AttentionRecorder
from sap_core.diffusion import REMASKING, DecodeSpec, attention_map, generate

st.header("Denoising explorer")
handle = active_model()

with st.form("decode"):
    prompt = st.text_area("Prompt", "ROMEO.\n", help="Text the model continues. It is never changed during decoding.")
    c = st.columns(4)
    gen_length = c[0].number_input("Generation length", 1, 2048, 64, help="Tokens to generate (masked at the start).")
    steps = c[1].number_input("Steps", 1, 2048, 64, help="Denoising steps in all; must divide evenly over the blocks. A causal model uses one step per token.")
    block_length = c[2].number_input("Block length", 1, 2048, 16, help="Semi-autoregressive blocks, filled left to right.")
    remasking = c[3].selectbox("Remasking", REMASKING, help="Which masked positions are unmasked first: most confident, random, or lowest entropy.")
    c = st.columns(3)
    temperature = c[0].slider("Temperature", 0.0, 2.0, 0.8, 0.05, help="0 = greedy; Gumbel-max sampling in float64 otherwise.")
    cfg_scale = c[1].number_input("CFG scale", 0.0, 20.0, 0.0, help="Classifier-free guidance; the unconditional pass masks the prompt. 0 = off.")
    seed = c[2].number_input("Seed", 0, 2**31 - 1, 0, help="Same seed and settings give the same trajectory.")
    submitted = st.form_submit_button("Generate", type="primary")

if submitted:
    spec = DecodeSpec(int(gen_length), int(steps), int(block_length), remasking, float(temperature), float(cfg_scale), int(seed))
    bar = st.progress(0.0, text="Generating…")
    with job("Generation"):
        t0 = time.perf_counter()
        traj = generate(handle, prompt, spec, recorder=AttentionRecorder(), progress=progress_callback(bar, "Generating"))
        st.session_state.update(trajectory=traj, trajectory_model=model_choice(), trajectory_seconds=time.perf_counter() - t0,
                                trajectory_tokens=token_texts(handle, traj.final_tokens), step=0)
        st.session_state.pop("attention", None)
    bar.empty()

traj = current_trajectory(handle)
if traj is None:
    st.info("Set the decoding options and press **Generate**: the attention each position receives is recorded at every step.")
    st.stop()

st.success(f"{traj.n_steps} steps in {st.session_state.get('trajectory_seconds', 0):.1f} s")
st.text_area("Output", traj.prompt + handle.decode(traj.generated_ids), height=100, disabled=True)
spec = sink_spec()
report = report_for(traj, spec)
tokens = st.session_state["trajectory_tokens"]


def strip_tokens(step: int) -> tuple[list[str], list[str]]:
    states = report.state_names(step)
    shown = ["▒" if s == "masked" else ("" if s == "absent" else t) for t, s in zip(tokens, states)]
    return shown, states


@st.fragment
def step_view() -> None:
    c1, c2 = st.columns([6, 1])
    step = c1.slider("Timestep", 0, traj.n_steps - 1, key="step", help="Moving it redraws from the stored record; the model is not run.")
    play = c2.button("▶ Play", help="Step through every timestep.")
    strip, heat = st.empty(), st.empty()

    def draw(s: int) -> None:
        shown, states = strip_tokens(s)
        strip.plotly_chart(viz.token_strip(shown, states, f"Sequence at step {s}"), key=f"strip{s}")
        heat.plotly_chart(viz.layer_position_heatmap(report, s), key=f"heat{s}")

    if play:
        for s in range(step, traj.n_steps):
            draw(s)
            time.sleep(0.15)
    else:
        draw(step)


step_view()

st.subheader("Sink trajectory")
layer_options = ["all layers"] + [str(l) for l in report.layers]
choice = st.selectbox("Layer", layer_options, help="Mass summed over all layers, or one layer; the red line is the dominant position d_t.")
st.plotly_chart(viz.step_position_heatmap(report, None if choice == "all layers" else int(choice)))

st.subheader("Full attention map")
c = st.columns(4)
m_step = c[0].number_input("Step", 0, traj.n_steps - 1, 0, key="map_step")
m_layer = c[1].number_input("Layer", 0, handle.n_layers - 1, 0, key="map_layer")
m_head = c[2].number_input("Head", 0, handle.n_heads - 1, 0, key="map_head")
if c[3].button("Recompute map", help="Replays that step's input through the model (one forward pass)."):
    with job("Recomputing the map"):
        st.session_state["attention"] = (int(m_step), int(m_layer), int(m_head),
                                         attention_map(handle, traj, int(m_step), int(m_layer), int(m_head)))
if "attention" in st.session_state:
    s, l, h, amap = st.session_state["attention"]
    st.plotly_chart(viz.attention_map_figure(amap, s, l, h))
