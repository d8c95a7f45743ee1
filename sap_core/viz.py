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

from sap_core.sinks import mass_view

STATE_COLORS = {"prompt": "#9e9e9e", "masked": "#e0e0e0", "decoded": "#90caf9", "decoding": "#ff7043", "absent": "#ffffff"}
PAIR_COLORS = ("#1f77b4", "#d62728")  # AR, DLM (or first, second) wherever two models are compared
LABEL_COLORS = {"none": "#bdbdbd", "transient": "#ffca28", "stable": "#42a5f5", "unstable": "#ef5350"}

# Colour scales as explicit stops. Streamlit rewrites the colour codes #000001-#000010 in a plotly
# figure (its theme's placeholders, even with theme=None), which turned Magma's first stop #000004
# into pink or purple: every scale here starts outside that range, and both rise in luminance.
MASS_SCALE = [[0.0, "#440154"], [0.25, "#3b528b"], [0.5, "#21918c"], [0.75, "#5ec962"], [1.0, "#fde725"]]  # viridis
PROBABILITY_SCALE = [[0.0, "#0b0b1e"], [0.2, "#3b0f70"], [0.4, "#8c2981"], [0.6, "#de4968"], [0.8, "#fe9f6d"],
                     [1.0, "#fcfdbf"]]  # magma, first stop lifted out of Streamlit's placeholder range


def _uniform_multiple(mass: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Rows of ``mass[R, L]`` as multiples of their mean over the valid positions (the ``"uniform"``
    view of :mod:`sap_core.sinks`); NaN where not valid. ``valid``: ``bool [R, L]`` or ``[1, L]``."""
    valid = np.broadcast_to(valid, mass.shape)
    return mass_view(mass, "uniform", valid.sum(-1), absent=np.nan)


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
    fig = go.Figure(go.Heatmap(z=z, y=[str(l) for l in report.layers], colorscale=MASS_SCALE, colorbar=dict(title="× uniform"),
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
    fig = go.Figure(go.Heatmap(z=z, colorscale=MASS_SCALE, colorbar=dict(title="× uniform"),
                               hovertemplate="step %{y}, pos %{x}: %{z:.2f}× uniform<extra></extra>"))
    fig.add_trace(go.Scatter(x=dominant, y=steps, mode="lines+markers", name="dominant sink d_t",
                             line=dict(color="red", width=1.5), marker=dict(size=4)))
    fig.update_layout(title=f"Sink trajectory ({name})", xaxis_title="key position", yaxis_title="denoising step",
                      height=420, margin=dict(l=50, r=10, t=40, b=40), legend=dict(orientation="h", y=-0.15))
    return fig


def attention_map_figure(attention: np.ndarray, step: int, layer: int, head: int) -> go.Figure:
    """The full query × key attention of one (step, layer, head)."""
    fig = go.Figure(go.Heatmap(z=attention, colorscale=PROBABILITY_SCALE, colorbar=dict(title="probability"),
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


def comparison_bars(frame: pd.DataFrame, labels: Sequence[str], metric: str = "dominant_var") -> go.Figure:
    """A metric per layer for two reports side by side (e.g. AR against DLM); ``frame`` is
    :meth:`sap_core.sinks.SinkComparison.frame`."""
    from sap_core.sinks import METRIC_TITLES

    title = METRIC_TITLES.get(metric, metric)
    x = ["all" if l == -1 else str(l) for l in frame["layer"]]
    fig = go.Figure([go.Bar(x=x, y=frame[f"{label}_{metric}"], name=label, marker_color=PAIR_COLORS[i % 2])
                     for i, label in enumerate(labels)])
    fig.update_layout(title=f"{title} per layer", xaxis=dict(title="layer (all = summed over layers)", type="category"),
                      yaxis_title=title, barmode="group", height=340, margin=dict(l=60, r=10, t=40, b=40))
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
    """Perplexity against sparsity from a sweep DataFrame (:func:`sap_core.sweep.run_sweep`).

    One line per method and pattern (colour: method; dash and marker: pattern), with ``ppl_se`` as
    error bars; an N:M pattern, whose sparsity is fixed, is one marker per method. Rows with
    method ``"dense"`` are drawn as a horizontal dashed reference line with a ±1 SE band. Points
    of different methods at the same sparsity are spread a little sideways so that their error bars
    stay readable (the hover shows the true sparsity). The y axis turns logarithmic when the
    perplexities span more than a factor of 10.
    """
    fig = go.Figure()
    if df is None or len(df) == 0:
        fig.add_annotation(text="no sweep results yet", showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper")
        fig.update_layout(xaxis_title="sparsity (fraction of weights removed)", yaxis_title="perplexity")
        return fig
    dense = df[df["method"] == "dense"]
    rest = df[df["method"] != "dense"]
    methods = list(dict.fromkeys(rest["method"]))
    patterns = list(dict.fromkeys(rest["pattern"]))
    palette = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f"]
    dashes = ["solid", "dash", "dot", "dashdot", "longdash"]
    symbols = ["circle", "diamond", "square", "triangle-up", "x"]
    width = 0.003 * max(len(methods) - 1, 0)
    has_se = "ppl_se" in df.columns
    for i, method in enumerate(methods):
        offset = (i / max(len(methods) - 1, 1) - 0.5) * width * 2 if len(methods) > 1 else 0.0
        for j, pattern in enumerate(patterns):
            part = rest[(rest["method"] == method) & (rest["pattern"] == pattern)].sort_values("sparsity")
            if part.empty:
                continue
            name = f"{method} ({pattern})"
            se = part["ppl_se"].to_numpy(float) if has_se else None
            fig.add_trace(go.Scatter(
                x=part["sparsity"].to_numpy(float) + offset, y=part["ppl"].to_numpy(float),
                mode="lines+markers" if len(part) > 1 else "markers", name=name,
                legendgroup=method,
                line=dict(color=palette[i % len(palette)], dash=dashes[j % len(dashes)]),
                marker=dict(symbol=symbols[j % len(symbols)], size=8 if len(part) > 1 else 10),
                error_y=dict(type="data", array=se, visible=se is not None, thickness=1.2, width=4),
                customdata=np.stack([part["sparsity"].to_numpy(float), se if se is not None else np.zeros(len(part))], axis=1),
                hovertemplate=f"{name}<br>sparsity %{{customdata[0]:.0%}}<br>ppl %{{y:.2f}} ± %{{customdata[1]:.2f}}<extra></extra>",
            ))
    all_ppl = df["ppl"].to_numpy(float)
    all_ppl = all_ppl[np.isfinite(all_ppl) & (all_ppl > 0)]
    log_y = all_ppl.size > 0 and all_ppl.max() / all_ppl.min() > 10
    xs = rest["sparsity"].to_numpy(float) if not rest.empty else np.array([0.0])
    x_range = [max(float(xs.min()) - 0.08, 0.0), min(float(xs.max()) + 0.08, 1.0)]
    if not dense.empty:
        ppl = float(dense["ppl"].iloc[0])
        se = float(dense["ppl_se"].iloc[0]) if has_se and np.isfinite(dense["ppl_se"].iloc[0]) else 0.0
        label = f"dense {ppl:.2f}" + (f" ± {se:.2f}" if se > 0 else "")
        if se > 0:  # ±1 SE band as a filled trace (shapes need log10 coordinates on a log axis)
            fig.add_trace(go.Scatter(x=[x_range[0], x_range[1], x_range[1], x_range[0]],
                                     y=[ppl - se, ppl - se, ppl + se, ppl + se], fill="toself", mode="none",
                                     fillcolor="rgba(0,0,0,0.1)", hoverinfo="skip", showlegend=False, legendgroup="dense"))
        fig.add_trace(go.Scatter(x=x_range, y=[ppl, ppl], mode="lines", name=label, legendgroup="dense",
                                 line=dict(color="black", dash="dash", width=1.5),
                                 hovertemplate=f"{label}<extra></extra>"))
    fig.update_layout(
        title="Perplexity after pruning (lower is better; error bars: ±1 standard error)",
        xaxis=dict(title="sparsity (fraction of weights removed)", tickformat=".0%",
                   tickvals=sorted(set(np.round(xs, 4))), range=x_range),
        yaxis=dict(title="perplexity" + (" (log scale)" if log_y else ""), type="log" if log_y else "linear"),
        legend=dict(title="method (pattern)"), template="plotly_white", hovermode="closest",
    )
    return fig


def sink_trajectory_pair(reports: dict, normalize: str = "raw") -> go.Figure:
    """Step × position sink trajectories of two models side by side (e.g. ``{"AR": r1, "DLM": r2}``),
    on the same axes and colour range: colour = the aggregate mass in the view ``normalize`` (the
    one whose argmax is the dominant position ``d_t``, traced in red). Positions a causal model has
    not fed yet are blank. The colour range runs from 0 to the 99th percentile of both panels, so
    one extreme cell does not wash out the rest."""
    from plotly.subplots import make_subplots

    from sap_core.sinks import VIEW_NOTES, mass_view

    labels = list(reports)
    views = [mass_view(r.mass, normalize, r.valid_length, r.causal, absent=np.nan) for r in reports.values()]
    finite = np.concatenate([v[np.isfinite(v)] for v in views])
    zmax = float(np.percentile(finite, 99)) if finite.size else 1.0
    length = max(r.length for r in reports.values())
    steps = max(r.n_steps for r in reports.values())
    title = VIEW_NOTES[normalize][0]
    fig = make_subplots(rows=1, cols=len(labels), shared_yaxes=True, horizontal_spacing=0.04,
                        subplot_titles=[f"{label}: {r.n_steps} steps, {'causal' if r.causal else 'masked diffusion'}"
                                        for label, r in reports.items()])
    for i, (label, r) in enumerate(reports.items()):
        fig.add_trace(go.Heatmap(z=views[i], zmin=0, zmax=zmax, colorscale=MASS_SCALE, showscale=i == 0,
                                 colorbar=dict(title=dict(text=title, side="right"), len=0.9),
                                 hovertemplate=f"{label}<br>step %{{y}}, pos %{{x}}: %{{z:.3g}}<extra></extra>"),
                      row=1, col=i + 1)
        fig.add_trace(go.Scatter(x=r.dominant, y=np.arange(r.n_steps), mode="lines+markers", name="dominant sink d_t",
                                 showlegend=i == 0, legendgroup="dominant", line=dict(color="red", width=1.5),
                                 marker=dict(size=4)), row=1, col=i + 1)
        fig.update_xaxes(title_text="key position", range=[-0.5, length - 0.5], row=1, col=i + 1)
    fig.update_yaxes(title_text="step", range=[steps - 0.5, -0.5], row=1, col=1)
    fig.update_layout(title=f"Sink trajectories, same axes and colour range · {title}", height=460,
                      margin=dict(l=60, r=10, t=70, b=40), legend=dict(orientation="h", y=-0.15), plot_bgcolor="white")
    return fig


def sinkstats_figure(summary: pd.DataFrame, labels: Sequence[str]) -> go.Figure:
    """Across-prompt statistics per layer with ±1 standard-error bars: one panel per statistic, one
    series per model (``labels`` = (DLM, AR), drawn AR first in the AR and DLM colours), from :meth:`sap_core.sinkstats.SinkStats.summary`. Layer "all"
    is the aggregate over the selected layers (the Sink stability page's figures)."""
    from plotly.subplots import make_subplots

    from sap_core.sinkstats import STATISTICS

    stats = list(STATISTICS)
    fig = make_subplots(rows=2, cols=2, subplot_titles=[STATISTICS[s] for s in stats], vertical_spacing=0.2,
                        horizontal_spacing=0.08)
    layers = sorted(summary["layer"].unique(), key=lambda x: (x != -1, x))
    names = ["all" if l == -1 else str(l) for l in layers]
    n = int(summary["n"].max()) if len(summary) else 0
    for k, stat in enumerate(stats):
        row, col = k // 2 + 1, k % 2 + 1
        for label, color in ((labels[1], PAIR_COLORS[0]), (labels[0], PAIR_COLORS[1])):  # AR first, as everywhere
            part = summary[(summary["statistic"] == stat) & (summary["group"] == label)].set_index("layer").reindex(layers)
            fig.add_trace(go.Bar(x=names, y=part["mean"], name=label, marker_color=color, showlegend=k == 0,
                                 legendgroup=label, error_y=dict(type="data", array=part["se"].fillna(0), thickness=1.2, width=3,
                                                                 color="#333333"),
                                 hovertemplate=f"{label}, layer %{{x}}: %{{y:.3g}} ± %{{error_y.array:.2g}}<extra></extra>"),
                          row=row, col=col)
        fig.update_xaxes(title_text="layer", type="category", row=row, col=col)
    fig.update_layout(title=f"Across {n} prompts: mean ± 1 standard error", barmode="group", height=640,
                      margin=dict(l=60, r=10, t=100, b=40), template="plotly_white",
                      legend=dict(orientation="h", x=0.5, xanchor="center", y=1.1, yanchor="bottom"))
    return fig
