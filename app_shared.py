"""What serving many browsers adds to the app: the server's settings (:class:`~sap_core.serving.ServerSettings`,
read once), the server-wide stores (runs under a link, each session's work, the variants' memory budget),
the session id kept in the URL (``?sid=``), and shared mode's rules for what a page may show or write.

A session's id is its key to its work on the server: a reload or a new tab with the same ``?sid=`` finds
its trajectory and variants again (for :data:`sap_core.runs.SESSION_IDLE_S` seconds idle). A run's link
(``/explorer?run=ID&step=N``) carries no session id, so whoever opens it views the run in their own session.
"""

from __future__ import annotations

import contextlib
import io
import zipfile
from collections.abc import Iterator
from pathlib import Path

import streamlit as st

from sap_core.errors import SapError
from sap_core.memory import MemoryBudget, available, human, variant_bytes
from sap_core.runs import RunStore, Session, SessionStore
from sap_core.serving import DOWNLOAD_LIMIT, ServerSettings, without_paths

KEPT = ("trajectory", "trajectory_model", "trajectory_seconds", "trajectory_tokens", "trajectory_label", "trajectory_run")


@st.cache_resource(show_spinner=False)
def settings() -> ServerSettings:
    """The server's settings, read once from the environment ``sinkscope app`` set."""
    return ServerSettings.from_env()


def shared() -> bool:
    return settings().shared


@st.cache_resource(show_spinner=False)
def stores() -> tuple[RunStore, SessionStore]:
    """The server-wide run store and session store (one per server process, shared by every browser)."""
    import torch

    s = settings()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    free, _ = available(device)
    limit = int(s.memory_budget_gb * 1e9) if s.memory_budget_gb is not None else free // 2
    budget = MemoryBudget(limit, "GPU memory" if device == "cuda" else "RAM")
    runs = RunStore(directory=Path(s.runs_dir).resolve() / "shared-runs" if s.shared else None)
    return runs, SessionStore(budget)


def shown(exc: Exception | str) -> str:
    """An error (or a message) as a page may show it: without any server path in shared mode."""
    return without_paths(str(exc)) if shared() else str(exc)


def session() -> Session:
    """This browser session's work on the server (app.py calls it before every page): the id from the session,
    else from the URL's ``?sid=``, else a new one, written back to the URL (page switches drop the query);
    kept values missing from ``st.session_state`` (a reload, a new tab) are restored from the server; the
    Prune page's variants are the server's list itself; notices left while away are shown once."""
    sid = st.session_state.get("sid") or st.query_params.get("sid")
    found = stores()[1].session(sid)
    st.session_state["sid"] = found.id
    if st.query_params.get("sid") != found.id:
        st.query_params["sid"] = found.id
    for key in KEPT:
        if key not in st.session_state and key in found.state:
            st.session_state[key] = found.state[key]
    st.session_state["variants"] = found.variants
    while found.notices:
        st.warning(found.notices.pop(0), icon=":material/info:")
    return found


def keep_work() -> None:
    """Store this session's kept values on the server (after a generation), for a reload or another tab."""
    found = stores()[1].session(st.session_state.get("sid"))
    found.state.update({key: st.session_state[key] for key in KEPT if key in st.session_state})


def heavy_jobs_or_stop(what: str) -> None:
    """Stop a page whose jobs the host turned off (``--no-heavy-jobs``), saying so."""
    if not settings().heavy_jobs:
        st.info(f"{what} is turned off on this server by its host (heavy jobs are off).", icon=":material/block:")
        st.stop()


def check_heavy(what: str) -> None:
    """Refuse (one-line :class:`SapError`) a heavy job the host turned off (``--no-heavy-jobs``): for a page that
    keeps its light parts (Compare's perplexity) and disables the buttons of its heavy ones."""
    if not settings().heavy_jobs:
        raise SapError(f"{what} is turned off on this server by its host (heavy jobs are off).")


def check_caps(calibration_samples: int | None = None) -> None:
    """Refuse (one-line :class:`SapError`) a job over the host's caps."""
    cap = settings().max_calibration_samples
    if calibration_samples is not None and cap is not None and calibration_samples > cap:
        raise SapError(f"This server allows at most {cap} calibration samples; lower Calibration samples.")


@contextlib.contextmanager
def room_for(spec, handle) -> Iterator[None]:
    """``with room_for(spec, handle): ...prune, keep_variant...``: the memory the variant will hold (a bit per
    weight for a mask-only method, else a copy of the block linears) reserved in the server's budget before
    anything is allocated, or refused with what to drop; held until the variant is kept, given back if the block
    ends without it (an error, a Cancel, a page left)."""
    from sap_core.pruning.spec import STRUCTURED
    from sap_core.pruning.variant import target_linears

    n = sum(lin.weight.numel() for _, _, lin in target_linears(handle.module))
    mask_only = spec.method not in STRUCTURED and spec.row.statistic != "hessian"
    store, sid = stores()[1], st.session_state["sid"]
    store.reserve(sid, variant_bytes(n, handle.dtype.itemsize, mask_only))
    try:
        yield
    finally:
        store.release(sid)  # nothing once keep_variant kept it


def keep_variant(entry: dict, handle) -> dict:
    """Pack a mask-only variant (one bit per weight) and keep ``entry`` in this session within the budget."""
    from sap_core.pruning.variant import pack, resident_bytes

    entry["variant"] = pack(entry["variant"], handle)
    entry["bytes"] = resident_bytes(entry["variant"])
    stores()[1].add_variant(st.session_state["sid"], entry)
    return entry


def drop_button(entry: dict, column) -> None:
    """A button that drops this session's variant (frees its memory in the budget)."""
    if column.button("Drop", key=f"drop_{entry['name']}", icon=":material/delete:", help="Frees its memory on the server."):
        variants = st.session_state["variants"]
        if entry in variants:
            variants.remove(entry)
        st.rerun()


def save_shared(entry: dict, handle, column) -> None:
    """Shared mode's Save: under ``--runs`` with a name the server makes (no path asked or shown), then a zip
    download when the saved directory is at most :data:`~sap_core.serving.DOWNLOAD_LIMIT`."""
    if column.button("Save on the server", key=f"save_{entry['name']}", icon=":material/save:"):
        target = settings().saved_variant_dir(st.session_state["sid"], entry["name"])
        try:
            entry["variant"].save(target, handle, overwrite=True)
            entry["saved"] = target
        except SapError as exc:
            st.error(f"Saving failed: {shown(exc)}")
    target = entry.get("saved")
    if target is None:
        return
    size = sum(p.stat().st_size for p in Path(target).rglob("*") if p.is_file())
    column.success(f"Saved on the server as **{Path(target).name}** ({human(size)}).")
    if size <= DOWNLOAD_LIMIT:
        column.download_button(
            "Download (zip)",
            lambda: _zipped(Path(target)),
            file_name=f"{Path(target).name}.zip",
            mime="application/zip",
            on_click="ignore",
            key=f"zip_{entry['name']}",
        )
    else:
        column.caption(f"Too large to download here (over {human(DOWNLOAD_LIMIT)}); ask the host for it.")


def _zipped(directory: Path) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as z:
        for p in sorted(directory.rglob("*")):
            if p.is_file():
                z.write(p, p.relative_to(directory))
    return buffer.getvalue()


def open_linked_run(handle, readable_tokens) -> None:
    """The explorer's ``?run=ID``: put that stored run in this session as its current trajectory (once per id),
    to open at ``?step=``. Another session's run is read-only here: Generate makes a run of this session's own.
    A bad or unknown id is refused with a message that does not repeat it."""
    from app_common import model_choice

    run_id = st.query_params.get("run")
    if not run_id or run_id == st.session_state.get("trajectory_run"):
        return
    try:
        run = stores()[0].get(run_id)
    except SapError as exc:
        st.error(shown(exc))
        st.query_params.pop("run", None)
        return
    if run.source != model_choice()[0]:
        name = Path(run.source).name
        st.warning(f"This run was made with the model **{name}**: pick it in the sidebar to open the run.")
        return
    traj = run.trajectory
    st.session_state.update(
        trajectory=traj,
        trajectory_model=model_choice(),
        trajectory_seconds=float(traj.step_seconds.sum()),
        trajectory_tokens=readable_tokens(handle.decode, traj.final_tokens),
        trajectory_label=run.label,
        trajectory_run=run.id,
        run_opened=True,  # the explorer's view opens at ?step= rather than at step 0
    )
    st.session_state.pop("attention", None)
    keep_work()


def store_run(traj, label: str) -> None:
    """After a generation: store it under a new id (its link), put ``?run=`` in the URL, keep it for a reload."""
    from app_common import model_choice

    try:
        run_id = stores()[0].put(traj, model_choice()[0], label, st.session_state["sid"])
    except SapError as exc:
        st.warning(shown(exc))
        run_id = None
    st.session_state["trajectory_run"] = run_id
    if run_id:
        st.query_params["run"] = run_id
    keep_work()


def run_link(step: int) -> None:
    """The current run's link (``/explorer?run=ID&step=N``, no session id) to copy, and whose run it is."""
    run_id = st.session_state.get("trajectory_run")
    if not run_id:
        return
    try:
        run = stores()[0].get(run_id)
    except SapError:
        return
    if run.author != st.session_state.get("sid"):
        st.info(
            "Shared run by another session: you can view it, not change it; **Generate** makes a run of your own.",
            icon=":material/visibility:",
        )
    base = (st.context.url or "").split("?")[0].rsplit("/", 1)[0]
    with st.popover("Copy link", icon=":material/link:", help="A link that opens this run at this step in any browser."):
        st.code(f"{base}/explorer?run={run_id}&step={step}", language=None)
        st.caption("Copy it with the button at the code's right; it holds no session of yours (anyone with it views the run).")
