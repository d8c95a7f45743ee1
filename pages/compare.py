"""Compare: dense and pruned variants side by side, perplexity, and sparsity sweeps."""
import html

import pandas as pd
import streamlit as st

from app_common import active_model, job, model_choice, progress_callback, token_texts
from sap_core import viz
from sap_core.compare import compare_generations
from sap_core.diffusion import DecodeSpec
from sap_core.evaluate import causal_perplexity, diffusion_perplexity
from sap_core.pruning import METHODS
from sap_core.sweep import EvalSpec, SweepSpec, run_sweep

st.header("Compare")
handle = active_model()
variants = {v["name"]: v["variant"] for v in st.session_state.get("variants", []) if v["model"] == model_choice()}

st.subheader("Side by side")
chosen = st.multiselect("Variants", list(variants), default=list(variants)[-2:], help="Made on the Prune page in this session.")
with st.form("compare"):
    prompt = st.text_area("Prompt", "ROMEO.\n")
    c = st.columns(4)
    gen_length = c[0].number_input("Generation length", 1, 1024, 32)
    steps = c[1].number_input("Steps", 1, 1024, 32)
    temperature = c[2].slider("Temperature", 0.0, 2.0, 0.0, 0.05, help="0 = greedy, the clearest comparison.")
    seed = c[3].number_input("Seed", 0, 2**31 - 1, 0)
    go = st.form_submit_button("Compare", type="primary")
if go:
    bar = st.progress(0.0)
    with job("The comparison"):
        spec = DecodeSpec(int(gen_length), int(steps), min(int(gen_length), 16) if int(gen_length) % 16 == 0 else int(gen_length),
                          temperature=float(temperature), seed=int(seed))
        st.session_state["comparison"] = compare_generations(handle, {n: variants[n] for n in chosen}, prompt, spec,
                                                             progress=progress_callback(bar, "Decoding"))
    bar.empty()
comparison = st.session_state.get("comparison")
if comparison is not None:
    dense_ids = comparison.dense.generated_ids
    cols = st.columns(len(comparison.runs))
    for col, run in zip(cols, comparison.runs):
        pieces = []
        for tok, same in zip(token_texts(handle, run.generated_ids), [a == b for a, b in zip(run.generated_ids, dense_ids)]):
            style = "" if same else "background:#ffcdd2"
            pieces.append(f"<span style='{style}'>{html.escape(tok)}</span>")
        col.markdown(f"**{run.label}**  \ndivergence step: {run.divergence_step if run.divergence_step is not None else 'none'} · "
                     f"agreement {run.agreement_rate:.2f} · {run.mean_step_ms:.0f} ms/step")
        col.markdown("<div style='font-family:monospace;white-space:pre-wrap'>" + "".join(pieces) + "</div>", unsafe_allow_html=True)
    st.plotly_chart(viz.agreement_figure({r.label: r.agreement for r in comparison.runs}, 0))
    st.dataframe(comparison.table(), hide_index=True)

st.subheader("Perplexity")
c = st.columns(3)
nsamples = c[0].number_input("Windows", 1, 512, 8, help="Windows of 64 tokens of the held-out text.")
draws = c[1].number_input("Monte Carlo draws", 2, 64, 4, help="Masking draws per window (masked-diffusion bound).")
if c[2].button("Compute perplexity"):
    bar = st.progress(0.0)
    rows = []
    with job("Perplexity"):
        def score(model):
            if model.causal:
                return causal_perplexity(model, seqlen=64, nsamples=int(nsamples))
            return diffusion_perplexity(model, seqlen=64, nsamples=int(nsamples), draws=int(draws), seed=0)
        res = score(handle)
        rows.append(dict(model="dense", ppl=res.ppl, ppl_se=res.ppl_se, nll=res.nll, nll_se=res.nll_se))
        for i, name in enumerate(chosen):
            with variants[name].applied(handle):
                res = score(handle)
            rows.append(dict(model=name, ppl=res.ppl, ppl_se=res.ppl_se, nll=res.nll, nll_se=res.nll_se))
            bar.progress((i + 1) / max(len(chosen), 1))
        st.session_state["ppl_table"] = pd.DataFrame(rows)
    bar.empty()
if "ppl_table" in st.session_state:
    st.dataframe(st.session_state["ppl_table"], hide_index=True)

st.subheader("Sparsity sweep")
with st.form("sweep_form"):
    methods = st.multiselect("Methods", list(METHODS), default=["magnitude", "wanda"])
    c = st.columns(3)
    sparsities = c[0].multiselect("Sparsities", [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8], default=[0.3, 0.5])
    patterns = c[1].multiselect("Patterns", ["unstructured", "2:4", "4:8"], default=["unstructured"])
    windows = c[2].number_input("Evaluation windows", 1, 256, 4)
    run = st.form_submit_button("Run sweep")
if run:
    bar = st.progress(0.0)
    with job("The sweep"):
        spec = SweepSpec(tuple(methods), tuple(float(s) for s in sparsities), tuple(patterns), sink=st.session_state.get("sink_spec"),
                         eval=EvalSpec(nsamples=int(windows)))
        st.session_state["sweep"] = run_sweep(handle, spec, progress=progress_callback(bar, "Sweep"))
    bar.empty()
if "sweep" in st.session_state:
    df = st.session_state["sweep"]
    st.plotly_chart(viz.sweep_figure(df))
    st.dataframe(df, hide_index=True)
    st.download_button("Download sweep (CSV)", df.to_csv(index=False), "sweep.csv", "text/csv")
