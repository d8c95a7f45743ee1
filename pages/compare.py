"""Compare: dense and pruned variants side by side, perplexity, and sparsity sweeps."""

import html
import os

import streamlit as st

import app_shared
from app_common import (
    CancelButton,
    active_model,
    eval_spec,
    job,
    kept,
    length_help,
    longest_generation,
    model_choice,
    queued_job,
    sink_spec,
    stored_caption,
)
from sap_core import viz
from sap_core.animation import readable_tokens
from sap_core.compare import compare_generations, noise_verdict, perplexity_table
from sap_core.decoding import DecodeSpec
from sap_core.distributed import ADDRESS_ENV, executor_from_env
from sap_core.pruning import METHODS
from sap_core.pruning.spec import PATTERNS
from sap_core.sweep import SweepSpec, run_sweep
from sap_core.text import shown_prompt

st.header("Compare")
handle = active_model()
variants = {v["name"]: v["variant"] for v in st.session_state.get("variants", []) if v["model"] == model_choice()}
if not variants:
    st.info(
        "No pruned variants yet: make some on the **Prune** page to compare them with the dense model "
        "(the sweep below prunes its own)."
    )

st.subheader("Side by side")
if not app_shared.settings().heavy_jobs:
    st.info("The side-by-side run is turned off on this server by its host (heavy jobs are off).", icon=":material/block:")
chosen = st.multiselect("Variants", list(variants), default=list(variants)[-2:], help="Made on the Prune page in this session.")
st.caption(
    "Decoding defaults differ from the Denoising explorer's on purpose: 32 tokens greedily (temperature 0) here, "
    "64 tokens at temperature 0.8 there; set them as you like."
)
with st.form("compare", enter_to_submit=False):  # Enter in a box never starts a run: only the button does
    prompt = st.text_area("Prompt", "ROMEO.\n", **kept("cmp_prompt"))
    c = st.columns(4)
    longest = longest_generation(handle)  # the explorer's bound too
    gen_length = c[0].number_input(
        "Generation length",
        1,
        longest,
        min(32, longest),
        help=f"32 here, 64 on the Denoising explorer: the dense model and every variant decode it, so a shorter text keeps "
        f"the comparison quick; {length_help(handle)}.",
        **kept("cmp_gen_length"),
    )
    steps = c[1].number_input(
        "Steps",
        1,
        longest,
        min(32, longest),
        help="At most the generation length: each step decodes a token or more.",
        **kept("cmp_steps"),
    )
    temperature = c[2].slider(
        "Temperature",
        0.0,
        2.0,
        0.0,
        0.05,
        help="0 = greedy, the default here (the Denoising explorer samples at 0.8): greedy decoding does not depend "
        "on the seed, so two runs differ only where the weights change which token wins. The tiny built-in "
        "model repeats itself more when greedy.",
        **kept("cmp_temperature"),
    )
    seed = c[3].number_input("Seed", 0, 2**31 - 1, 0, **kept("cmp_seed"))
    go = st.form_submit_button("Compare", type="primary", disabled=not app_shared.settings().heavy_jobs)
    st.caption(f"Generation length and steps: {length_help(handle)}; a larger typed value is refused in its box.")
compare_cancel = CancelButton("compare", handle)
compare_cancel.notice("The comparison", "no result was kept")
compare_failed = False
if go:
    compare_cancel.running("Stops the running comparison; the dense model is restored.")
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
        app_shared.check_heavy("The side-by-side run")
        picked = {n: variants[n] for n in chosen}
        result = queued_job(
            handle,
            "Decoding",
            lambda progress: compare_generations(handle, picked, prompt, spec, progress=progress),
            bar,
            False,
            unit="decoding steps",
        )
        st.session_state["comparison"] = {
            "result": result,
            "label": (
                f"the prompt {shown_prompt(prompt)}: {spec.gen_length} tokens in {spec.steps} steps, temperature {spec.temperature:g}, "
                f"seed {spec.seed}; variants: {', '.join(chosen) or 'none'}"
            ),
        }
        compare_failed = False
    bar.empty()
compare_cancel.idle()
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
        tokens[run.label] = readable_tokens(handle.decode, run.generated_ids)  # ⏎ and ␣ in the hovers of the agreement strip
        for i, same in zip(run.generated_ids, [a == b for a, b in zip(run.generated_ids, dense_ids)]):
            text = html.escape(handle.decode([int(i)]))  # running text: real spaces and newlines, so it wraps at words
            if not same and not text.strip():  # a differing space or newline: make the change visible
                text = text.replace(" ", "␣").replace("\n", "⏎\n")
            pieces.append(text if same else f"<span style='background:#ffcdd2'>{text}</span>")
        col.markdown(
            f"**{run.label}**  \ndivergence step: {run.divergence_step if run.divergence_step is not None else 'none'} · "
            f"agreement {run.agreement_rate:.0%} · {run.mean_step_ms:.0f} ms/step · {run.tokens_per_second:.1f} tokens/s"
        )
        with col:  # st.html: no markdown pass over the generated text (a blank line or a * stays text)
            st.html(
                "<div data-testid='sinkscope-generation' style='white-space:pre-wrap;word-break:normal;"
                "overflow-wrap:break-word;line-height:1.6'>" + "".join(pieces) + "</div>"
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
    if comparison.speed_note():
        st.caption(comparison.speed_note())

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
    "Windows",
    1,
    512,
    defaults.nsamples,
    help=f"Windows of {defaults.seqlen} tokens of the held-out text; default {defaults.nsamples}, the same as the "
    "tau sweep on Pick tau.",
    **kept("cmp_windows"),
)
draws = c[1].number_input(
    "Monte Carlo draws", 2, 64, defaults.draws, help="Masking draws per window (masked-diffusion bound).", **kept("cmp_draws")
)
ppl_go = c[2].button("Compute perplexity", type="primary")
ppl_cancel = CancelButton("perplexity", handle)
ppl_cancel.notice("Perplexity", "no result was kept")
ppl_failed = False
if ppl_go:
    ppl_cancel.running("Stops the running perplexity job; the dense model is restored.")
    bar = st.progress(0.0, text="Perplexity…")
    ppl_failed = True
    with job("Perplexity"):
        spec = eval_spec(nsamples=int(nsamples), draws=int(draws))
        picked = {n: variants[n] for n in chosen}
        table = queued_job(
            handle,
            "Perplexity",
            lambda progress: perplexity_table(handle, picked, spec, progress=progress),
            bar,
            False,
            unit="masked windows" if not handle.causal else "windows",
        )
        st.session_state["ppl_table"] = {
            "table": table,
            "label": (
                f"{spec.nsamples} windows × {spec.draws} draws of {spec.seqlen} tokens, seed {spec.seed}; "
                f"models: dense{''.join(', ' + n for n in chosen)}"
            ),
        }
        ppl_failed = False
    bar.empty()
ppl_cancel.idle()
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
            "se_delta": number(
                "SE of Δ NLL",
                format="%.4f",
                help="Paired: draw by draw on the same windows and masks."
                if not handle.causal
                else "The two models' errors taken as independent (conservative).",
            ),
            "paired": None,  # said by the SE column's help and the caption above
            "z": number("Δ / SE", format="%+.1f", help="Beyond ±2: the difference is larger than the Monte Carlo noise."),
        },
    )
    st.markdown(noise_verdict(stored["table"]))

st.subheader("Sparsity sweep")
if not app_shared.settings().heavy_jobs:
    st.info("The sweep is turned off on this server by its host (heavy jobs are off).", icon=":material/block:")
sweep_sink = sink_spec()
st.caption(
    f"Prunes every method at every sparsity and scores it with the perplexity settings above; the sink-aware "
    f"methods use the app's sink settings (rule {sweep_sink.rule}, k = {sweep_sink.k:g}, alpha = {sweep_sink.alpha:g}, "
    f"tau = {sweep_sink.tau:g})."
)
with st.form("sweep_form", enter_to_submit=False):
    methods = st.multiselect("Methods", list(METHODS), default=["magnitude", "wanda"], **kept("sweep_methods"))
    c = st.columns(2)
    sparsities = c[0].multiselect(
        "Sparsities", [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8], default=[0.3, 0.5], **kept("sweep_sparsities")
    )
    patterns = c[1].multiselect("Patterns", list(PATTERNS), default=["unstructured"], **kept("sweep_patterns"))
    run = st.form_submit_button("Run sweep", type="primary", disabled=not app_shared.settings().heavy_jobs)
if os.environ.get(ADDRESS_ENV, "").strip():
    st.caption(f"The sweep runs on the Ray cluster at {os.environ[ADDRESS_ENV].strip()} ({ADDRESS_ENV}).")
sweep_cancel = CancelButton("sweep", handle)
sweep_cancel.notice("The sweep", "no result was kept")
sweep_failed = False
if run:
    sweep_cancel.running("Stops the running sweep; the dense model is restored.")
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
        app_shared.check_heavy("The sweep")
        df = queued_job(
            handle, "Sweep", lambda progress: run_sweep(handle, spec, progress=progress, executor=executor_from_env()), bar, False
        )
        for label, error in zip(df["label"], df.get("error", [""] * len(df))):
            if error:
                st.warning(f"{label} failed: {app_shared.shown(error)}")
        st.session_state["sweep_result"] = {
            "table": df,
            "label": (
                f"{', '.join(methods)} at {', '.join(f'{s:g}' for s in sparsities)} ({', '.join(patterns)}); "
                f"{spec.eval.nsamples} windows × {spec.eval.draws} draws; tau = {sweep_sink.tau:g}"
            ),
        }
        sweep_failed = False
    bar.empty()
sweep_cancel.idle()
if "sweep_result" in st.session_state:
    stored = st.session_state["sweep_result"]
    stored_caption(stored, sweep_failed)
    df = stored["table"]
    view = st.radio(
        "Plot",
        ["Δ vs dense (paired errors)", "perplexity (each row's own error)"],
        horizontal=True,
        key="sweep_view",
        help="Δ vs dense: the change of perplexity with ±2 standard errors of the difference, paired draw by draw "
        "on the same windows and masks (a bar clear of 0 is beyond the noise). Perplexity: each row's own ±1 SE, "
        "which is mostly masking noise that every row shares, so it hides real differences.",
    )
    st.plotly_chart(viz.sweep_figure(df, "delta" if view.startswith("Δ") else "absolute"))
    number = st.column_config.NumberColumn
    shown = df.copy()
    shown.attrs = {}  # the per-draw estimates stay with the stored frame; the table shows the columns
    st.dataframe(
        shown,
        hide_index=True,
        column_order=[
            "label",
            "sparsity",
            "achieved_sparsity",
            "ppl",
            "ppl_se",
            "nll",
            "nll_se",
            "prune_seconds",
            "eval_seconds",
        ],
        column_config={  # method and pattern are in the label; every column fits the page (all of them in the CSV)
            "label": st.column_config.TextColumn("run", pinned=True),
            "sparsity": number("sparsity", format="%.2f", width="small"),
            "achieved_sparsity": number("achieved", format="%.3f", width="small", help="Achieved sparsity."),
            "ppl": number("perplexity", format="%.2f", width="small"),
            "ppl_se": number("± SE", format="%.2f", width="small", help="The row's own standard error (unpaired)."),
            "nll": number("NLL", format="%.4f", width="small", help="Nats per token."),
            "nll_se": number("NLL ± SE", format="%.4f", width="small"),
            "prune_seconds": number("pruning (s)", format="%.1f", width="small"),
            "eval_seconds": number("scoring (s)", format="%.1f", width="small"),
        },
    )
    st.download_button("Download sweep (CSV)", df.to_csv(index=False), "sweep.csv", "text/csv")

from app_benchmarks import benchmarks_section  # noqa: E402 - the section sits at the end of the page

benchmarks_section(handle, variants)
