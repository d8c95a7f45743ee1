"""The denoising run as a moving picture: a self-contained page that steps through the run in the
browser (the explorer's view and the HTML export), an animated GIF, and tables of the sinks with
their token texts.

Everything here is a pure function of a :class:`sap_core.sink_report.SinkReport` and the token texts of
its final sequence (:func:`readable_tokens`); no model is run. The page carries every step once
and draws it on a canvas with its own slider and play/pause (``static/explorer.html``), so moving
through the steps asks nothing of the server. Plotly animation frames were tried first: each step
is a full plotly redraw, measured at 400-900 ms per step in Chromium here, against a few ms for
the canvas (``bench/browser_latency.py``).

Mass is shown as a multiple of the uniform mass of its step (1 = every valid position receives the
same), like every mass figure in :mod:`sap_core.viz`, sent as one byte per value.
"""

from __future__ import annotations

import base64
import bisect
import html as html_lib
import io
import json
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFont

from sap_core.errors import SapError
from sap_core.files import atomic_write_bytes
from sap_core.models import load_tokenizer, read_config, resolve_source
from sap_core.sinks import STATES
from sap_core.viz import MASS_SCALE, STATE_COLORS, uniform_multiple

COLOR_RANGES = ("global99", "global", "per-step")
COLOR_RANGE_NAMES = {
    "global99": "fixed: 99th percentile of all steps",
    "global": "fixed: maximum of all steps",
    "per-step": "per step (not comparable across steps)",
}
LABEL_PX = 13  # font size of the view's token labels: readable from the back of a room (every k-th position past ~14 px a cell)
# Mass values (steps x (layers + 1) x positions, one byte each) the browser view carries at most: about
# 16 MB of page once base64-encoded. A longer run is shown at every k-th step (the last step always).
MAX_VIEW_VALUES = 12_000_000
# Per-head mass values (steps x layers x heads x positions) the head grid carries at most (about 8 MB of page);
# beyond it the grid is carried at every k-th carried step (and the last), and shows the one at or before the view's step.
MAX_HEAD_VALUES = 6_000_000


class AnimationSpecError(SapError):
    """Impossible settings for the animated figure or its exports."""


@dataclass(frozen=True)
class AnimationSpec:
    """How the run is animated.

    * ``color_range``: ``"global99"`` (default; the colour scale ends at the 99th percentile of the
      mass over all steps, so steps are comparable and one huge sink does not wash the rest out),
      ``"global"`` (the maximum over all steps) or ``"per-step"`` (each step its own range).
    * ``layer``: the layer of the step × position map (None: all analysed layers summed).
    * ``frame_ms``: time per frame when playing (figure and GIF).
    """

    color_range: str = "global99"
    layer: int | None = None
    frame_ms: int = 80

    def __post_init__(self) -> None:
        if self.color_range not in COLOR_RANGES:
            raise AnimationSpecError(f"color_range must be one of {', '.join(COLOR_RANGES)} (got '{self.color_range}').")
        if not 20 <= int(self.frame_ms) <= 5000:
            raise AnimationSpecError(f"frame_ms must be between 20 and 5000 ms (got {self.frame_ms}).")


def readable_tokens(decode: Callable[[list[int]], str], ids: Sequence[int]) -> list[str]:
    """Text of each token id with newlines and spaces made visible (``⏎``, ``␣``)."""
    return [decode([int(i)]).replace("\n", "⏎").replace(" ", "␣") for i in ids]


def tokenizer_texts(source: str | Path, ids: Sequence[int]) -> list[str]:
    """:func:`readable_tokens` with the tokenizer of a model directory or built-in name (weights are not loaded)."""
    path = resolve_source(source)
    tokenizer = load_tokenizer(path, read_config(path).get("model_type"))
    return readable_tokens(lambda i: tokenizer.decode(i, skip_special_tokens=False), ids)


def _check_tokens(report, tokens: Sequence[str] | None) -> list[str]:
    if tokens is None:
        return [str(int(t)) for t in report.final_tokens]
    if len(tokens) != report.length:
        raise AnimationSpecError(
            f"got {len(tokens)} token texts for a {report.length}-position run; pass the texts of the trajectory's final tokens."
        )
    return list(tokens)


def _layer_index(report, layer: int | None) -> int | None:
    if layer is None:
        return None
    if layer not in report.layers:
        raise AnimationSpecError(f"layer {layer} was not analysed; pick one of {list(report.layers)} or all layers.")
    return list(report.layers).index(layer)


def step_mass(report) -> np.ndarray:
    """``float64 [S, L]``: aggregate mass of every step as a multiple of uniform (NaN where absent)."""
    return uniform_multiple(report.mass.astype(np.float64), report.valid)


def layer_step_mass(report) -> np.ndarray:
    """``float64 [S, layers, L]``: per-layer mass of every step as a multiple of uniform (NaN where absent)."""
    return uniform_multiple(report.layer_mass.astype(np.float64), report.valid[:, None, :])


def color_limits(values: np.ndarray, color_range: str) -> np.ndarray:
    """``float64 [S, 2]``: (zmin, zmax) of the colour scale at each step of ``values [S, ...]``."""
    S = values.shape[0]
    flat = values.reshape(S, -1)
    if color_range == "per-step":
        with np.errstate(all="ignore"):
            top = np.nan_to_num(np.nanmax(np.where(np.isnan(flat), -np.inf, flat), axis=1), nan=1.0, neginf=1.0)
    else:
        finite = flat[np.isfinite(flat)]
        hi = 1.0 if finite.size == 0 else float(np.percentile(finite, 99) if color_range == "global99" else finite.max())
        top = np.full(S, hi)
    top = np.maximum(top, 1.0 + 1e-6)  # the uniform level 1 is always inside the scale
    return np.stack([np.zeros(S), top], axis=1)


def head_limits(head_mass: np.ndarray, color_range: str) -> np.ndarray:
    """``float64 [S]``: the top of the head grid's colour scale at each step of ``head_mass [S, ...]``, clipped at
    the 99th percentile (of all steps for a fixed range, of the step for per step): one outlier head does not
    darken every other thumbnail; cells above it take the top colour (the view's legend says so)."""
    if color_range != "per-step":
        return color_limits(head_mass, "global99")[:, 1]
    flat = np.where(np.isfinite(head_mass), head_mass, np.nan).reshape(head_mass.shape[0], -1)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a step with no value: the uniform level
        top = np.nan_to_num(np.nanpercentile(flat, 99, axis=1), nan=1.0)
    return np.maximum(top, 1.0 + 1e-6)


def tokens_at_step(report, tokens: Sequence[str] | None, step: int, masked: str = "[mask]") -> list[str]:
    """The token texts of the model's input at ``step``: positions still masked read ``masked``."""
    tokens = _check_tokens(report, tokens)
    code = STATES.index("masked")
    return [masked if s == code else t for t, s in zip(tokens, report.state[step])]


def view_step(value: str | None, n_steps: int) -> int:
    """The step of a ``?step=`` query parameter (a run's link; the URL the view keeps current for a reload),
    0 when absent or not a step of this run."""
    try:
        step = int(value)
    except (TypeError, ValueError):
        return 0
    return step if 0 <= step < n_steps else 0


def sinks_at_step(report, tokens: Sequence[str] | None, step: int) -> list[tuple[int, str, float]]:
    """The aggregate sinks at ``step`` as (position, token text at that step, mass × uniform), strongest first;
    a position still masked at ``step`` reads ``[mask]`` (:func:`tokens_at_step`)."""
    tokens = tokens_at_step(report, tokens, step)
    mult = step_mass(report)[step]
    pos = np.flatnonzero(report.is_sink[step])
    pos = pos[np.argsort(-np.nan_to_num(mult[pos]), kind="stable")]
    return [(int(j), tokens[j], float(mult[j])) for j in pos]


def sinks_frame(report, tokens: Sequence[str] | None) -> pd.DataFrame:
    """One row per (step, sink position) of the aggregate: token id and text, state, mass × uniform, score."""
    tokens = _check_tokens(report, tokens)
    mult = step_mass(report)
    steps, pos = np.nonzero(report.is_sink)
    return pd.DataFrame(
        {
            "step": steps.astype(np.int64),
            "position": pos.astype(np.int64),
            "token": report.final_tokens[pos].astype(np.int64),
            "token_text": [tokens[j] for j in pos],
            "state": [STATES[report.state[s, j]] for s, j in zip(steps, pos)],
            "mass_x_uniform": mult[steps, pos],
            "score": report.scores[steps, pos].astype(np.float64),
        }
    )


def positions_frame(report, tokens: Sequence[str] | None) -> pd.DataFrame:
    """:meth:`SinkReport.positions_frame` with the token text next to the token id."""
    frame = report.positions_frame()
    frame.insert(frame.columns.get_loc("token") + 1, "token_text", _check_tokens(report, tokens))
    return frame


def _sink_caption(report, tokens: list[str], mult: np.ndarray, step: int, limit: int = 8) -> str:
    pos = np.flatnonzero(report.is_sink[step])
    if pos.size == 0:
        return "no sink at this step (all layers summed)"
    pos = pos[np.argsort(-np.nan_to_num(mult[pos]), kind="stable")]
    masked = report.state[step] == STATES.index("masked")  # not yet decoded: its final token is not there yet
    shown = ", ".join(f"{j} " + ("masked" if masked[j] else f"'{tokens[j]}'") + f" {mult[j]:.1f}×" for j in pos[:limit])
    more = f" and {pos.size - limit} more" if pos.size > limit else ""
    return f"sinks at this step (all layers summed): {shown}{more}"


STATE_COLOR_LIST = [STATE_COLORS[name] for name in STATES]
_VIEW_TEMPLATE = files("sap_core") / "static" / "explorer.html"  # package data


def _quantise(values: np.ndarray, qmax: float) -> bytes:
    """Mass × uniform to one byte: 0..254 over [0, qmax], 255 = position absent (NaN)."""
    q = np.clip(np.round(np.nan_to_num(values, nan=0.0) / qmax * 254), 0, 254).astype(np.uint8)
    q[np.isnan(values)] = 255
    return q.tobytes()


def view_steps(n_steps: int, n_layers: int, length: int, max_values: int = MAX_VIEW_VALUES) -> np.ndarray:
    """``int64 [K]``: the steps the browser view carries: all of them, or every k-th step (the smallest
    k that keeps ``K * (n_layers + 1) * length`` mass values within ``max_values``) and the last one."""
    per_step = (n_layers + 1) * length
    stride = max(1, -(-n_steps * per_step // max_values))  # ceil
    steps = np.arange(0, n_steps, stride)
    if steps[-1] != n_steps - 1:
        steps = np.append(steps, n_steps - 1)
    return steps


def head_view_steps(steps: np.ndarray, n_layers: int, n_heads: int, length: int, max_values: int = MAX_HEAD_VALUES) -> np.ndarray:
    """``int64 [K]``: the steps, of the view's ``steps`` (:func:`view_steps`), at which the head grid is carried:
    all of them, or every k-th (and the last) so that ``K * n_layers * n_heads * length`` stays within ``max_values``."""
    per_step = max(1, n_layers * n_heads * length)
    stride = max(1, -(-len(steps) * per_step // max_values))
    idx = np.arange(0, len(steps), stride)
    if idx[-1] != len(steps) - 1:
        idx = np.append(idx, len(steps) - 1)
    return np.asarray(steps)[idx]


def head_step_mass(report, head_mass: np.ndarray) -> np.ndarray:
    """``float64 [S, layers, heads, L]``: the mass each position receives from each analysed (layer, head),
    as a multiple of that head's uniform mass at the step (NaN where absent). ``head_mass``: the trajectory's
    record ``[S, model layers, model heads, L]``."""
    if head_mass.ndim != 4 or head_mass.shape[0] != report.n_steps or head_mass.shape[3] != report.length:
        raise AnimationSpecError(
            f"head mass has shape {list(head_mass.shape)}; pass the trajectory's mass [{report.n_steps}, layers, heads, {report.length}]."
        )
    picked = head_mass[:, list(report.layers)][:, :, list(report.heads)].astype(np.float64)
    return uniform_multiple(picked, report.valid[:, None, None, :])


@dataclass(frozen=True, eq=False)
class SecondRun:
    """A second run drawn under the first in the same view (the explorer's side by side): its
    :class:`~sap_core.sink_report.SinkReport` (the same steps and positions as the first's), the texts of its
    final tokens (None: the ids), a ``label`` naming it, and ``differs``: bool ``[S, L]``, the positions whose
    aggregate sink status differs between the two runs at each step (``SinkShift.differs``)."""

    report: object
    tokens: Sequence[str] | None
    label: str
    differs: np.ndarray


def _second_run(report, other: SecondRun) -> None:
    o = other.report
    if (o.n_steps, o.length) != (report.n_steps, report.length) or tuple(o.layers) != tuple(report.layers):
        raise AnimationSpecError(
            f"the second run has {o.n_steps} steps x {o.length} positions (layers {list(o.layers)}), the first "
            f"{report.n_steps} x {report.length} (layers {list(report.layers)}); compare runs of the same settings."
        )
    assert np.shape(other.differs) == (report.n_steps, report.length), np.shape(other.differs)


def explorer_data(
    report,
    tokens: Sequence[str] | None = None,
    spec: AnimationSpec = AnimationSpec(),
    max_values: int = MAX_VIEW_VALUES,
    start_step: int = 0,
    follow_box: str | None = None,
    about: Sequence[tuple[str, str]] | None = None,
    head_mass: np.ndarray | None = None,
    max_head_values: int = MAX_HEAD_VALUES,
    step_box: str | None = None,
    step_key: str | None = None,
    save_as: tuple[str, Sequence[tuple[str, str]]] | None = None,
    other: SecondRun | None = None,
) -> dict:
    """Everything the browser view needs, once, in a compact JSON-able dict.

    Mass travels as one byte per value (``qmax / 254`` resolution, base64), sinks as flat indices
    ``layer * L + position`` per step, the states as one byte per (step, position); the colour
    range per step is ``layer_hi`` (``spec.color_range``) and ``trail_hi`` for the step map.
    ``step_ids`` are the steps carried (:func:`view_steps`: every step unless the run has more than
    ``max_values`` mass values, then every ``stride``-th); every per-step entry follows them.
    ``start_step``: the step shown first (the carried step at or before it). ``follow_box``: a CSS
    selector of an input in the embedding page that shows the view's step as it moves (the app's
    greyed "Step" box of the full attention map). ``step_box``: a CSS selector of the embedding page's input
    that holds the view's step for the server (the app's hidden box bound to ``?step=``): the view commits
    each step into it without a rerun. ``step_key``: the run's key in the tab's session storage, where the view
    keeps its step and whence it reopens at it (over ``start_step``) when the page is reached again. ``about``: (name, text) rows that describe the run
    (model, prompt, settings), written above the view with page margins: the page then stands alone
    (the HTML export). ``head_mass``: the trajectory's record ``[S, layers, heads, L]``; with it the page
    carries every analysed head's mass (one byte each, :func:`head_step_mass`) at :func:`head_view_steps`
    for its layer × head grid. ``save_as``: (file name, ``about`` rows of :func:`about_rows`): the view gets a
    **Save HTML** button that saves the page itself as a standalone export headed by those rows, opening at the step
    on screen (its "opens at step" said of that step). ``other``: a :class:`SecondRun` drawn under the first (its
    state strip and layer × position map at the same step, on the same colour scale: ``qmax`` and ``layer_hi`` then
    span both runs), the positions whose sinks differ marked; one slider and Play move both."""
    tokens = _check_tokens(report, tokens)
    li = _layer_index(report, spec.layer)
    L = report.length
    keep = view_steps(report.n_steps, len(report.layers), L, max_values)
    per_layer = layer_step_mass(report)  # [S, nL, L]
    agg = step_mass(report)
    if li is None:
        trail, dominant, trail_name = agg, report.dominant, "all layers"
    else:
        trail, dominant, trail_name = per_layer[:, li], report.layer_dominant[:, li], f"layer {report.layers[li]}"
    both = per_layer
    if other is not None:
        _second_run(report, other)
        other_layer = layer_step_mass(other.report)
        both = np.concatenate([per_layer, other_layer], axis=1)  # one colour scale for the two runs
    finite = np.concatenate([both[np.isfinite(both)], trail[np.isfinite(trail)]])
    qmax = float(max(finite.max(), 1.0)) if finite.size else 1.0
    layer_hi = color_limits(both, spec.color_range)[:, 1]  # over all steps, carried or not
    trail_hi = float(color_limits(trail, "global99" if spec.color_range == "per-step" else spec.color_range)[0, 1])
    per_layer, trail, dominant, agg = per_layer[keep], trail[keep], dominant[keep], agg[keep]
    enc = lambda raw: base64.b64encode(raw).decode()
    sinks = [(np.flatnonzero(report.layer_is_sink[s].reshape(-1))).tolist() for s in keep]
    heads = None
    if head_mass is not None:
        hm = head_step_mass(report, head_mass)
        hkeep = head_view_steps(keep, len(report.layers), len(report.heads), L, max_head_values)
        finite = hm[np.isfinite(hm)]
        hq = float(max(finite.max(), 1.0)) if finite.size else 1.0
        heads = {
            "heads": [int(h) for h in report.heads],
            "step_ids": hkeep.tolist(),
            "mass": enc(_quantise(hm[hkeep], hq)),
            "qmax": hq,
            "hi": head_limits(hm, spec.color_range)[hkeep].round(3).tolist(),
        }
    second = None
    if other is not None:
        o = other.report
        second = {
            "label": other.label,
            "tokens": _check_tokens(o, other.tokens),
            "state": enc(o.state[keep].astype(np.uint8).tobytes()),
            "layer_mass": enc(_quantise(other_layer[keep], qmax)),
            "sinks": [np.flatnonzero(o.layer_is_sink[s].reshape(-1)).tolist() for s in keep],
            "differs": [np.flatnonzero(np.asarray(other.differs)[s]).tolist() for s in keep],
        }
    return {
        "steps": len(keep),
        "step_ids": keep.tolist(),
        "total_steps": report.n_steps,
        "stride": int(keep[1] - keep[0]) if len(keep) > 1 else 1,
        "length": L,
        "layers": [int(l) for l in report.layers],
        "tokens": tokens,
        "decoded_at": report.decoded_at.astype(int).tolist(),
        "state": enc(report.state[keep].astype(np.uint8).tobytes()),
        "state_names": list(STATES),
        "state_colors": STATE_COLOR_LIST,
        "masked": STATES.index("masked"),
        "absent": STATES.index("absent"),
        "layer_mass": enc(_quantise(per_layer, qmax)),
        "trail_mass": enc(_quantise(trail, qmax)),
        "qmax": qmax,
        "layer_hi": layer_hi[keep].round(3).tolist(),
        "trail_hi": trail_hi,
        "trail_name": trail_name,
        "dominant": dominant.astype(int).tolist(),
        "sinks": sinks,
        "captions": [_sink_caption(report, tokens, agg[i], int(s)) for i, s in enumerate(keep)],
        "scale": MASS_SCALE,
        "range_name": COLOR_RANGE_NAMES[spec.color_range],
        "frame_ms": int(spec.frame_ms),
        "label_px": LABEL_PX,
        "agg_sinks": [np.flatnonzero(report.is_sink[s]).tolist() for s in keep],
        "start": int(max(0, min(int(start_step), report.n_steps - 1))),
        "follow_box": follow_box,
        "step_box": step_box,
        "step_key": step_key,
        "about": [[str(k), str(v)] for k, v in about] if about else None,
        "save": {"name": save_as[0], "about": [[str(k), str(v)] for k, v in save_as[1]]} if save_as else None,
        "heads": heads,
        "other": second,
    }


def explorer_html(
    report,
    tokens: Sequence[str] | None = None,
    spec: AnimationSpec = AnimationSpec(),
    title: str = "SinkScope: sinks over the denoising steps",
    max_values: int = MAX_VIEW_VALUES,
    start_step: int = 0,
    follow_box: str | None = None,
    about: Sequence[tuple[str, str]] | None = None,
    head_mass: np.ndarray | None = None,
    step_box: str | None = None,
    step_key: str | None = None,
    save_as: tuple[str, Sequence[tuple[str, str]]] | None = None,
    other: SecondRun | None = None,
) -> str:
    """The run as one self-contained HTML page (no network, no library): the token strip, the layer ×
    position mass at the step with each layer's sinks, and the step × position mass of all steps with
    the dominant sink of each and a line at the current step, on one shared position axis; its own
    slider and play/pause move through the steps in the browser. The app shows this page as a
    component (``start_step``, ``follow_box``, ``about``, ``head_mass``, ``step_box``, ``step_key``, ``save_as``, ``other``: see
    :func:`explorer_data`);
    :func:`write_animation` saves it."""
    data = json.dumps(
        explorer_data(
            report,
            tokens,
            spec,
            max_values,
            start_step,
            follow_box,
            about,
            head_mass,
            step_box=step_box,
            step_key=step_key,
            save_as=save_as,
            other=other,
        ),
        separators=(",", ":"),
        ensure_ascii=False,
    ).replace("</", "<\\/")
    page = _VIEW_TEMPLATE.read_text(encoding="utf-8")
    return page.replace("__TITLE__", html_lib.escape(title)).replace("__DATA__", data)


# What the app's view frame shows before the first run.
PLACEHOLDER_HTML = "<p style='font:14px sans-serif;color:#808495;margin:8px 0'>The run's view appears here: every step, drawn in your browser.</p>"

# The app's first frame height for the view; the page then sets its frame as tall as the browser window allows
# and fits its canvas inside.
FRAME_HEIGHT = 640


# --- files -------------------------------------------------------------------------------------------


def html_bytes(
    report,
    tokens: Sequence[str] | None = None,
    spec: AnimationSpec = AnimationSpec(),
    about: Sequence[tuple[str, str]] | None = None,
    head_mass: np.ndarray | None = None,
    start_step: int = 0,
) -> bytes:
    """:func:`explorer_html` as UTF-8 bytes (the download), opening at ``start_step``; ``about`` rows (model,
    prompt, settings: :func:`about_rows`) make it stand alone; ``head_mass`` adds the head grid."""
    return explorer_html(report, tokens, spec, start_step=start_step, about=about, head_mass=head_mass).encode()


def about_rows(run, spec: AnimationSpec, step: int, output: str) -> list[tuple[str, str]]:
    """The header of the HTML export: the run (a :class:`~sap_core.sink_report.Provenance`), the view as shown
    (colour range, the layer of the step × position map, the step it opens at) and the output text."""
    layer = "all layers (summed)" if spec.layer is None else f"layer {spec.layer}"
    view = f"colour {COLOR_RANGE_NAMES[spec.color_range]}; step × position map: {layer}; opens at step {step}"
    return [*run.rows(), ("View", view), ("Output", output)]


def slug(text: str, limit: int = 24) -> str:
    """``text`` as a file-name part: lower-case ASCII letters, digits, '.' and '-' only, at most ``limit``
    characters ("run" when nothing is left)."""
    part = re.sub(r"[^a-z0-9.]+|\.{2,}", "-", text.lower()).strip("-.")
    return part[:limit].strip("-.") or "run"


def run_settings(spec, causal: bool = False) -> str:
    """A decoding spec (:class:`~sap_core.decoding.DecodeSpec`) in a few characters, for file names:
    ``64tok-64steps-b16-low_confidence-t0.8-cfg0-seed0`` (a causal model: ``64tok-causal-t0.8-seed0``); Dream's
    sampler names its own settings, ``64tok-64steps-dream-entropy-at0-eps0.001-p1-k0-t0.8-seed0``, and MMaDA's
    adds ``-mmada`` (``-mmada-text`` with text tokens only) to LLaDA's."""
    if causal:
        return f"{spec.gen_length}tok-causal-t{spec.temperature:g}-seed{spec.seed}"
    if spec.sampler == "dream":
        return (
            f"{spec.gen_length}tok-{spec.steps}steps-dream-{spec.alg}-at{spec.alg_temp:g}-eps{spec.eps:g}"
            f"-p{spec.top_p:g}-k{spec.top_k}-t{spec.temperature:g}-seed{spec.seed}"
        )
    mmada = ("-mmada-text" if spec.text_only else "-mmada") if spec.sampler == "mmada" else ""
    return (
        f"{spec.gen_length}tok-{spec.steps}steps-b{spec.block_length}-{spec.remasking}{mmada}-t{spec.temperature:g}"
        f"-cfg{spec.cfg_scale:g}-seed{spec.seed}"
    )


def export_name(kind: str, model: str, prompt: str, settings: str, ext: str, limit: int = 120) -> str:
    """A download's file name that says which run it is: ``<kind>_<model>_<prompt slug>_<settings>.<ext>``,
    each part sanitised (:func:`slug`; a model path by its last part), the whole at most ``limit``
    characters (the settings shortened first, then the prompt)."""
    model = slug(re.split(r"[\\/]", model.rstrip("/\\"))[-1], 32)
    head = f"{slug(kind, 24)}_{model}_{slug(prompt, 24)}"
    tail = slug(settings, max(8, limit - len(head) - len(ext) - 2))
    return f"{head}_{tail}"[: limit - len(ext) - 1].rstrip("-._") + "." + ext.lstrip(".")


_FONT_FILES = ("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf", "DejaVuSans.ttf")


def _font(size: int):
    for name in _FONT_FILES:
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    return ImageFont.load_default(size)


def _hex(color: str) -> tuple[int, int, int]:
    color = color.lstrip("#")
    return tuple(int(color[i : i + 2], 16) for i in (0, 2, 4))


GIF_LABEL_PX = 14  # font size of the GIF's token labels


def _thinned_labels(sink_positions: np.ndarray, states: np.ndarray, every: int, cell: float) -> list[int]:
    """Positions whose token is written at a step: every sink first, then every ``every``-th known (not
    masked, not absent) token, none within a label's width of another (``every * cell`` pixels apart)."""
    masked, absent = STATES.index("masked"), STATES.index("absent")
    gap = every * cell - 0.5
    taken: list[int] = []  # sorted

    def place(j: int) -> None:
        i = bisect.bisect(taken, j)
        if all(abs(j - taken[k]) * cell >= gap for k in (i - 1, i) if 0 <= k < len(taken)):
            taken.insert(i, j)

    for j in sink_positions.tolist():
        if states[j] != absent:
            place(j)
    for j in range(0, len(states), every):
        if states[j] != masked and states[j] != absent:
            place(j)
    return taken


def gif_frames(
    report, tokens: Sequence[str] | None = None, spec: AnimationSpec = AnimationSpec(), caption: str | None = None
) -> list:
    """One Pillow image per step: the mass each position receives (bars, × uniform, one colour range
    for all steps unless ``spec.color_range`` is per-step), coloured by the position's state, sinks
    in red with a marker, the tokens written under the bars (rotated) and the step in the title;
    ``caption`` (the run: model, prompt, settings, :meth:`~sap_core.sink_report.Provenance.line`) under it all."""
    tokens = _check_tokens(report, tokens)
    S, L = report.n_steps, report.length
    mult = step_mass(report)
    limits = color_limits(mult, spec.color_range)
    font, small, label_font = _font(16), _font(12), _font(GIF_LABEL_PX)
    cell = 17 if L <= 96 else max(4, 1632 // L)
    every = max(1, -(-(GIF_LABEL_PX + 3) // cell))  # label every k-th position (and every sink): no two labels touch
    label_w = min(90, max(int(label_font.getlength(t[:10])) for t in [*tokens, "[mask]"]) + 6)
    left, right, top, plot_h, label_h = 56, 16, 50, 220, label_w
    below = 20 * bool(caption)  # the caption's line
    width, height = left + cell * L + right, top + plot_h + label_h + 24 + below
    # the static part: axes, y ticks, rotated token labels
    base = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(base)
    y0 = top + plot_h
    draw.line([(left - 1, top), (left - 1, y0), (left + cell * L, y0)], fill=(90, 90, 90))
    draw.text((4, top - 18), "× uniform", fill=(60, 60, 60), font=small)
    step_ticks = [j for j in range(0, L, max(1, (L + 15) // 16))]
    axis_y = height - 20 - below
    for j in step_ticks:
        draw.text((left + j * cell, axis_y), str(j), fill=(90, 90, 90), font=small)
    draw.text((4, axis_y), "position", fill=(90, 90, 90), font=small)
    draw.text((4, height - 18), (caption or "")[: max(20, (width - 8) // 7)], fill=(40, 40, 40), font=small)
    x = left + 110
    for name, rgb in [
        ("prompt", _hex(STATE_COLORS["prompt"])),
        ("decoded", _hex(STATE_COLORS["decoded"])),
        ("decoding now", _hex(STATE_COLORS["decoding"])),
        ("masked", (200, 200, 200)),
        ("sink", (229, 57, 53)),
    ]:
        draw.rectangle([x, 31, x + 10, 41], fill=rgb)
        draw.text((x + 14, 29), name, fill=(60, 60, 60), font=small)
        x += 22 + int(draw.textlength(name, font=small))
    colors = {name: _hex(STATE_COLORS[name]) for name in STATES}
    colors["masked"] = (200, 200, 200)
    sink_color = (229, 57, 53)
    # one fixed palette (greys for the text, the state colours, the sink red): every frame is drawn
    # straight into it, so the GIF writer has nothing to quantise (quantising cost ~120 ms a frame)
    greys = [(v, v, v) for v in range(0, 256, 17)]
    palette = greys + list(colors.values()) + [sink_color]
    pal = Image.new("P", (1, 1))
    pal.putpalette([c for rgb in palette for c in rgb] + [255] * 3 * (256 - len(palette)))
    base = base.quantize(palette=pal, dither=Image.Dither.NONE)

    def rotated(text: str, ink) -> Image.Image:
        label = Image.new("RGB", (label_h - 4, GIF_LABEL_PX + 3), "white")
        ImageDraw.Draw(label).text((0, 0), text[:10], fill=ink, font=label_font)
        return label.rotate(90, expand=True).quantize(palette=pal, dither=Image.Dither.NONE)

    labels = [rotated(t, (40, 40, 40)) for t in tokens]  # each token drawn once; pasted where the token is known
    sink_labels = {}  # a sink's label, red, drawn when first needed
    masked = STATES.index("masked")
    ink = {rgb: i for i, rgb in enumerate(palette)}  # palette indices: no colour look-up per shape
    dark, mid, light = ink[(34, 34, 34)], ink[(85, 85, 85)], ink[(170, 170, 170)]
    state_ink = [ink[colors[name]] for name in STATES]
    red = ink[sink_color]
    frames = []
    for s in range(S):
        img = base.copy()
        d = ImageDraw.Draw(img)
        hi = float(limits[s, 1])
        for frac in (0.0, 0.5, 1.0):
            y = y0 - frac * plot_h
            d.line([(left - 5, y), (left - 1, y)], fill=mid)
            d.text((8, y - 7), f"{frac * hi:.1f}", fill=mid, font=small)
        uy = y0 - min(1.0 / hi, 1.0) * plot_h  # the uniform level
        d.line([(left, uy), (left + cell * L, uy)], fill=light)
        states = report.state[s]
        sinks = report.is_sink[s]
        heights = np.minimum(np.nan_to_num(mult[s], nan=-1.0) / hi, 1.0) * plot_h
        for j in range(L):
            h = heights[j]
            if h < 0:
                continue
            x = left + j * cell
            d.rectangle([x + 1, y0 - h, x + cell - 2, y0 - 1], fill=red if sinks[j] else state_ink[states[j]])
            if sinks[j]:
                d.polygon([(x + cell / 2, y0 - h - 3), (x + 1, y0 - h - 10), (x + cell - 1, y0 - h - 10)], fill=red)
        for j in _thinned_labels(np.flatnonzero(sinks), states, every, cell):
            if sinks[j]:
                if (j, states[j] == masked) not in sink_labels:
                    sink_labels[j, states[j] == masked] = rotated("[mask]" if states[j] == masked else tokens[j], sink_color)
                label = sink_labels[j, states[j] == masked]
            else:
                label = labels[j]
            img.paste(label, (int(left + j * cell + cell / 2 - label.width / 2), y0 + 3))
        d.text((left, 8), f"Step {s} of {S - 1}", fill=dark, font=font)
        caption = _sink_caption(report, tokens, mult[s], s, limit=4)
        d.text((left + 130, 10), caption[: max(10, (width - left - 140) // 7)], fill=mid, font=small)
        frames.append(img)
    return frames


def gif_bytes(
    report, tokens: Sequence[str] | None = None, spec: AnimationSpec = AnimationSpec(), caption: str | None = None
) -> bytes:
    """An animated GIF of the sinks moving over the steps (:func:`gif_frames`, ``caption``: the run), looping."""
    frames = gif_frames(report, tokens, spec, caption)
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=spec.frame_ms, loop=0, optimize=False)
    return buf.getvalue()


def write_animation(
    report,
    path: str | Path,
    tokens: Sequence[str] | None = None,
    spec: AnimationSpec = AnimationSpec(),
    about: Sequence[tuple[str, str]] | None = None,
) -> Path:
    """Write ``.gif`` or ``.html`` (chosen by the extension; ``about``: see :func:`html_bytes`) atomically;
    returns the path."""
    path = Path(path)
    kind = path.suffix.lower()
    _layer_index(report, spec.layer)  # an unknown layer fails before any drawing
    if kind == ".gif":
        data = gif_bytes(report, tokens, spec)
    elif kind in (".html", ".htm"):
        data = html_bytes(report, tokens, spec, about)
    else:
        raise AnimationSpecError(f"'{path.name}' must end in .gif or .html (the extension picks the format).")
    return atomic_write_bytes(path, data)
