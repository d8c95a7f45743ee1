"""Model page: what is loaded, and the memory capture and pruning will need."""
import pandas as pd
import streamlit as st

from app_common import active_model
from sap_core.memory import estimate, human

st.header("Model")
handle = active_model()
cfg = handle.module.config
facts = {
    "source": handle.source, "family": handle.family, "causal": handle.causal,
    "parameters": f"{handle.n_params:,}", "layers": handle.n_layers, "heads": handle.n_heads,
    "vocabulary": len(handle.tokenizer), "mask token": f"{handle.mask_id} ({handle.tokenizer.convert_ids_to_tokens(handle.mask_id) if handle.mask_id is not None else '-'})",
    "device": str(handle.device), "dtype": str(handle.dtype).replace("torch.", ""),
    "max sequence length": getattr(cfg, "max_sequence_length", None) or getattr(cfg, "max_position_embeddings", "-"),
}
st.table(pd.DataFrame({"value": [str(v) for v in facts.values()]}, index=list(facts)))

st.subheader("Memory estimate")
c1, c2, c3 = st.columns(3)
seq_len = c1.number_input("Sequence length (prompt + generation)", 8, 8192, 128, step=8,
                          help="Positions per forward pass.")
steps = c2.number_input("Denoising steps", 1, 4096, 64, help="One attention record per step.")
calib = c3.number_input("Calibration tokens (samples × length)", 128, 1_000_000, 2048, step=128)
est = estimate(handle, int(seq_len), int(steps), calib_tokens=int(calib))
rows = {
    "model weights": est.weights, "capture record (steps × layers × heads × L, float32)": est.capture_record,
    "capture peak per forward (one query chunk)": est.capture_peak, "activations per forward": est.activations,
    "pruned variant (new block weights)": est.pruning_copy, "pruning calibration (one block)": est.pruning_calibration,
}
st.table(pd.DataFrame({"estimate": [human(v) for v in rows.values()]}, index=list(rows)))
