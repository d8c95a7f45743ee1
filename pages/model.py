"""Model page (the landing page): what SinkScope is, what is loaded, and the memory a run will need."""

from pathlib import Path

import pandas as pd
import streamlit as st

import app_shared
from app_common import STORY, active_model
from sap_core.memory import available, estimate, human
from sap_core.pruning.variant import read_record

st.header("SinkScope")
st.markdown(
    "SinkScope shows the **attention sinks** of a diffusion language model (positions that receive far more "
    "attention than the rest) moving over the denoising steps, and prunes the model with **sink-aware pruning** "
    "([arXiv 2602.17664](https://arxiv.org/abs/2602.17664)), which discounts sinks that do not stay put. "
    "Work through the pages in order:"
)
for n, (file, _, title, icon, what) in enumerate(STORY[1:], 1):
    st.page_link(file, label=f"{n} · {what[0].upper()}{what[1:]} ({title})", icon=icon)
model_file, _, model_title, model_icon, model_what = STORY[0]
st.page_link(model_file, label=f"{model_title} (this page): {model_what}, below", icon=model_icon)
st.caption("Pick the model in the sidebar first: the built-in tiny-dlm runs on a CPU in seconds.")

st.subheader("Loaded model")
handle = active_model()
limit = handle.max_length  # the limit generate() enforces
facts = {
    "source": handle.source,
    "family": handle.family,
    "causal": handle.causal,
    "parameters": f"{handle.n_params:,}",
    "layers": handle.n_layers,
    "heads": handle.n_heads,
    "vocabulary": handle.vocab_size,
    "mask token": f"{handle.mask_id} ({handle.tokenizer.convert_ids_to_tokens(handle.mask_id) if handle.mask_id is not None else '-'})",
    "device": str(handle.device),
    "dtype": str(handle.dtype).replace("torch.", ""),
    "max sequence length": limit if limit is not None else "-",
}
st.table(pd.DataFrame({"value": [str(v) for v in facts.values()]}, index=list(facts)))

record = Path(handle.source) / "pruning.json"
if record.is_file():
    st.subheader("Pruning record")
    summary, problems = read_record(record)  # whatever is readable; each problem a warning
    for problem in problems:
        st.warning(f"This directory's pruning record is damaged: {app_shared.shown(problem)}")
    if summary:
        facts = [
            f"**{summary.get('label', summary.get('method', 'unknown method'))}**",
            *([f"pattern {summary['pattern']}"] if "pattern" in summary else []),
            *([f"achieved sparsity {summary['achieved_sparsity']:.3f}"] if "achieved_sparsity" in summary else []),
            *([f"pruned from `{app_shared.shown(summary['source'])}`"] if "source" in summary else []),
        ]
        st.markdown(f"A pruned model: {', '.join(facts)}.")
        st.json({k: app_shared.shown(v) if isinstance(v, str) else v for k, v in summary.items()}, expanded=False)

st.subheader("Memory estimate")
c1, c2, c3 = st.columns(3)
seq_len = c1.number_input("Sequence length (prompt + generation)", 8, 1_000_000, 128, step=8, help="Positions per forward pass.")
steps_n = c2.number_input("Denoising steps", 1, 4096, 64, help="One attention record per step.")
calib = c3.number_input("Calibration tokens (samples × length)", 128, 1_000_000, 2048, step=128)
if limit is not None and seq_len > limit:
    st.warning(
        f"{int(seq_len)} positions exceed this model's maximum sequence length ({limit}): "
        f"generation and calibration refuse sequences that long. Use at most {limit}.",
        icon=":material/warning:",
    )
est = estimate(handle, int(seq_len), int(steps_n), calib_tokens=int(calib))
rows = {
    "model weights": est.weights,
    "capture record (steps × layers × heads × L, float32)": est.capture_record,
    "capture peak per forward (one query chunk)": est.capture_peak,
    "activations per forward": est.activations,
    "pruned variant (new block weights)": est.pruning_copy,
    "pruning calibration (one block)": est.pruning_calibration,
    "total: a generation with capture": est.generation_total,
    "total: a pruning run": est.pruning_total,
}
st.table(pd.DataFrame({"estimate": [human(v) for v in rows.values()]}, index=list(rows)))
free, where = available(handle.device)
need = max(est.generation_total, est.pruning_total)
if need > free:
    st.warning(
        f"The larger total ({human(need)}) exceeds the {where} ({human(free)}): lower the sequence length, "
        "the steps or the calibration tokens, or use a smaller dtype.",
        icon=":material/warning:",
    )
else:
    st.caption(
        f"The larger total ({human(need)}) fits in the {where} now ({human(free)}). "
        "The capture record stays in host memory; the weights sit on the model's device."
    )
