"""The denoising run as a moving picture: one client-side animated plotly figure, an animated GIF
and a self-contained HTML page of the sinks moving over the steps.

Everything here is a pure function of a :class:`sap_core.sinks.SinkReport` and the token texts of
its final sequence (:func:`readable_tokens`); no model is run. The animated figure carries every
step as a plotly *frame* and has its own slider and play/pause buttons, so the browser steps
through the run without asking the server again.

Mass is shown as a multiple of the uniform mass of its step (1 = every valid position receives the
same), like every mass figure in :mod:`sap_core.viz`. Frames carry it rounded to two decimals (the
colour scale cannot show more), which keeps a 256-step run within a few MB.
"""
from __future__ import annotations

import io
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from sap_core.errors import SapError
from sap_core.sinks import STATES
from sap_core.viz import MASS_SCALE, STATE_COLORS, _uniform_multiple

COLOR_RANGES = ("global99", "global", "per-step")
COLOR_RANGE_NAMES = {"global99": "fixed: 99th percentile of all steps", "global": "fixed: maximum of all steps",
                     "per-step": "per step (not comparable across steps)"}
MAX_TICK_LABELS = 96  # positions up to which every token is written under the strip
MASKED_GLYPH = "▒"


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
    layer: Optional[int] = None
    frame_ms: int = 80

    def __post_init__(self) -> None:
        if self.color_range not in COLOR_RANGES:
            raise AnimationSpecError(f"color_range must be one of {', '.join(COLOR_RANGES)} (got '{self.color_range}').")
        if not 20 <= int(self.frame_ms) <= 5000:
            raise AnimationSpecError(f"frame_ms must be between 20 and 5000 ms (got {self.frame_ms}).")


def readable_tokens(decode: Callable[[list[int]], str], ids: Sequence[int]) -> list[str]:
    """Text of each token id with newlines and spaces made visible (``⏎``, ``␣``)."""
    return [decode([int(i)]).replace("\n", "⏎").replace(" ", "␣") for i in ids]


def tokenizer_texts(source: Union[str, Path], ids: Sequence[int]) -> list[str]:
    """:func:`readable_tokens` with the tokenizer of a model directory or built-in name (weights are not loaded)."""
    from sap_core.models import _load_tokenizer, read_config, resolve_source

    path = resolve_source(source)
    tokenizer = _load_tokenizer(path, read_config(path).get("model_type"))
    return readable_tokens(lambda i: tokenizer.decode(i, skip_special_tokens=False), ids)


def _check_tokens(report, tokens: Optional[Sequence[str]]) -> list[str]:
    if tokens is None:
        return [str(int(t)) for t in report.final_tokens]
    if len(tokens) != report.length:
        raise AnimationSpecError(f"got {len(tokens)} token texts for a {report.length}-position run; "
                                 "pass the texts of the trajectory's final tokens.")
    return list(tokens)


def _layer_index(report, layer: Optional[int]) -> Optional[int]:
    if layer is None:
        return None
    if layer not in report.layers:
        raise AnimationSpecError(f"layer {layer} was not analysed; pick one of {list(report.layers)} or all layers.")
    return list(report.layers).index(layer)


def step_mass(report) -> np.ndarray:
    """``float64 [S, L]``: aggregate mass of every step as a multiple of uniform (NaN where absent)."""
    return _uniform_multiple(report.mass.astype(np.float64), report.valid)


def layer_step_mass(report) -> np.ndarray:
    """``float64 [S, layers, L]``: per-layer mass of every step as a multiple of uniform (NaN where absent)."""
    return _uniform_multiple(report.layer_mass.astype(np.float64), report.valid[:, None, :])


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


def sinks_at_step(report, tokens: Optional[Sequence[str]], step: int) -> list[tuple[int, str, float]]:
    """The aggregate sinks at ``step`` as (position, token text, mass × uniform), strongest first."""
    tokens = _check_tokens(report, tokens)
    mult = step_mass(report)[step]
    pos = np.flatnonzero(report.is_sink[step])
    pos = pos[np.argsort(-np.nan_to_num(mult[pos]), kind="stable")]
    return [(int(j), tokens[j], float(mult[j])) for j in pos]


def sinks_frame(report, tokens: Optional[Sequence[str]]) -> pd.DataFrame:
    """One row per (step, sink position) of the aggregate: token id and text, state, mass × uniform, score."""
    tokens = _check_tokens(report, tokens)
    mult = step_mass(report)
    steps, pos = np.nonzero(report.is_sink)
    return pd.DataFrame({
        "step": steps.astype(np.int64), "position": pos.astype(np.int64),
        "token": report.final_tokens[pos].astype(np.int64), "token_text": [tokens[j] for j in pos],
        "state": [STATES[report.state[s, j]] for s, j in zip(steps, pos)],
        "mass_x_uniform": mult[steps, pos], "score": report.scores[steps, pos].astype(np.float64),
    })


def positions_frame(report, tokens: Optional[Sequence[str]]) -> pd.DataFrame:
    """:meth:`SinkReport.positions_frame` with the token text next to the token id."""
    frame = report.positions_frame()
    frame.insert(frame.columns.get_loc("token") + 1, "token_text", _check_tokens(report, tokens))
    return frame


def _shown_tokens(tokens: list[str], states: np.ndarray) -> list[str]:
    masked, absent = STATES.index("masked"), STATES.index("absent")
    return [MASKED_GLYPH if s == masked else ("" if s == absent else t) for t, s in zip(tokens, states)]


def _sink_caption(report, tokens: list[str], mult: np.ndarray, step: int, limit: int = 8) -> str:
    pos = np.flatnonzero(report.is_sink[step])
    if pos.size == 0:
        return "no sink at this step"
    pos = pos[np.argsort(-np.nan_to_num(mult[pos]), kind="stable")]
    shown = ", ".join(f"{j} '{tokens[j]}' {mult[j]:.1f}×" for j in pos[:limit])
    more = f" and {pos.size - limit} more" if pos.size > limit else ""
    return f"sinks at this step: {shown}{more}"


def _title(report, tokens: list[str], mult: np.ndarray, step: int) -> str:
    return f"<b>Step {step} of {report.n_steps - 1}</b> · {_sink_caption(report, tokens, mult, step)}"


def _rounded(a: np.ndarray) -> list:
    """Two decimals, NaN as null: the frames' payload."""
    out = np.round(a, 2).astype(object)
    out[np.isnan(a)] = None
    return out.tolist()


STATE_CODES = {name: i for i, name in enumerate(STATES)}


def _state_scale() -> list:
    k = len(STATES) - 1
    return [[i / k, STATE_COLORS[name]] for i, name in enumerate(STATES)]


def explorer_figure(report, tokens: Optional[Sequence[str]] = None, spec: AnimationSpec = AnimationSpec()) -> go.Figure:
    """The whole run as one animated figure, stepped in the browser.

    Three rows share the position axis, so a column is the same position everywhere: the token
    strip (state of every position at the step, token texts written above it up to
    :data:`MAX_TICK_LABELS` positions), the layer × position mass at the step with each layer's
    sinks marked, and the step × position mass of all steps (``spec.layer``) with the dominant
    sink of every step and a line at the current step. One frame per step; the figure's own
    slider and play/pause buttons move through them.
    """
    tokens = _check_tokens(report, tokens)
    li = _layer_index(report, spec.layer)
    S, L = report.n_steps, report.length
    layers = [str(l) for l in report.layers]
    per_layer = layer_step_mass(report)  # [S, nL, L]
    agg = step_mass(report)
    limits = color_limits(per_layer, spec.color_range)
    if li is None:
        trail, dominant, trail_name = agg, report.dominant, "all layers"
    else:
        trail, dominant, trail_name = per_layer[:, li], report.layer_dominant[:, li], f"layer {report.layers[li]}"
    trail_hi = color_limits(trail, "global99" if spec.color_range == "per-step" else spec.color_range)[0, 1]
    labels = L <= MAX_TICK_LABELS
    decoded = ["prompt" if d < 0 else f"decoded at step {d}" for d in report.decoded_at]
    pos_text = [f"{j} '{t}' ({d})" for j, (t, d) in enumerate(zip(tokens, decoded))]

    fig = make_subplots(rows=3, cols=1, shared_xaxes=True, vertical_spacing=0.035,
                        row_heights=[0.07, 0.36, 0.57])

    def strip_trace(s: int) -> go.Heatmap:
        states = report.state[s]
        return go.Heatmap(z=[states.tolist()], customdata=[[STATES[i] for i in states]],
                          text=[_shown_tokens(tokens, states)] if labels else None)

    def layer_trace(s: int) -> go.Heatmap:
        return go.Heatmap(z=_rounded(per_layer[s]), zmin=float(limits[s, 0]), zmax=float(limits[s, 1]))

    def sink_trace(s: int) -> go.Scatter:
        ys, xs = np.nonzero(report.layer_is_sink[s])
        return go.Scatter(x=xs.tolist(), y=[layers[i] for i in ys])

    def step_line(s: int) -> go.Scatter:
        return go.Scatter(x=[-0.5, L - 0.5], y=[s, s])

    def frame_layout(s: int) -> dict:
        layout = {"title": {"text": _title(report, tokens, agg[s], s)}}
        if labels:
            layout["xaxis"] = {"ticktext": _shown_tokens(tokens, report.state[s])}
        return layout

    # row 1: token strip
    k = len(STATES) - 1
    fig.add_trace(strip_trace(0).update(
        x=list(range(L)), zmin=0, zmax=k, colorscale=_state_scale(), showscale=False, xgap=1,
        hovertemplate="position %{x}: %{text}<br>%{customdata}<extra></extra>" if labels else
        "position %{x}<br>%{customdata}<extra></extra>", name="tokens"), row=1, col=1)
    if not labels:  # hover names the token even when the strip is too dense for labels
        fig.data[0].update(text=[[f"'{t}'" for t in tokens]], hovertemplate="position %{x}: %{text}<br>%{customdata}<extra></extra>")
    # row 2: layer × position at the step
    fig.add_trace(layer_trace(0).update(
        x=list(range(L)), y=layers, colorscale=MASS_SCALE, text=[pos_text] * len(layers), name="mass",
        colorbar=dict(title=dict(text="× uniform", side="right"), len=0.36, y=0.76, yanchor="middle", thickness=14,
                      tickformat=".1f", x=1.0, xpad=6),
        hovertemplate="position %{text}<br>layer %{y}: %{z:.2f}× uniform<extra></extra>"), row=2, col=1)
    fig.add_trace(sink_trace(0).update(mode="markers", name="sink (per layer, this step)",
                                       marker=dict(symbol="x-thin", color="#e53935", size=9, line=dict(width=2, color="#e53935")),
                                       hoverinfo="skip"), row=2, col=1)
    # row 3: step × position, all steps
    fig.add_trace(go.Heatmap(z=_rounded(trail), x=list(range(L)), y=list(range(S)), zmin=0.0, zmax=float(trail_hi),
                             colorscale=MASS_SCALE, text=[pos_text] * S, name="mass over steps",
                             colorbar=dict(title=dict(text="× uniform", side="right"), len=0.55, y=0.28, yanchor="middle",
                                           thickness=14, tickformat=".1f", x=1.0, xpad=6),
                             hovertemplate="step %{y}, position %{text}<br>%{z:.2f}× uniform<extra></extra>"), row=3, col=1)
    fig.add_trace(go.Scatter(x=dominant.tolist(), y=list(range(S)), mode="markers", name=f"dominant sink d_t ({trail_name})",
                             marker=dict(symbol="circle-open", color="#e53935", size=6, line=dict(width=1.5)),
                             hovertemplate="step %{y}: dominant sink at position %{x}<extra></extra>"), row=3, col=1)
    fig.add_trace(step_line(0).update(mode="lines", name="current step", line=dict(color="#ffffff", width=2, dash="dot"),
                                      hoverinfo="skip"), row=3, col=1)
    animated = [0, 1, 2, 5]

    frames = []
    for s in range(S):
        frames.append(go.Frame(name=str(s), traces=animated, layout=frame_layout(s),
                               data=[strip_trace(s), layer_trace(s), sink_trace(s), step_line(s)]))
    fig.frames = frames

    play = {"frame": {"duration": spec.frame_ms, "redraw": True}, "fromcurrent": True, "transition": {"duration": 0}, "mode": "immediate"}
    jump = {"frame": {"duration": 0, "redraw": True}, "transition": {"duration": 0}, "mode": "immediate"}
    fig.update_layout(
        height=250 + 22 * len(layers) + min(max(6 * S, 220), 420) + (70 if labels else 0),
        margin=dict(l=60, r=90, t=110 if labels else 70, b=150), plot_bgcolor="#ffffff",
        title=dict(text=_title(report, tokens, agg[0], 0), x=0.0, xanchor="left", y=0.995, yanchor="top", font=dict(size=14)),
        legend=dict(orientation="h", x=0.0, y=-0.16, yanchor="top"), hovermode="closest", uirevision="explorer",
        updatemenus=[dict(type="buttons", direction="left", x=0.0, y=-0.07, xanchor="left", yanchor="top", showactive=False,
                          pad=dict(t=0, r=10), buttons=[dict(label="▶ Play", method="animate", args=[None, play]),
                                                       dict(label="❚❚ Pause", method="animate", args=[[None], jump])])],
        sliders=[dict(active=0, x=0.13, len=0.87, y=-0.04, yanchor="top", pad=dict(t=0, b=0),
                      currentvalue=dict(prefix="step ", visible=True, xanchor="left"), transition=dict(duration=0),
                      steps=[dict(label=str(s), method="animate", args=[[str(s)], jump]) for s in range(S)])],
    )
    x_range = [-0.5, L - 0.5]
    fig.update_xaxes(range=x_range, autorange=False, showgrid=False, zeroline=False)
    fig.update_xaxes(title_text="position (token index)", row=3, col=1)
    if labels:
        fig.update_xaxes(side="top", showticklabels=True, tickmode="array", tickvals=list(range(L)),
                         ticktext=_shown_tokens(tokens, report.state[0]), tickangle=-90, tickfont=dict(size=10), row=1, col=1)
    fig.update_yaxes(showticklabels=False, fixedrange=True, row=1, col=1)
    fig.update_yaxes(title_text="layer", type="category", row=2, col=1)
    fig.update_yaxes(title_text="denoising step", autorange="reversed", row=3, col=1)
    # the state legend (the strip's colours)
    for name in ("prompt", "masked", "decoding", "decoded"):
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", name=name, legendgroup="state",
                                 marker=dict(size=11, color=STATE_COLORS[name], symbol="square", line=dict(width=1, color="#9e9e9e"))),
                      row=1, col=1)
    return fig


def payload_bytes(fig: go.Figure) -> int:
    """Size of the figure's JSON (what the browser receives), in bytes."""
    return len(fig.to_json().encode())


# --- files -------------------------------------------------------------------------------------------

def _write_atomic(path: Path, data: bytes) -> Path:
    """Write to a temporary sibling and rename into place (a failed write never clobbers the file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def html_bytes(report, tokens: Optional[Sequence[str]] = None, spec: AnimationSpec = AnimationSpec(),
               title: str = "SinkScope: sinks over the denoising steps") -> bytes:
    """A self-contained HTML page (plotly.js inlined, no network) of :func:`explorer_figure`."""
    fig = explorer_figure(report, tokens, spec)
    return fig.to_html(include_plotlyjs=True, full_html=True, auto_play=False,
                       config={"displaylogo": False}, div_id="sinkscope").replace(
        "<head>", f"<head><title>{title}</title>", 1).encode()


_FONT_FILES = ("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf", "DejaVuSans.ttf")


def _font(size: int):
    from PIL import ImageFont

    for name in _FONT_FILES:
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    return ImageFont.load_default(size)


def _hex(color: str) -> tuple[int, int, int]:
    color = color.lstrip("#")
    return tuple(int(color[i:i + 2], 16) for i in (0, 2, 4))


def gif_frames(report, tokens: Optional[Sequence[str]] = None, spec: AnimationSpec = AnimationSpec()) -> list:
    """One Pillow image per step: the mass each position receives (bars, × uniform, one colour range
    for all steps unless ``spec.color_range`` is per-step), coloured by the position's state, sinks
    in red with a marker, the tokens written under the bars (rotated) and the step in the title."""
    from PIL import Image, ImageDraw

    tokens = _check_tokens(report, tokens)
    S, L = report.n_steps, report.length
    mult = step_mass(report)
    limits = color_limits(mult, spec.color_range)
    cell = 14 if L <= 96 else max(4, 1344 // L)
    left, right, top, plot_h, label_h = 56, 16, 46, 220, (70 if L <= 96 else 24)
    width, height = left + cell * L + right, top + plot_h + label_h + 22
    font, small = _font(13), _font(10)
    # the static part: axes, y ticks, rotated token labels
    base = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(base)
    y0 = top + plot_h
    draw.line([(left - 1, top), (left - 1, y0), (left + cell * L, y0)], fill=(90, 90, 90))
    draw.text((4, top - 16), "× uniform", fill=(60, 60, 60), font=small)
    step_ticks = [j for j in range(0, L, max(1, (L + 15) // 16))]
    for j in step_ticks:
        draw.text((left + j * cell, height - 18), str(j), fill=(90, 90, 90), font=small)
    draw.text((4, height - 18), "position", fill=(90, 90, 90), font=small)
    x = left + 110
    for name, rgb in [("prompt", _hex(STATE_COLORS["prompt"])), ("decoded", _hex(STATE_COLORS["decoded"])),
                      ("decoding now", _hex(STATE_COLORS["decoding"])), ("masked", (200, 200, 200)), ("sink", (229, 57, 53))]:
        draw.rectangle([x, 28, x + 9, 37], fill=rgb)
        draw.text((x + 13, 26), name, fill=(60, 60, 60), font=small)
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
    labels = []  # each token rotated, drawn once; pasted at the steps where the token is known
    if L <= 96:
        for t in tokens:
            label = Image.new("RGB", (label_h - 4, cell), "white")
            ImageDraw.Draw(label).text((0, 0), t[:10], fill=(40, 40, 40), font=small)
            labels.append(label.rotate(90, expand=True).quantize(palette=pal, dither=Image.Dither.NONE))
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
        for j, label in enumerate(labels):
            if states[j] != masked:
                img.paste(label, (left + j * cell, y0 + 3))
        d.text((left, 8), f"Step {s} of {S - 1}", fill=dark, font=font)
        caption = _sink_caption(report, tokens, mult[s], s, limit=4)
        d.text((left + 110, 10), caption[:max(10, (width - left - 120) // 6)], fill=mid, font=small)
        frames.append(img)
    return frames


def gif_bytes(report, tokens: Optional[Sequence[str]] = None, spec: AnimationSpec = AnimationSpec()) -> bytes:
    """An animated GIF of the sinks moving over the steps (:func:`gif_frames`), looping."""
    frames = gif_frames(report, tokens, spec)
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=spec.frame_ms, loop=0, optimize=False)
    return buf.getvalue()


def write_animation(report, path: Union[str, Path], tokens: Optional[Sequence[str]] = None,
                    spec: AnimationSpec = AnimationSpec()) -> Path:
    """Write ``.gif`` or ``.html`` (chosen by the extension) atomically; returns the path."""
    path = Path(path)
    kind = path.suffix.lower()
    if kind == ".gif":
        data = gif_bytes(report, tokens, spec)
    elif kind in (".html", ".htm"):
        data = html_bytes(report, tokens, spec)
    else:
        raise AnimationSpecError(f"'{path.name}' must end in .gif or .html (the extension picks the format).")
    return _write_atomic(path, data)
