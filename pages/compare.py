"""Compare: dense and pruned variants side by side, perplexity, and sparsity sweeps."""

import html

import streamlit as st

from app_common import active_model, eval_spec, job, model_choice, progress_callback, sink_spec, stored_caption, token_texts
from sap_core import viz
from sap_core.compare import compare_generations, noise_verdict, perplexity_table
from sap_core.diffusion import DecodeSpec
from sap_core.pruning import METHODS
from sap_core.sweep import SweepSpec, run_sweep

st.header("Compare")
handle = active_model()
variants = {v["name"]: v["variant"] for v in st.session_state.get("variants", []) if v["model"] == model_choice()}
if not variants:
    st.info(
        "No pruned variants yet: make some on the **Prune** page to compare them with the dense model "
        "(the sweep below prunes its own)."
    )

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
compare_failed = False
if go:
    bar = st.progress(0.0, text="Decoding…")
    compare_failed = True
    with job("The comparison"):
        spec = DecodeSpec(
            int(gen_length),
            int(steps),
            min(int(gen_length), 16) if int(gen_length) % 16 == 0 else int(gen_length),
            temperature=float(temperature),
            seed=int(seed),
        )
        result = compare_generations(
            handle, {n: variants[n] for n in chosen}, prompt, spec, progress=progress_callback(bar, "Decoding")
        )
        shown = prompt if len(prompt) <= 40 else prompt[:37] + "…"
        st.session_state["comparison"] = {
            "result": result,
            "label": (
                f"the prompt {shown!r}: {spec.gen_length} tokens in {spec.steps} steps, temperature {spec.temperature:g}, "
                f"seed {spec.seed}; variants: {', '.join(chosen) or 'none'}"
            ),
        }
        compare_failed = False
    bar.empty()
stored = st.session_state.get("comparison")
if stored is not None:
    comparison = stored["result"]
    stored_caption(stored, compare_failed)
    st.caption(
        "**Divergence step**: the first denoising step after which a variant's partly decoded sequence differs "
        "from the dense model's (a different token, or a different position unmasked). Up to that step the two "
        "runs are identical; 'none' means they never differ."
    )
    dense_ids = comparison.dense.generated_ids
    cols = st.columns(len(comparison.runs))
    tokens = {}
    for col, run in zip(cols, comparison.runs):
        pieces = []
        tokens[run.label] = token_texts(handle, run.generated_ids)
        for tok, same in zip(tokens[run.label], [a == b for a, b in zip(run.generated_ids, dense_ids)]):
            style = "" if same else "background:#ffcdd2"
            pieces.append(f"<span style='{style}'>{html.escape(tok)}</span>")
        col.markdown(
            f"**{run.label}**  \ndivergence step: {run.divergence_step if run.divergence_step is not None else 'none'} · "
            f"agreement {run.agreement_rate:.0%} · {run.mean_step_ms:.0f} ms/step · {run.tokens_per_second:.1f} tokens/s"
        )
        col.markdown(
            "<div style='font-family:monospace;white-space:pre-wrap'>" + "".join(pieces) + "</div>", unsafe_allow_html=True
        )
    if comparison.variants:
        st.plotly_chart(
            viz.agreement_figure(
                {r.label: r.agreement for r in comparison.variants}, comparison.dense.trajectory.prompt_length, tokens
            )
        )
    number = st.column_config.NumberColumn
    st.dataframe(
        comparison.table(),
        hide_index=True,
        column_config={
            "label": "model",
            "text": "generated text",
            "divergence_step": number("divergence step", format="%d"),
            "agreement_rate": number("same final tokens", format="percent"),
            "seconds": number("time (s)", format="%.2f"),
            "tokens_per_second": number("tokens/s", format="%.1f"),
            "mean_step_ms": number("mean ms/step", format="%.1f"),
            "median_step_ms": number("median ms/step", format="%.1f"),
        },
    )

st.subheader("Perplexity")
defaults = eval_spec()
if handle.causal:
    st.caption(
        f"Next-token perplexity on windows of {defaults.seqlen} tokens of the held-out text (the draws setting is not "
        "used); the error of a difference treats the two models' errors as independent (conservative). "
        "These settings also score the sweep below."
    )
else:
    st.caption(
        f"Masked-diffusion perplexity (Monte Carlo bound) on windows of {defaults.seqlen} tokens of the held-out text; "
        "every model sees the same windows and masks, so differences are measured draw by draw (paired). "
        "These settings also score the sweep below."
    )
c = st.columns(3)
nsamples = c[0].number_input(
    "Windows", 1, 512, defaults.nsamples, help=f"Windows of {defaults.seqlen} tokens of the held-out text."
)
draws = c[1].number_input("Monte Carlo draws", 2, 64, defaults.draws, help="Masking draws per window (masked-diffusion bound).")
ppl_failed = False
if c[2].button("Compute perplexity", type="primary"):
    bar = st.progress(0.0, text="Perplexity…")
    ppl_failed = True
    with job("Perplexity"):
        spec = eval_spec(nsamples=int(nsamples), draws=int(draws))
        table = perplexity_table(handle, {n: variants[n] for n in chosen}, spec, progress=progress_callback(bar, "Perplexity"))
        st.session_state["ppl_table"] = {
            "table": table,
            "label": (
                f"{spec.nsamples} windows × {spec.draws} draws of {spec.seqlen} tokens, seed {spec.seed}; "
                f"models: dense{''.join(', ' + n for n in chosen)}"
            ),
        }
        ppl_failed = False
    bar.empty()
if "ppl_table" in st.session_state:
    stored = st.session_state["ppl_table"]
    stored_caption(stored, ppl_failed)
    number = st.column_config.NumberColumn
    st.dataframe(
        stored["table"],
        hide_index=True,
        column_config={
            "ppl": number("perplexity", format="%.2f"),
            "ppl_se": number("± SE", format="%.2f"),
            "nll": number("NLL (nats/token)", format="%.4f"),
            "nll_se": number("NLL ± SE", format="%.4f"),
            "delta_ppl": number("Δ perplexity vs dense", format="%+.2f"),
            "delta_nll": number("Δ NLL vs dense", format="%+.4f"),
            "se_delta": number("SE of Δ NLL", format="%.4f", help="Paired: draw by draw on the same windows and masks."),
            "paired": st.column_config.CheckboxColumn("paired SE"),
            "z": number("Δ / SE", format="%+.1f", help="Beyond ±2: the difference is larger than the Monte Carlo noise."),
        },
    )
    st.markdown(noise_verdict(stored["table"]))

st.subheader("Sparsity sweep")
sweep_sink = sink_spec()
st.caption(
    f"Prunes every method at every sparsity and scores it with the perplexity settings above; the sink-aware "
    f"methods use the app's sink settings (rule {sweep_sink.rule}, k = {sweep_sink.k:g}, alpha = {sweep_sink.alpha:g}, "
    f"tau = {sweep_sink.tau:g})."
)
with st.form("sweep_form"):
    methods = st.multiselect("Methods", list(METHODS), default=["magnitude", "wanda"])
    c = st.columns(2)
    sparsities = c[0].multiselect("Sparsities", [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8], default=[0.3, 0.5])
    patterns = c[1].multiselect("Patterns", ["unstructured", "2:4", "4:8"], default=["unstructured"])
    run = st.form_submit_button("Run sweep", type="primary")
sweep_failed = False
if run:
    bar = st.progress(0.0, text="Sweep…")
    sweep_failed = True
    with job("The sweep"):
        spec = SweepSpec(
            tuple(methods),
            tuple(float(s) for s in sparsities),
            tuple(patterns),
            sink=sweep_sink,
            eval=eval_spec(nsamples=int(nsamples), draws=int(draws)),
        )
        df = run_sweep(handle, spec, progress=progress_callback(bar, "Sweep"))
        st.session_state["sweep_result"] = {
            "table": df,
            "label": (
                f"{', '.join(methods)} at {', '.join(f'{s:g}' for s in sparsities)} ({', '.join(patterns)}); "
                f"{spec.eval.nsamples} windows × {spec.eval.draws} draws; tau = {sweep_sink.tau:g}"
            ),
        }
        sweep_failed = False
    bar.empty()
if "sweep_result" in st.session_state:
    stored = st.session_state["sweep_result"]
    stored_caption(stored, sweep_failed)
    df = stored["table"]
    st.plotly_chart(viz.sweep_figure(df))
    number = st.column_config.NumberColumn
    shown = df.copy()
    shown.attrs = {}  # the per-draw estimates stay with the stored frame; the table shows the columns
    st.dataframe(
        shown,
        hide_index=True,
        column_config={
            "sparsity": number("sparsity", format="%.2f"),
            "ppl": number("perplexity", format="%.2f"),
            "ppl_se": number("± SE", format="%.2f"),
            "prune_seconds": number("pruning (s)", format="%.1f"),
            "nll": number("NLL", format="%.4f"),
            "nll_se": number("NLL ± SE", format="%.4f"),
            "achieved_sparsity": number("achieved sparsity", format="%.3f"),
            "eval_seconds": number("scoring (s)", format="%.1f"),
        },
    )
    st.download_button("Download sweep (CSV)", df.to_csv(index=False), "sweep.csv", "text/csv")
