"""SinkScope: attention sinks in diffusion language models, and sink-aware pruning.

streamlit run app.py

Every URL runs this script first (a page opened directly, even before anyone opened /, see
``app_common.through_the_app``): the navigation and a loading message are drawn before the heavy imports
(torch, transformers: seconds) and the model load, so a cold start is never a blank page.
"""

from __future__ import annotations

import os
import sys

import streamlit as st

# The model's queue runs in this process beside every session's script: its workers need the interpreter lock back
# after every torch call, and wait up to the switch interval (5 ms by default) whenever a script holds it. 0.5 ms:
# 8 runs beside two half-busy Python threads took 3.5x the queue alone instead of 32x (bench/queue_gil.py).
sys.setswitchinterval(0.0005)

st.set_page_config(page_title="SinkScope", page_icon=":material/blur_on:", layout="wide")
PAGES = [
    st.Page("pages/model.py", title="Model", icon=":material/memory:", default=True),
    st.Page("pages/explorer.py", title="Denoising explorer", icon=":material/animation:"),
    st.Page("pages/stability.py", title="Sink stability", icon=":material/balance:"),
    st.Page("pages/ar_vs_dlm.py", title="AR vs DLM", icon=":material/swap_horiz:"),
    st.Page("pages/prune.py", title="Prune", icon=":material/content_cut:"),
    st.Page("pages/tau.py", title="Pick tau", icon=":material/tune:"),
    st.Page("pages/compare.py", title="Compare", icon=":material/compare_arrows:"),
]  # the order of the story (app_common.STORY, which cannot be imported before the first paint)
page = st.navigation(PAGES)

loading = st.empty()  # the first load takes seconds: say so in the main area instead of a blank page
if "app_common" not in sys.modules:
    loading.info(
        "Loading SinkScope and the model… the page appears when it is ready (a few seconds for the built-in "
        "models, minutes for an 8B checkpoint).",
        icon=":material/hourglass_top:",
    )

import torch  # noqa: E402  (after the first paint: importing torch takes seconds)

import app_shared  # noqa: E402
from app_common import MODEL_KINDS, cached_model, is_cached, model_choice, model_kind_label, next_link, note_page  # noqa: E402
from sap_core.errors import SapError  # noqa: E402

# One CPU thread by default: the built-in models are small, and on a shared machine torch's threads
# spin against other work (a 64-step generation measured 1.0 s with 1 thread, 18.9 s with 2 under load).
torch.set_num_threads(int(os.environ.get("SINKSCOPE_THREADS", "1")))

try:
    app_shared.settings()
except SapError as exc:  # a bad SINKSCOPE_* setting: the server cannot serve
    st.error(f"This server's settings are wrong: {exc}")
    st.stop()
app_shared.session()  # ?sid= in the URL: a reload or a new tab finds this session's work
with st.sidebar:
    st.title("SinkScope")
    if app_shared.shared():  # a class: only the models the server offers, by name (never a path)
        kind = st.selectbox(
            "Model",
            app_shared.settings().model_names(),
            key="model_name",
            help="The built-in models and the models the host offers on this server.",
        )
    else:
        kind = st.radio(
            "Model",
            MODEL_KINDS,
            key="model_kind",
            format_func=model_kind_label,
            help="The built-in models ship with SinkScope and run on a CPU. A local directory holds a "
            "LLaDA, Dream or transformers causal-LM checkpoint (config.json + safetensors).",
        )
    if kind == MODEL_KINDS[2]:
        st.text_input(
            "Model directory",
            key="model_path",
            placeholder="/models/LLaDA-8B-Instruct",
            help="A local folder with config.json, *.safetensors and tokenizer files.",
        )
    devices = ["auto", "cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    st.selectbox("Device", devices, key="device", help="auto: CUDA when a GPU is available, else the CPU.")
    st.selectbox(
        "Precision", ["auto", "float32", "bfloat16", "float16"], key="dtype", help="auto: bfloat16 on a GPU, float32 on the CPU."
    )
    if not is_cached(*model_choice()):
        loading.info(
            f"Loading the model **{model_choice()[0]}** into memory… the page appears when it is ready "
            "(a few seconds for the built-in models, minutes for an 8B checkpoint).",
            icon=":material/hourglass_top:",
        )
    try:
        handle = cached_model(*model_choice())
        if kind == MODEL_KINDS[2] and not (st.session_state.get("model_path") or "").strip():  # nothing typed yet
            st.info(f"No directory given yet: the pages use **{handle.name}** until you type one above.")
        else:
            st.success(f"Loaded **{handle.name}** on {handle.device}")
    except SapError as exc:
        st.error(app_shared.shown(exc))
    loading.empty()

note_page(page.url_path)
page.run()
next_link(page.url_path)  # not reached when a page stops early (it then says what to do first)
