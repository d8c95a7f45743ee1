"""What every SinkScope page shares: the cached model, the active-model banner, progress and errors.

Pages only orchestrate: numbers come from ``sap_core`` and figures from ``sap_core.viz``.
Per-browser-session state (trajectories, reports, variants) lives in ``st.session_state``; the
dense model is shared through ``st.cache_resource`` and never changed (pruning makes variants).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import streamlit as st
import torch

from sap_core.errors import Cancelled, SapError
from sap_core.models import ModelHandle, load_model
from sap_core.sinks import SinkSpec


def default_model() -> str:
    """The model the app starts with: ``$SINKSCOPE_MODEL`` (a built-in name or a directory), else tiny-dlm."""
    return os.environ.get("SINKSCOPE_MODEL", "tiny-dlm")


def ar_model() -> str:
    """The causal model of the AR-vs-DLM panel: ``$SINKSCOPE_AR_MODEL``, else tiny-ar."""
    return os.environ.get("SINKSCOPE_AR_MODEL", "tiny-ar")


_LOADED: set[tuple[str, str, str]] = set()  # (source, device, dtype) loaded by this server process


@st.cache_resource(show_spinner=False, max_entries=4)
def cached_model(source: str, device: str, dtype: str) -> ModelHandle:
    """One loaded model per (source, device, dtype), shared by every browser session."""
    handle = load_model(source, device=device, dtype=dtype)
    _LOADED.add((source, device, dtype))
    return handle


def is_cached(source: str, device: str, dtype: str) -> bool:
    """Whether :func:`cached_model` has loaded this model before (so the app need not announce a wait)."""
    return (source, device, dtype) in _LOADED


MODEL_KINDS = ("Built-in DLM (tiny-dlm)", "Built-in AR twin (tiny-ar)", "Local directory")


def model_choice() -> tuple[str, str, str]:
    """The (source, device, dtype) selected by the sidebar widgets (their session-state keys)."""
    kind = st.session_state.get("model_kind", MODEL_KINDS[0])
    if kind == MODEL_KINDS[2]:
        source = (st.session_state.get("model_path") or "").strip() or default_model()
    else:
        source = default_model() if kind == MODEL_KINDS[0] else ar_model()
    return source, st.session_state.get("device", "auto"), st.session_state.get("dtype", "auto")


def active_model() -> ModelHandle:
    """The selected model; if it cannot be loaded, show the loader's message and stop this page."""
    source, device, dtype = model_choice()
    try:
        handle = cached_model(source, device, dtype)
    except SapError as exc:
        st.error(f"Could not load the model: {exc}")
        st.info("Pick the built-in model in the sidebar, or fix the path.")
        st.stop()
    st.caption(
        f"Active model: **{handle.name}** · {handle.family}{' (causal)' if handle.causal else ''} · "
        f"{handle.n_params / 1e6:.1f}M parameters · {handle.device} · {str(handle.dtype).replace('torch.', '')}"
    )
    return handle


def sink_spec() -> SinkSpec:
    """The app's one source of sink settings: those chosen on the Sink stability page, else the core
    default ``SinkSpec()`` (the official rule, tau = 0). The explorer, Prune and Compare's sweep use it."""
    return st.session_state.get("sink_spec", SinkSpec())


def progress_callback(bar, label: str):
    def update(done: int, total: int, message: str) -> None:
        bar.progress(min(done / max(total, 1), 1.0), text=f"{label}: {message} ({done}/{total})")

    return update


class CancelButton:
    """A Cancel button enabled only while this page's job runs. Clicking it reruns the page, which stops the
    running script at its next Streamlit call (the job's context managers restore the dense weights);
    :attr:`cancelled` is True on the run that follows a click, for the page's message.

        cancel = CancelButton("prune")          # where the button sits
        if cancel.cancelled: st.warning(...)
        if submitted:
            cancel.running("Stops ...")
            ...the job...
        cancel.idle()
    """

    def __init__(self, key: str) -> None:
        self.key = key
        self.slot = st.empty()
        self.cancelled = bool(st.session_state.pop(f"{key}_cancelled", False))
        self._ran = False

    def _click(self) -> None:
        st.session_state[f"{self.key}_cancelled"] = True

    def running(self, help: str) -> None:
        self._ran = True
        self.slot.button(
            "Cancel", key=f"{self.key}_cancel_running", on_click=self._click, icon=":material/stop_circle:", help=help
        )

    def idle(self) -> None:
        """Disabled again (after the job, or when none ran); a widget key of its own per case, as both may be drawn in one run."""
        key = f"{self.key}_cancel_{'done' if self._ran else 'idle'}"
        self.slot.button("Cancel", key=key, disabled=True, icon=":material/stop_circle:", help="Nothing is running.")


@contextlib.contextmanager
def job(label: str) -> Iterator[None]:
    """Run a long job: errors become a message on the page and the app stays usable."""
    try:
        yield
    except Cancelled:
        st.warning(f"{label} was cancelled; nothing was changed.")
    except torch.OutOfMemoryError:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        st.error(
            f"{label} ran out of GPU memory. Try a shorter sequence, fewer steps or samples, "
            "or a smaller dtype (bfloat16); the dense model is unchanged."
        )
    except SapError as exc:
        st.error(f"{label} failed: {exc}")


def current_trajectory(handle: ModelHandle, key: str = "trajectory"):
    """The trajectory this session generated with the active model, or None."""
    if st.session_state.get(f"{key}_model") != model_choice():
        return None
    return st.session_state.get(key)


def report_for(trajectory, spec: SinkSpec):
    """Sink analysis of a stored trajectory; recomputed only when the trajectory or the spec changes
    (the mass reduction itself is cached in ``sap_core.sinks``), never by rerunning the model."""
    from sap_core.sinks import analyze

    cache = st.session_state.setdefault("report_cache", {})
    key = (id(trajectory), spec)
    if key not in cache:
        if len(cache) > 8:
            cache.clear()
        cache[key] = analyze(trajectory, spec)
    return cache[key]


def token_texts(handle: ModelHandle, ids) -> list[str]:
    """Readable text of each token id (whitespace made visible)."""
    return [handle.decode([int(i)]).replace("\n", "⏎").replace(" ", "␣") for i in ids]


def method_settings(variant):
    """The settings a pruned variant's method actually uses, labelled for people (one-column DataFrame):
    no calibration for magnitude, the noising and sink rule only for the noised methods, tau only for the
    gated ones, SparseGPT's block size and dampening only for the SparseGPT family."""
    import pandas as pd

    spec, cal, sink = variant.spec, variant.spec.calibration, variant.spec.sink
    rows = {"method": spec.method, "pattern": spec.pattern}
    if spec.nm is None:
        rows["target sparsity"] = f"{spec.sparsity:.2f}"
    rows["achieved sparsity (pruned layers)"] = f"{variant.achieved_sparsity:.3f}"
    if spec.needs_calibration:
        rows["calibration"] = f"{cal.nsamples} windows × {cal.seqlen} tokens, seed {cal.seed}"
    if spec.row.needs_noise:
        rows["noised timesteps"] = f"t = {cal.interval}, {2 * cal.interval}, …, {cal.T} of T = {cal.T} (mask probability t/T)"
        rows["sink rule"] = (
            f"official: k = {sink.k:g}, alpha = {sink.alpha:g}"
            if sink.rule == "official"
            else f"leave_one_out: ε = {sink.epsilon:g}"
        )
    if spec.row.gated:
        rows["variance threshold tau"] = f"{sink.tau:g}"
    if spec.row.statistic == "hessian":
        rows["SparseGPT block size / dampening"] = f"{spec.blocksize} columns / {spec.percdamp:g}"
    rows["time"] = f"{variant.seconds:.1f} s"
    return pd.DataFrame({"value": list(rows.values())}, index=list(rows))


def eval_spec(**changes):
    """The app's perplexity settings: the sweep's :class:`~sap_core.sweep.EvalSpec` defaults with
    ``changes`` (windows, draws) applied. The Compare page's perplexity table and its sweep both use it."""
    from dataclasses import replace

    from sap_core.sweep import EvalSpec

    return replace(EvalSpec(), **changes)


def stored_caption(entry: dict, failed: bool) -> None:
    """Say which run a stored result came from; after a failed run, say that it is the earlier one."""
    prefix = "From an earlier run (the last run failed): " if failed else "From the last run: "
    st.caption(prefix + entry["label"], help="Stored in this browser session until a new run succeeds.")
