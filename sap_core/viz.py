"""Plotly figure builders: pure functions from SinkScope's records to figures.

Every figure the app shows is built here, with axis titles and units; the pages never build
figures inline. Mass heatmaps show the mass a key receives as a multiple of the uniform mass of its
step (1 = average), so layers and steps are comparable.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go

STATE_COLORS = {"prompt": "#9e9e9e", "masked": "#e0e0e0", "decoded": "#90caf9", "decoding": "#ff7043", "absent": "#ffffff"}
LABEL_COLORS = {"none": "#bdbdbd", "transient": "#ffca28", "stable": "#42a5f5", "unstable": "#ef5350"}


def _uniform_multiple(mass: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """``mass[..., L]`` divided by its mean over the valid positions (NaN where not valid)."""
    m = np.where(valid, mass, np.nan)
    mean = np.nanmean(m, axis=-1, keepdims=True)
    return m / np.where(mean > 0, mean, 1.0)


def token_strip(tokens: Sequence[str], states: Sequence[str], title: str = "Tokens") -> go.Figure:
    """One cell per position, coloured by its state (prompt, masked, decoded earlier, decoded now)."""
    n = len(tokens)
    codes = {s: i for i, s in enumerate(STATE_COLORS)}
    z = [[codes[s] for s in states]]
    k = len(STATE_COLORS) - 1
    scale = [[i / k, c] for i, c in enumerate(STATE_COLORS.values())]
    fig = go.Figure(go.Heatmap(z=z, x=list(range(n)), zmin=0, zmax=k, colorscale=scale, showscale=False,
                               text=[list(tokens)], texttemplate="%{text}", textfont={"size": 10},
                               customdata=[list(states)], hovertemplate="pos %{x}: %{text} (%{customdata})<extra></extra>"))
    for name, color in STATE_COLORS.items():
        if name != "absent":
            fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", marker=dict(size=10, color=color, symbol="square"), name=name))
    fig.update_layout(title=title, height=170, margin=dict(l=40, r=10, t=40, b=30), xaxis_title="position (token index)",
                      yaxis=dict(visible=False), legend=dict(orientation="h", y=-0.6), plot_bgcolor="white")
    return fig


def layer_position_heatmap(report, step: int) -> go.Figure:
    """Layer × position mass at ``step`` (×uniform), with each layer's sinks marked."""
    valid = report.valid[step]
    z = _uniform_multiple(report.layer_mass[step], valid[None, :])
    fig = go.Figure(go.Heatmap(z=z, y=[str(l) for l in report.layers], colorscale="Viridis", colorbar=dict(title="× uniform"),
                               hovertemplate="layer %{y}, pos %{x}: %{z:.2f}× uniform<extra></extra>"))
    ys, xs = np.nonzero(report.layer_is_sink[step])
    fig.add_trace(go.Scatter(x=xs, y=[str(report.layers[i]) for i in ys], mode="markers", name="sink",
                             marker=dict(symbol="x", color="red", size=9)))
    fig.update_layout(title=f"Attention mass received per layer at step {step}", xaxis_title="key position",
                      yaxis_title="layer", height=320, margin=dict(l=50, r=10, t=40, b=40))
    return fig


def step_position_heatmap(report, layer: Optional[int] = None) -> go.Figure:
    """Step × position mass (×uniform) for one layer (``None``: all selected layers), dominant position traced."""
    if layer is None:
        mass, dominant, name = report.mass, report.dominant, "all layers"
    else:
        i = list(report.layers).index(layer)
        mass, dominant, name = report.layer_mass[:, i], report.layer_dominant[:, i], f"layer {layer}"
    z = _uniform_multiple(mass, report.valid)
    steps = np.arange(report.n_steps)
    fig = go.Figure(go.Heatmap(z=z, colorscale="Viridis", colorbar=dict(title="× uniform"),
                               hovertemplate="step %{y}, pos %{x}: %{z:.2f}× uniform<extra></extra>"))
    fig.add_trace(go.Scatter(x=dominant, y=steps, mode="lines+markers", name="dominant sink d_t",
                             line=dict(color="red", width=1.5), marker=dict(size=4)))
    fig.update_layout(title=f"Sink trajectory ({name})", xaxis_title="key position", yaxis_title="denoising step",
                      height=420, margin=dict(l=50, r=10, t=40, b=40), legend=dict(orientation="h", y=-0.15))
    return fig


def attention_map_figure(attention: np.ndarray, step: int, layer: int, head: int) -> go.Figure:
    """The full query × key attention of one (step, layer, head)."""
    fig = go.Figure(go.Heatmap(z=attention, colorscale="Magma", colorbar=dict(title="probability"),
                               hovertemplate="query %{y} → key %{x}: %{z:.3f}<extra></extra>"))
    fig.update_layout(title=f"Attention map: step {step}, layer {layer}, head {head}", xaxis_title="key position",
                      yaxis_title="query position", yaxis_autorange="reversed", height=420, margin=dict(l=50, r=10, t=40, b=40))
    return fig


def instability_bars(layers_frame: pd.DataFrame, title: str = "Sink-position instability per layer") -> go.Figure:
    """Variance over steps of the dominant position and of the sink centroid, per layer (``-1`` = all)."""
    x = ["all" if l == -1 else str(l) for l in layers_frame["layer"]]
    fig = go.Figure([go.Bar(x=x, y=layers_frame["dominant_var"], name="Var(d_t)"),
                     go.Bar(x=x, y=layers_frame["centroid_var"], name="Var(c_t)")])
    fig.update_layout(title=title, xaxis_title="layer", yaxis_title="variance over steps (tokens²)", barmode="group",
                      height=320, margin=dict(l=50, r=10, t=40, b=40))
    return fig


def position_stability(positions: pd.DataFrame, tau: float) -> go.Figure:
    """Per-position sink-score variance (bars coloured by label), sink frequency and the pruner's weights."""
    fig = go.Figure()
    for label, color in LABEL_COLORS.items():
        part = positions[positions["label"] == label]
        fig.add_trace(go.Bar(x=part["position"], y=part["variance"], name=f"{label} (variance)", marker_color=color))
    fig.add_trace(go.Scatter(x=positions["position"], y=positions["frequency"], name="sink frequency f_j", yaxis="y2",
                             mode="lines", line=dict(color="black", dash="dot")))
    fig.add_trace(go.Scatter(x=positions["position"], y=positions["weight"], name="down-weight w_j", yaxis="y2",
                             mode="lines", line=dict(color="green")))
    fig.add_hline(y=tau, line_dash="dash", line_color="red", annotation_text=f"tau = {tau:g}")
    fig.update_layout(title="Per-position sink stability", xaxis_title="position", yaxis_title="sink-score variance v_j",
                      yaxis2=dict(title="frequency / weight", overlaying="y", side="right", range=[0, 1.05]),
                      height=360, margin=dict(l=50, r=50, t=40, b=40), legend=dict(orientation="h", y=-0.2), barmode="overlay")
    return fig


def comparison_bars(frame: pd.DataFrame, labels: Sequence[str], metric: str = "dominant_var_norm") -> go.Figure:
    """A metric per layer for two reports side by side (e.g. AR against DLM)."""
    x = ["all" if l == -1 else str(l) for l in frame["layer"]]
    fig = go.Figure([go.Bar(x=x, y=frame[f"{label}_{metric}"], name=label) for label in labels])
    fig.update_layout(title=f"{metric} per layer", xaxis_title="layer", yaxis_title=metric, barmode="group",
                      height=320, margin=dict(l=50, r=10, t=40, b=40))
    return fig


def sparsity_heatmap(layer_sparsity: pd.DataFrame, title: str = "Sparsity per block and module") -> go.Figure:
    """Block × module share of zero weights."""
    table = layer_sparsity.pivot_table(index="block", columns="module", values="sparsity")
    fig = go.Figure(go.Heatmap(z=table.values, x=list(table.columns), y=[str(b) for b in table.index], zmin=0, zmax=1,
                               colorscale="Blues", colorbar=dict(title="sparsity"), texttemplate="%{z:.2f}"))
    fig.update_layout(title=title, xaxis_title="module", yaxis_title="block", height=300, margin=dict(l=50, r=10, t=40, b=40))
    return fig


def agreement_figure(table: dict[str, np.ndarray], prompt_length: int) -> go.Figure:
    """Per-position agreement of each run with the dense output (1 = same token)."""
    fig = go.Figure()
    for label, agree in table.items():
        fig.add_trace(go.Scatter(x=np.arange(len(agree)) + prompt_length, y=np.asarray(agree, float), mode="lines+markers", name=label))
    fig.update_layout(title="Agreement with the dense output", xaxis_title="position", yaxis_title="same token as dense (1 = yes)",
                      height=300, margin=dict(l=50, r=10, t=40, b=40))
    return fig


def sweep_figure(df: pd.DataFrame) -> go.Figure:
    """Perplexity against sparsity, one line per method and pattern, with ± standard-error bars; dense as a line."""
    fig = go.Figure()
    dense = df[df["method"] == "dense"]
    for (method, pattern), part in df[df["method"] != "dense"].groupby(["method", "pattern"], sort=False):
        part = part.sort_values("sparsity")
        fig.add_trace(go.Scatter(x=part["sparsity"], y=part["ppl"], error_y=dict(type="data", array=part["ppl_se"]),
                                 mode="lines+markers", name=f"{method} ({pattern})",
                                 line=dict(dash="solid" if pattern == "unstructured" else "dash")))
    if len(dense):
        fig.add_hline(y=float(dense["ppl"].iloc[0]), line_dash="dot", line_color="black", annotation_text="dense")
    fig.update_layout(title="Perplexity against sparsity", xaxis_title="sparsity (share of weights set to zero)",
                      yaxis_title="perplexity (lower is better)", yaxis_type="log", height=480, margin=dict(l=60, r=10, t=40, b=40))
    return fig
