"""What every SinkScope page shares: the cached model, the active-model banner, progress and errors.

Pages only orchestrate: numbers come from ``sap_core`` and figures from ``sap_core.viz``.
Per-browser-session state (trajectories, reports, variants) lives in ``st.session_state``; the
dense model is shared through ``st.cache_resource`` and never changed (pruning makes variants).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import streamlit as st


def through_the_app() -> None:
    """Send a run that Streamlit started in its page-folder mode back through app.py.

    Streamlit (1.67) runs a page script on its own, listing ``pages/*.py`` by file name, while its
    process-wide flag ``PagesManager.uses_pages_directory`` is still set: from the server's start until some
    run of app.py reaches ``st.navigation``. So a first visitor who opens ``/explorer`` (or clicks during a
    cold start) gets a page without app.py's sidebar, model choice or settings. Every page imports this
    module and calls :func:`active_model`, so both check here: in folder mode the registered pages include
    app.py itself; clear the flag (this run is the last one in folder mode) and rerun this page, which now
    goes through app.py's ``st.navigation`` with the same URL and query string.
    """
    from streamlit import config
    from streamlit.runtime.pages_manager import PagesManager
    from streamlit.runtime.scriptrunner import get_script_run_ctx

    ctx = get_script_run_ctx()
    if ctx is None or config.get_option("global.appTest"):  # outside a server (the CLI; AppTest resets the flag every run)
        return
    main = Path(ctx.pages_manager.main_script_path).resolve()
    pages = ctx.pages_manager.get_pages().values()
    if len(pages) > 1 and any(p.get("script_path") and Path(p["script_path"]).resolve() == main for p in pages):
        PagesManager.uses_pages_directory = False
        st.rerun()


through_the_app()  # before the heavy imports below (torch takes seconds): the rerun paints app.py's sidebar at once

import torch  # noqa: E402

import app_shared  # noqa: E402
from sap_core.decoding import DREAM_ALGS, REMASKING, decoding_controls  # noqa: E402
from sap_core.detectors import DETECTORS, parse_detector  # noqa: E402
from sap_core.errors import Cancelled, SapError  # noqa: E402
from sap_core.models import ModelHandle, load_model  # noqa: E402
from sap_core.pruning.variant import weights_fingerprint, weights_restored  # noqa: E402
from sap_core.scheduler import scheduler_for  # noqa: E402
from sap_core.sinks import SinkSpec  # noqa: E402


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


MODEL_KINDS = ("Built-in DLM (tiny-dlm)", "Built-in AR twin (tiny-ar)", "Local directory")  # the sidebar's keys


def model_kind_label(kind: str) -> str:
    """What the sidebar shows for a model kind: the model it loads, which the host may have set
    (``$SINKSCOPE_MODEL``, ``$SINKSCOPE_AR_MODEL``) in place of a built-in one."""
    source = {MODEL_KINDS[0]: default_model(), MODEL_KINDS[1]: ar_model()}.get(kind)
    if source is None or source in ("tiny-dlm", "tiny-ar"):
        return kind
    name = Path(source).name or source
    return f"This server's model ({name})" if kind == MODEL_KINDS[0] else f"This server's AR model ({name})"


def model_choice() -> tuple[str, str, str]:
    """The (source, device, dtype) selected by the sidebar widgets (their session-state keys). In shared mode
    the model is a name the server offers (``model_name``), never a path."""
    kind = st.session_state.get("model_kind", MODEL_KINDS[0])
    if app_shared.shared():
        name = st.session_state.get("model_name", "tiny-dlm")
        source = app_shared.settings().source_of(name if name in app_shared.settings().model_names() else "tiny-dlm")
    elif kind == MODEL_KINDS[2]:
        source = (st.session_state.get("model_path") or "").strip() or default_model()
    else:
        source = default_model() if kind == MODEL_KINDS[0] else ar_model()
    return source, st.session_state.get("device", "auto"), st.session_state.get("dtype", "auto")


# The guided start: the pages in the order of the story (the landing page links them all in this order,
# and every page ends with a link to the next one). (page file, URL path, title, icon, what it shows.)
STORY = (
    ("pages/model.py", "", "Model", ":material/memory:", "the loaded model, its facts and the memory a run needs"),
    (
        "pages/explorer.py",
        "explorer",
        "Denoising explorer",
        ":material/animation:",
        "generate a text and watch its sinks move, step by step",
    ),
    (
        "pages/stability.py",
        "stability",
        "Sink stability",
        ":material/balance:",
        "which sinks stay put and which move: the sink rule and tau",
    ),
    (
        "pages/ar_vs_dlm.py",
        "ar_vs_dlm",
        "AR vs DLM",
        ":material/swap_horiz:",
        "the paper's premise: an autoregressive model's sink sits still",
    ),
    (
        "pages/prune.py",
        "prune",
        "Prune",
        ":material/content_cut:",
        "make pruned variants, sink-aware or not (the dense model is kept)",
    ),
    (
        "pages/tau.py",
        "tau",
        "Pick tau",
        ":material/tune:",
        "what the gated methods' variance gate sees, and which tau prunes best",
    ),
    (
        "pages/compare.py",
        "compare",
        "Compare",
        ":material/compare_arrows:",
        "the variants against the dense model: generations, perplexity, sweeps",
    ),
)


def next_link(url_path: str) -> None:
    """The guided start's "next" link at the end of the page ``url_path`` (app.py draws it after every
    page that runs to its end): the next page of :data:`STORY`; the last one leads back to the start."""
    paths = [s[1] for s in STORY]
    if url_path not in paths:
        return
    i = paths.index(url_path)
    file, _, title, icon, what = STORY[(i + 1) % len(STORY)]
    st.divider()
    label = f"**Back to the start · {title}**: {what}" if i == len(STORY) - 1 else f"**Next · {title}**: {what}"
    st.page_link(file, label=label, icon=icon if i < len(STORY) - 1 else ":material/restart_alt:")


def context_of(handle: ModelHandle) -> int:
    """The model's context in tokens (:attr:`ModelHandle.max_length`; 4096 when its config does not say):
    the upper bound of the app's length inputs, so a length the model cannot take is never offered."""
    return int(handle.max_length or 4096)


def kept(key: str) -> dict:
    """A form widget's keyword arguments (``**kept("prune_seed")``): a key whose value survives a page
    switch. Streamlit drops the state of widgets a run did not draw; ``persist_state="session"`` keeps it."""
    return {"key": key, "persist_state": "session"}


def active_model() -> ModelHandle:
    """The selected model; if it cannot be loaded, show the loader's message and stop this page."""
    through_the_app()
    source, device, dtype = model_choice()
    try:
        handle = cached_model(source, device, dtype)
    except SapError as exc:
        st.error(f"Could not load the model: {app_shared.shown(exc)}")
        st.info("Pick the built-in model in the sidebar, or fix the path.")
        st.stop()
    st.caption(
        f"Active model: **{handle.name}** · {handle.family}{' (causal)' if handle.causal else ''} · "
        f"{handle.n_params / 1e6:.1f}M parameters · {handle.device} · {str(handle.dtype).replace('torch.', '')}"
    )
    interrupted_notice()
    return handle


def sink_spec() -> SinkSpec:
    """The app's one source of sink settings: those chosen on the Sink stability page, else the core
    default ``SinkSpec()`` (the official rule, tau = 0). The explorer, Prune and Compare's sweep use it."""
    return st.session_state.get("sink_spec", SinkSpec())


def detector_choice(cols, current: str) -> str:
    """The app's one sink-detector control (the Sink stability page and the explorer draw it): a detector in
    ``cols[0]``, its parameter in ``cols[1]``, opening at ``current`` (the app's detector text, ``NAME[:PARAM]``).
    Returns the chosen ``NAME:PARAM`` text ("official" for the official rule, which takes the k and alpha of
    the sink settings); an out-of-range parameter is refused when a :class:`SinkSpec` is built from it."""
    now = parse_detector(current)
    name = cols[0].selectbox(
        "Detector",
        list(DETECTORS),
        index=list(DETECTORS).index(now.name),
        format_func=lambda n: DETECTORS[n].title,
        key="sink_detector_name",
        help="Which published definition of a sink scores the record (docs/sinks.md). The official rule uses the "
        "sliders of the Sink stability page (k, alpha); the others their own parameter ε.",
    )
    chosen = DETECTORS[name]
    param = cols[1].number_input(
        f"{chosen.symbol} ({name})",
        value=now.param if name == now.name and name != "official" else chosen.default,
        step=0.05 if chosen.default < 1 else 0.5,
        format="%.2f",
        key=f"sink_detector_{name}",
        disabled=name == "official",
        help="gu, head: mean attention per query (0..1); rulli: multiple of uniform attention. Official: use k.",
    )
    return "official" if name == "official" else f"{name}:{param}"


def progress_callback(bar, label: str, unit: str | None = None):
    """``progress(done, total, message)`` drawn on ``bar``: the count with its ``unit`` ("(40/256 steps)"), or, for a
    job whose count mixes kinds of work (calibration passes and blocks, a sweep's rows), the share done ("(16 %)")."""

    def update(done: int, total: int, message: str) -> None:
        share = min(done / max(total, 1), 1.0)
        count = f"{done}/{total} {unit}" if unit else f"{share:.0%}"
        bar.progress(share, text=f"{label}: {message} ({count})")

    return update


def duration(seconds: float) -> str:
    """An estimated time in words: "under a second", "40 s", "2.5 min" (the cost lines of Benchmarks and AR vs DLM)."""
    if seconds < 1:
        return "under a second"
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


def longest_generation(handle: ModelHandle) -> int:
    """The most tokens a page lets this model generate: its context (:func:`context_of`) less the one token a
    prompt takes at least, and at most the server's ``max_gen_length``. The explorer and Compare both use it."""
    return min(context_of(handle) - 1, app_shared.settings().max_gen_length or 4096)


def length_help(handle: ModelHandle) -> str:
    """The one sentence on that bound, the same on every page."""
    longest = longest_generation(handle)
    if handle.max_length is None:
        return f"at most {longest} (this model's config states no context length)"
    return (
        f"at most {longest}: the prompt (one token or more) and the generated tokens share the model's context of "
        f"{context_of(handle)} tokens"
    )


class CancelButton:
    """A Cancel button enabled only while this page's job runs. Clicking it reruns the page, which stops the
    running script at its next Streamlit call (the job's context managers restore the dense weights);
    :attr:`cancelled` is True on the run that follows a click, for the page's message. Each job has its own.

        cancel = CancelButton("prune", handle)  # where the button sits
        cancel.notice("Pruning", "no variant was made")
        if submitted:
            cancel.running("Stops ...")         # takes the dense weights' fingerprint first
            ...the job...
        cancel.idle()
    """

    def __init__(self, key: str, handle: ModelHandle | None = None) -> None:
        self.key = key
        self.handle = handle
        self.slot = st.empty()
        self.cancelled = bool(st.session_state.pop(f"{key}_cancelled", False))
        self._ran = False

    def _click(self) -> None:
        st.session_state[f"{self.key}_cancelled"] = True
        _runs().pop(st.session_state.get(_PAGE), None)  # cancelled, not interrupted: the page says so itself

    def running(self, help: str) -> None:
        self._ran = True
        if self.handle is not None:  # what notice() compares with after a cancel
            st.session_state[f"{self.key}_dense"] = weights_fingerprint(self.handle)
        self.slot.button(
            "Cancel", key=f"{self.key}_cancel_running", on_click=self._click, icon=":material/stop_circle:", help=help
        )

    def notice(self, what: str, kept: str) -> None:
        """After a cancel: say that ``what`` was cancelled, that ``kept`` (e.g. "no result was kept"), and whether
        the model's weights are those taken before the job (checked, with a handle: :func:`weights_restored`)."""
        if not self.cancelled:
            return
        if self.handle is None:
            st.warning(f"{what} cancelled; {kept}.")
        elif weights_restored(self.handle, st.session_state.get(f"{self.key}_dense")):
            st.warning(f"{what} cancelled; {kept}, and the model's weights match those before it ran (dense, unchanged).")
        else:
            st.error(f"{what} cancelled, but the model's weights differ from those before it ran: reload the model.")

    def idle(self) -> None:
        """Disabled again (after the job, or when none ran); a widget key of its own per case, as both may be drawn in one run."""
        key = f"{self.key}_cancel_{'done' if self._ran else 'idle'}"
        self.slot.button("Cancel", key=key, disabled=True, icon=":material/stop_circle:", help="Nothing is running.")


_PAGE, _RUNNING = "_sinkscope_page", "_sinkscope_running"  # session-state keys: the page shown, the jobs running


def _runs() -> dict[str, dict]:
    """The job running on each page, by page: a page's own job never overwrites another page's marker
    (Compare's cost estimate runs as a job on every visit, after a prune left on the Prune page)."""
    return st.session_state.setdefault(_RUNNING, {})


def note_page(page: str) -> None:
    """Record the page this run shows (app.py calls this before each page). A job still marked as running
    on another page was stopped by this switch: mark it as left, for :func:`interrupted_notice`."""
    st.session_state[_PAGE] = page
    for shown, run in _runs().items():
        if shown != page:
            run["left"] = True


def interrupted_notice() -> None:
    """Say on a page that its last job was interrupted (:func:`active_model` calls this under the header), or
    that it left the queue (its Cancel, :func:`queued_job`).

    Streamlit stops a running script when the user switches pages (or changes a widget), so a job left
    mid-way leaves :func:`job`'s marker behind; back on the job's page, the notice says what happened and
    the marker goes. The form values survive the switch (:func:`kept`), so "run it again" is one click.
    """
    left = st.session_state.pop(_LEFT_QUEUE, None)
    if left is not None:
        st.info(left, icon=":material/stop_circle:")
    run = _runs().pop(st.session_state.get(_PAGE), None)
    if run is None:
        return
    how = "by leaving the page" if run["left"] else "by a change made while it ran"
    st.warning(
        f"{run['label']} was interrupted {how}, so nothing from it was kept; your settings are kept below: run it again.",
        icon=":material/replay:",
    )


@contextlib.contextmanager
def job(label: str) -> Iterator[None]:
    """Run a long job: errors become a message on the page and the app stays usable. While it runs, a
    marker in the session says so; a job that Streamlit stops mid-way (a page switch, a rerun) leaves the
    marker for :func:`interrupted_notice`."""
    from streamlit.runtime.scriptrunner_utils.exceptions import ScriptControlException

    page = st.session_state.get(_PAGE)
    _runs()[page] = {"label": label, "left": False}
    stopped = False
    try:
        yield
    except ScriptControlException:
        stopped = True
        raise
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
        st.error(f"{label} failed: {app_shared.shown(exc)}")
    finally:
        if not stopped:
            _runs().pop(page, None)


_LEFT_QUEUE = "_sinkscope_left_queue"  # session-state key: the notice of a job cancelled from the queue


def queued_generation(handle: ModelHandle, prompt, spec, recorder, bar, label: str = "Generating", unit: str | None = "steps"):
    """A generation through the model's queue (:mod:`sap_core.scheduler`): decoded with the other sessions'
    generations that arrive with it, as one batch. Returns the trajectory (see :func:`queued_job`)."""
    queue = scheduler_for(handle)
    return _wait(queue, queue.generate(prompt, spec, recorder, owner=st.session_state.get("sid"), label=label), bar, True, unit)


def queued_job(handle: ModelHandle, label: str, work, bar, cancel: bool = True, unit: str | None = None):
    """A heavy job (``work(progress)``: prune, sweep, evaluation) through the model's queue: one at a time on the
    device. While it waits, the page says its place and the estimated wait; the progress bar follows it once it
    runs; ``cancel`` draws a Cancel button (a page with its own :class:`CancelButton` passes False). The job
    leaves the queue when the script stops: a Cancel, a page switch, a closed tab (Streamlit stops the script at
    its next call, and the ``finally`` cancels the ticket). Returns the job's result; raises its error."""
    queue = scheduler_for(handle)
    return _wait(queue, queue.heavy(work, owner=st.session_state.get("sid"), label=label), bar, cancel, unit)


SHOW_EVERY = 0.5  # s: a waiting page is told its place or progress at most this often, and only when it changed:
# every message costs the student's browser a redraw (bench/classroom.py: the clients' CPU outweighs the server's)


def _wait(queue, ticket, bar, cancel: bool, unit: str | None):
    def leave() -> None:
        st.session_state[_LEFT_QUEUE] = f"{ticket.label} was cancelled; it left the queue and nothing was kept."
        _runs().pop(st.session_state.get(_PAGE), None)

    place, stop = st.empty(), st.empty()  # both cleared when the job ends: no Cancel stays behind
    if cancel:
        stop.button("Cancel", key=f"queue_cancel_{ticket.kind}", on_click=leave, icon=":material/stop_circle:")
    draw = progress_callback(bar, ticket.label, unit)
    told, shown = None, None  # what the page says now: the place, the progress
    try:
        while True:
            # reading the session state is a Streamlit yield point that sends nothing: a Cancel, a page switch or a
            # closed tab stops the script here
            _ = _PAGE in st.session_state
            if ticket.state == "queued":
                status = queue.status(ticket)
                if status != told:
                    told = status
                    place.info(told, icon=":material/hourglass_top:")
            else:
                if told is not None:
                    told = None
                    place.empty()
                if ticket.progress != shown:
                    shown = ticket.progress
                    draw(*shown)
            if ticket.wait(SHOW_EVERY):
                return ticket.outcome()
    finally:
        queue.cancel(ticket)  # nothing once it ended; otherwise it leaves the queue (or its batch)
        place.empty()
        stop.empty()


def current_trajectory(handle: ModelHandle, key: str = "trajectory"):
    """The trajectory this session generated with the active model, or None."""
    if st.session_state.get(f"{key}_model") != model_choice():
        return None
    return st.session_state.get(key)


STABILITY_RUN = "stability_run"  # (id of the dense run, the variant's trajectory, words, variant): app_lab sets it


def stability_run(handle: ModelHandle) -> tuple[object | None, str, str | None]:
    """The run the Sink stability page re-scores, the words that say which, and the variant it is of ("wanda 50%,
    replayed"; None for the dense run): the explorer's variant run while the explorer shows a variant of this
    session's stored run (app_lab.shown_runs), else that run ("the run")."""
    traj = current_trajectory(handle)
    kept = st.session_state.get(STABILITY_RUN)
    if traj is not None and kept is not None and kept[0] == id(traj):
        return kept[1], kept[2], kept[3]
    return traj, "the run", None


def report_for(trajectory, spec: SinkSpec):
    """Sink analysis of a stored trajectory; recomputed only when the trajectory or the spec changes
    (the mass reduction itself is cached in ``sap_core.sinks``), never by rerunning the model."""
    from sap_core.sink_report import analyze

    cache = st.session_state.setdefault("report_cache", {})
    key = (id(trajectory), spec)
    if key not in cache:
        if len(cache) > 8:
            cache.clear()
        cache[key] = analyze(trajectory, spec)
    return cache[key]


def calibration_control(columns, handle: ModelHandle, prefix: str, samples_help: str, length_help: str):
    """The calibration inputs (samples, length, seed) in three ``columns`` of a form, with the defaults of
    :class:`~sap_core.pruning.CalibrationSpec` (the length capped by the model's context); each widget's
    state is kept under ``{prefix}_nsamples``, ``{prefix}_seqlen``, ``{prefix}_seed``. Returns the spec."""
    from sap_core.pruning import CalibrationSpec

    default = CalibrationSpec()
    nsamples = columns[0].number_input(
        "Calibration samples", 1, 1024, default.nsamples, help=samples_help, **kept(f"{prefix}_nsamples")
    )
    seqlen = columns[1].number_input(
        "Calibration length",
        8,
        context_of(handle),
        min(default.seqlen, context_of(handle)),
        help=length_help,
        **kept(f"{prefix}_seqlen"),
    )
    seed = columns[2].number_input("Calibration seed", 0, 2**31 - 1, default.seed, **kept(f"{prefix}_seed"))
    return CalibrationSpec(nsamples=int(nsamples), seqlen=int(seqlen), seed=int(seed))


def eval_spec(**changes):
    """The app's perplexity settings: the sweep's :class:`~sap_core.evaluate.EvalSpec` defaults with
    ``changes`` (windows, draws) applied. The Compare page's perplexity table and its sweep both use it."""
    from dataclasses import replace

    from sap_core.evaluate import EvalSpec

    return replace(EvalSpec(), **changes)


def stored_caption(entry: dict, failed: bool) -> None:
    """Say which run a stored result came from; after a failed run, say that it is the earlier one."""
    prefix = "From an earlier run (the last run failed): " if failed else "From the last run: "
    st.caption(prefix + entry["label"], help="Stored in this browser session until a new run succeeds.")


# --- the decoding controls: the family's options (sap_core.decoding.decoding_controls), drawn ----------------

SAMPLER_NAMES = {"dream": "Dream's own", "llada": "LLaDA's (not Dream's own)"}


def sampler_choice(handle: ModelHandle) -> str | None:
    """The sampler a Dream model decodes with, chosen outside the decoding form (so the options drawn by
    :func:`decoding_options` follow the choice at once); None for a family that offers no choice."""
    controls = decoding_controls(handle.family, handle.causal)
    if not controls.samplers:
        return None
    return st.radio(
        "Sampler",
        controls.samplers,
        format_func=SAMPLER_NAMES.__getitem__,
        horizontal=True,
        help="Dream's own diffusion_generate (its timestep schedule and alg), or the LLaDA-style sampler "
        "(blocks, an even split of tokens per step), which Dream itself never runs.",
        **kept("decode_sampler"),
    )


def decoding_options(handle: ModelHandle, sampler: str | None, gen_length: int, row, limit: int) -> dict:
    """Draw, inside the decoding form, the options :func:`~sap_core.decoding.decoding_controls` gives the model's
    family and ``sampler`` (steps and the two next options in ``row``, three columns; the rest below); returns
    :class:`~sap_core.decoding.DecodeSpec`'s keyword arguments for ``gen_length`` tokens."""
    controls = decoding_controls(handle.family, handle.causal, sampler)
    shown = set(controls.fields)
    out = dict(gen_length=gen_length, sampler=sampler)
    out["steps"] = row[0].number_input(
        "Steps",
        1,
        limit,
        min(64, limit),
        help="Denoising steps in all. Dream's sampler: any number (it may exceed or not divide the length). "
        "LLaDA's: must divide evenly over the blocks and be at most the generation length. A causal model "
        "uses one step per token.",
        disabled=handle.causal,
        **kept("decode_steps"),
    )
    if "block_length" in shown:
        out["block_length"] = row[1].number_input(
            "Block length",
            1,
            limit,
            min(16, limit),
            help="Semi-autoregressive blocks, filled left to right; must divide the generation length.",
            **kept("decode_block_length"),
        )
        out["remasking"] = row[2].selectbox(
            "Remasking",
            controls.remasking,
            help="Which masked positions are unmasked first: most confident, random, or lowest entropy.",
            **kept("decode_remasking" if controls.remasking == REMASKING else f"decode_remasking_{controls.sampler}"),
        )
    if "alg" in shown:
        out["alg"] = row[1].selectbox(
            "Alg",
            DREAM_ALGS,
            index=DREAM_ALGS.index("entropy"),
            help="Dream's order of unmasking: origin (random positions), maskgit_plus (most probable token), "
            "topk_margin (largest top-2 margin), entropy (lowest entropy).",
            **kept("decode_alg"),
        )
        out["alg_temp"] = row[2].number_input(
            "Alg temperature",
            0.0,
            10.0,
            0.0,
            help="0 unmasks the most confident positions; above 0 draws them from softmax(confidence / alg_temp).",
            **kept("decode_alg_temp"),
        )
    if handle.causal:
        out["steps"] = out["block_length"] = gen_length
        row[1].caption(controls.note)
    c = st.columns(5 if controls.sampler == "dream" else 3)
    out["temperature"] = c[0].slider(
        "Temperature",
        0.0,
        2.0,
        0.8,
        0.05,
        help="0 = greedy; Gumbel-max sampling in float64 otherwise.",
        **kept("decode_temperature"),
    )
    if "cfg_scale" in shown:
        out["cfg_scale"] = c[1].number_input(
            "CFG scale",
            0.0,
            20.0,
            0.0,
            help="Classifier-free guidance; the unconditional pass masks the prompt. 0 = off.",
            **kept("decode_cfg_scale"),
        )
    if controls.sampler == "dream":
        out["block_length"] = gen_length  # one block: Dream's sampler has none
        out["eps"] = c[1].number_input(
            "eps", 1e-5, 0.5, 1e-3, format="%g", help="Final time of linspace(1, eps, steps + 1).", **kept("decode_eps")
        )
        out["top_p"] = c[2].number_input(
            "top_p", 0.01, 1.0, 1.0, help="Nucleus filtering of the token draw; 1 = off.", **kept("decode_top_p")
        )
        out["top_k"] = c[3].number_input(
            "top_k", 0, 1_000_000, 0, help="Keep the k most probable tokens; 0 = off.", **kept("decode_top_k")
        )
    out["seed"] = c[-1].number_input(
        "Seed", 0, 2**31 - 1, 0, help="Same seed and settings give the same trajectory.", **kept("decode_seed")
    )
    if "text_only" in shown:
        out["text_only"] = st.checkbox(
            "Text tokens only",
            help="MMaDA picks over its whole vocabulary, image-codebook rows included, as its own code does; "
            "this restricts the pick to the text rows.",
            **kept("decode_text_only"),
        )
    if controls.note and not handle.causal:
        st.caption(controls.note)
    return out
