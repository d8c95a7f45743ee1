"""Plotly figure builders: pure functions from SinkScope's records to figures.

Every figure the app shows is built here, with axis titles and units; the pages never build
figures inline. Mass heatmaps show the mass a key receives as a multiple of the uniform mass of its
step (1 = average), so layers and steps are comparable.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from sap_core import sinks
from sap_core.evaluate import DENSE, paired_se_if_known
from sap_core.sink_report import METRIC_TITLES
from sap_core.sinks import VIEW_NOTES, mass_view
from sap_core.sinkstats import STATISTICS
from sap_core.sweep import series

STATE_COLORS = {"prompt": "#9e9e9e", "masked": "#e0e0e0", "decoded": "#90caf9", "decoding": "#ff7043", "absent": "#ffffff"}
PAIR_COLORS = ("#1f77b4", "#d62728")  # AR, DLM (or first, second) wherever two models are compared
LABEL_COLORS = {"none": "#bdbdbd", "transient": "#ffca28", "stable": "#42a5f5", "unstable": "#ef5350"}

# Colour scales as explicit stops. Streamlit rewrites the colour codes #000001-#000010 in a plotly
# figure (its theme's placeholders, even with theme=None), which turned Magma's first stop #000004
# into pink or purple: every scale here starts outside that range, and both rise in luminance.
MASS_SCALE = [[0.0, "#440154"], [0.25, "#3b528b"], [0.5, "#21918c"], [0.75, "#5ec962"], [1.0, "#fde725"]]  # viridis
PROBABILITY_SCALE = [
    [0.0, "#0b0b1e"],
    [0.2, "#3b0f70"],
    [0.4, "#8c2981"],
    [0.6, "#de4968"],
    [0.8, "#fe9f6d"],
    [1.0, "#fcfdbf"],
]  # magma, first stop lifted out of Streamlit's placeholder range


TOOLBAR_PX = 30  # height of the band at a figure's top where plotly's toolbar (modebar) appears on hover


def _clear_of_toolbar(fig: go.Figure) -> go.Figure:
    """Keep a figure's title out of the band at its top where plotly's toolbar appears (the toolbar sits
    in the top-right corner of the figure and covered titles): the title goes just below that band, left
    aligned, and the top margin grows by the band's height so nothing else moves into it. A subtitle
    (``title.subtitle``) gets a further line."""
    t = fig.layout.margin.t if fig.layout.margin.t is not None else 80
    extra = 18 if fig.layout.title.subtitle.text else 0
    fig.update_layout(
        margin=dict(t=t + TOOLBAR_PX + extra),
        title=dict(x=0, xref="paper", xanchor="left", y=1, yref="container", yanchor="top", pad=dict(t=TOOLBAR_PX)),
    )
    return fig


AXIS_FONT = dict(size=14, color="#1a1a1a")  # every figure's axis text: tick labels and titles, legend (readable on a projector)


def _readable(fig: go.Figure) -> go.Figure:
    """Axis text of ``fig`` large and dark enough for a projector at 1280x720 (:data:`AXIS_FONT`): the
    base font, every axis's tick labels and title, the legend and colour bars; a tick size a figure set
    itself (token labels on a crowded axis) is kept, only darkened."""
    fig.update_layout(
        font=AXIS_FONT,
        legend=dict(font=AXIS_FONT),
        title=dict(font=dict(size=17, color=AXIS_FONT["color"]), subtitle_font=dict(size=13, color="#333333")),
    )

    def axis(ax) -> None:
        ax.update(title_font=AXIS_FONT, tickfont=dict(size=ax.tickfont.size or AXIS_FONT["size"], color=AXIS_FONT["color"]))

    fig.for_each_xaxis(axis)
    fig.for_each_yaxis(axis)
    fig.update_traces(colorbar=dict(tickfont=AXIS_FONT, title_font=AXIS_FONT), selector=lambda t: "colorbar" in t)
    return fig


def _finished(fig: go.Figure) -> go.Figure:
    """The last touch every figure gets: readable axis text, the title clear of the toolbar."""
    return _clear_of_toolbar(_readable(fig))


def uniform_multiple(mass: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Rows of ``mass[..., L]`` as multiples of their mean over the valid positions (the ``"uniform"``
    view of :mod:`sap_core.sinks`); NaN where not valid. ``valid``: ``bool``, broadcastable to ``mass``."""
    valid = np.broadcast_to(valid, mass.shape)
    rows = mass.reshape(-1, mass.shape[-1])
    out = mass_view(rows, "uniform", valid.reshape(rows.shape).sum(-1), absent=np.nan)
    return out.reshape(mass.shape)


def attention_map_figure(
    attention: np.ndarray, step: int, layer: int, head: int, tokens: Sequence[str] | None = None, max_labels: int = 96
) -> go.Figure:
    """The full query × key attention of one (step, layer, head), drawn square, tokens on both axes
    (tick labels up to ``max_labels`` positions; the hover always names both tokens)."""
    n = attention.shape[-1]
    tokens = [str(i) for i in range(n)] if tokens is None else list(tokens)
    names = [f"{j} '{t}'" for j, t in enumerate(tokens)]
    fig = go.Figure(
        go.Heatmap(
            z=np.round(attention, 4),
            x=list(range(n)),
            y=list(range(n)),
            colorscale=PROBABILITY_SCALE,
            zmin=0.0,
            colorbar=dict(title="probability", thickness=14),
            customdata=[[[names[q], names[k]] for k in range(n)] for q in range(n)],
            hovertemplate="query %{customdata[0]} → key %{customdata[1]}: %{z:.3f}<extra></extra>",
        )
    )
    axis = dict(range=[-0.5, n - 0.5], showgrid=False, zeroline=False)
    if n <= max_labels:
        axis.update(tickmode="array", tickvals=list(range(n)), ticktext=tokens, tickfont=dict(size=9))
    size = 760 if n > 24 else 520
    fig.update_layout(
        title=f"Attention map: step {step}, layer {layer}, head {head}",
        width=size + 100,
        height=size,
        xaxis=dict(title="key position (token)", tickangle=-90, constrain="domain", **axis),
        yaxis=dict(
            title="query position (token)",
            scaleanchor="x",
            scaleratio=1,
            constrain="domain",
            autorange=False,
            **{**axis, "range": [n - 0.5, -0.5]},
        ),
        margin=dict(l=80, r=10, t=40, b=80),
        plot_bgcolor="#ffffff",
    )
    return _finished(fig)


def instability_bars(
    layers_frame: pd.DataFrame, title: str = "How far the sinks move: variance of their position over the steps"
) -> go.Figure:
    """Variance over steps of the dominant position and of the sink centroid, per layer (``-1`` = all)."""
    x = ["all layers" if l == -1 else f"layer {l}" for l in layers_frame["layer"]]
    fig = go.Figure(
        [
            go.Bar(
                x=x,
                y=layers_frame["dominant_var"],
                name="strongest position (dominant sink)",
                hovertemplate="%{x}: variance %{y:.2f} tokens²<extra>dominant sink</extra>",
            ),
            go.Bar(
                x=x,
                y=layers_frame["centroid_var"],
                name="mass-weighted centre of the sinks",
                hovertemplate="%{x}: variance %{y:.2f} tokens²<extra>sink centre</extra>",
            ),
        ]
    )
    fig.update_layout(
        title=title,
        xaxis_title="layer",
        yaxis_title="variance over the steps (tokens²)",
        barmode="group",
        height=340,
        margin=dict(l=60, r=10, t=50, b=40),
        legend=dict(orientation="h", y=1.12, x=0),
    )
    return _finished(fig)


def detector_agreement_figure(agreement: pd.DataFrame) -> go.Figure:
    """Heat map of :func:`sap_core.sink_report.detector_agreement`: one row per pair of different detectors,
    one column per layer (``all layers`` first), colour and text the Jaccard overlap of their sink sets."""
    names = list(dict.fromkeys(agreement["first"]))
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1 :]]
    layers = list(dict.fromkeys(agreement["layer"]))
    table = agreement.set_index(["first", "second", "layer"])["jaccard"]
    z = np.array([[table[a, b, layer] for layer in layers] for a, b in pairs], np.float64).reshape(len(pairs), len(layers))
    x = ["all layers" if l == -1 else f"layer {l}" for l in layers]
    y = [f"{a} vs {b}" for a, b in pairs]
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=x,
            y=y,
            zmin=0,
            zmax=1,
            colorscale="Viridis",
            text=np.round(z, 2),
            texttemplate="%{text}",
            colorbar=dict(title="Jaccard"),
            hovertemplate="%{y}, %{x}: Jaccard %{z:.2f}<extra></extra>",
        )
    )
    fig.update_layout(
        title="Do the detectors find the same sinks? Overlap of their (step, position) sink sets",
        height=max(220, 60 + 34 * len(pairs)),
        margin=dict(l=160, r=10, t=50, b=40),
        yaxis=dict(autorange="reversed"),
    )
    return _finished(fig)


def position_stability(positions: pd.DataFrame, tau: float) -> go.Figure:
    """Per-position sink-score variance (one bar per position, coloured by its label), sink frequency
    and the gated pruner's down-weighting factor, on a fixed x range ``[-0.5, L - 0.5]``. A ``token_text``
    column, when present, names each position's token in the hover."""
    pos = positions["position"].to_numpy()
    L = int(pos.max()) + 1 if len(pos) else 1
    text = positions["token_text"].astype(str).to_numpy() if "token_text" in positions else pos.astype(str)
    labels = positions["label"].astype(str).to_numpy()
    custom = np.stack([text, labels, positions["frequency"].to_numpy(float), positions["weight"].to_numpy(float)], axis=1)
    fig = go.Figure(
        go.Bar(
            x=pos,
            y=positions["variance"],
            width=0.8,
            showlegend=False,
            customdata=custom,
            marker_color=[LABEL_COLORS.get(l, "#bdbdbd") for l in labels],
            hovertemplate="position %{x} '%{customdata[0]}': %{customdata[1]}<br>score variance %{y:.4f}"
            "<br>sink at %{customdata[2]:.0%} of steps · weight %{customdata[3]:.2f}<extra></extra>",
        )
    )
    for label, color in LABEL_COLORS.items():  # legend entries for the bar colours
        fig.add_trace(
            go.Scatter(x=[None], y=[None], mode="markers", name=label, marker=dict(size=11, color=color, symbol="square"))
        )
    fig.add_trace(
        go.Scatter(
            x=pos,
            y=positions["frequency"],
            name="share of steps as a sink",
            yaxis="y2",
            mode="lines",
            line=dict(color="black", dash="dot"),
            hoverinfo="skip",
        )
    )
    fig.add_trace(
        go.Scatter(
            x=pos,
            y=positions["weight"],
            name="gated pruner's down-weighting factor",
            yaxis="y2",
            mode="lines",
            line=dict(color="green"),
            hoverinfo="skip",
        )
    )
    fig.add_hline(y=tau, line_dash="dash", line_color="red", annotation_text=f"tau = {tau:g}")
    fig.update_layout(
        title="Per-position sink stability: variance of the sink score over the steps",
        xaxis=dict(title="position (token index)", range=[-0.5, L - 0.5]),
        yaxis_title="sink-score variance",
        yaxis2=dict(
            title="share of steps / factor",
            overlaying="y",
            side="right",
            range=[0, 1.05],
            tickvals=[0, 0.25, 0.5, 0.75, 1],
            showgrid=False,
        ),
        height=440,
        margin=dict(l=60, r=60, t=50, b=110),
        legend=dict(orientation="h", yanchor="top", y=-0.3),  # below the axis title, not over it
    )
    return _finished(fig)


def comparison_bars(frame: pd.DataFrame, labels: Sequence[str], metric: str = "dominant_var") -> go.Figure:
    """A metric per layer for two reports side by side (e.g. AR against DLM); ``frame`` is
    :meth:`sap_core.sink_report.SinkComparison.frame`."""
    title = METRIC_TITLES.get(metric, metric)
    x = ["all" if l == -1 else str(l) for l in frame["layer"]]
    fig = go.Figure(
        [go.Bar(x=x, y=frame[f"{label}_{metric}"], name=label, marker_color=PAIR_COLORS[i % 2]) for i, label in enumerate(labels)]
    )
    fig.update_layout(
        title=f"{title} per layer",
        xaxis=dict(title="layer (all = summed over layers)", type="category"),
        yaxis_title=title,
        barmode="group",
        height=340,
        margin=dict(l=60, r=10, t=40, b=40),
    )
    return _finished(fig)


def sparsity_heatmap(layer_sparsity: pd.DataFrame, title: str | None = None, *, removed: bool = False) -> go.Figure:
    """Block × module share of zero weights; modules in the order the forward pass runs them (the
    frame's own order, :func:`sap_core.pruning.target_linears`), every block labelled. ``removed``: a
    structured variant's frame, whose "zeros" are parameters removed from the model (titles say so)."""
    what = "removed parameters" if removed else "zero weights"
    title = title or f"Share of {what} per block and module"
    order = list(dict.fromkeys(layer_sparsity["module"]))
    table = layer_sparsity.pivot_table(index="block", columns="module", values="sparsity").reindex(columns=order)
    blocks = [f"block {b}" for b in table.index]
    fig = go.Figure(
        go.Heatmap(
            z=table.values,
            x=order,
            y=blocks,
            zmin=0,
            zmax=1,
            colorscale="Blues",
            colorbar=dict(title="removed" if removed else "sparsity"),
            texttemplate="%{z:.2f}",
            hovertemplate="%{y}, %{x}: %{z:.3f} of the "
            + ("parameters removed" if removed else "weights are zero")
            + "<extra></extra>",
        )
    )
    fig.update_layout(
        title=title,
        xaxis=dict(title="module (forward order)", type="category"),
        yaxis=dict(
            title="transformer block", type="category", autorange="reversed", tickmode="array", tickvals=blocks, ticktext=blocks
        ),
        height=max(260, 60 + 28 * len(blocks)),
        margin=dict(l=80, r=10, t=50, b=50),
    )
    return _finished(fig)


FACTOR_SCALE = [
    [0.0, "#7f0000"],
    [0.5, "#d32f2f"],
    [0.8, "#ff8a65"],
    [1.0, "#f5f5f5"],
]  # factor 0 (down-weighted) to 1 (untouched)


def factor_strip(
    tokens: Sequence[str], factors: pd.DataFrame, tau: float, window: int = 0, label_below: float = 0.9
) -> go.Figure:
    """One calibration window of a pruning run as two strips of its tokens, coloured by the factor each
    token's layer inputs were multiplied by (mean over the noised timesteps), read from the run's record
    (:meth:`sap_core.pruning.record.SinkRecord.window_factors`: columns ``mean_score``, ``official``, ``gate``,
    ``gated``): ``official rule`` (no gate, ``sink_wanda`` / ``sink_sparsegpt``): ``1 − s̄_j`` for every
    token; ``gated at tau``: ``1 − g_j · s̄_j``, ``g_j`` the variance gate (its unstable sinks). Dark =
    down-weighted, white = untouched. The x axis names the tokens whose official factor is below
    ``label_below`` (the sinks); the hover shows token, position, score and both factors."""
    score = factors["mean_score"].to_numpy(float)
    official, gated_f = factors["official"].to_numpy(float), factors["gated"].to_numpy(float)
    gate = factors["gate"].to_numpy(bool)
    n = score.size
    if len(tokens) != n:
        raise ValueError(f"tokens and factors must have one entry per position (got {len(tokens)}, {n})")
    rows = ["official rule (no gate)", f"gated at tau = {tau:g}"]
    state = np.where(gate, "unstable sink: gated", "not gated")
    custom = np.array(
        [[[tokens[j], f"{score[j]:.3f}", f"{official[j]:.3f}", f"{gated_f[j]:.3f}", state[j], j] for j in range(n)]] * 2,
        dtype=object,
    )
    fig = go.Figure(
        go.Heatmap(
            z=np.stack([official, gated_f]),
            x=np.arange(n),
            y=rows,
            zmin=0,
            zmax=1,
            colorscale=FACTOR_SCALE,
            xgap=1,
            ygap=3,
            colorbar=dict(title=dict(text="factor", side="right"), thickness=12, len=1.0, tickvals=[0, 0.5, 1]),
            customdata=custom,
            hovertemplate="%{y}<br>position %{customdata[5]} '%{customdata[0]}'<br>mean sink score %{customdata[1]}"
            "<br>factor %{z:.3f} (official %{customdata[2]}, gated %{customdata[3]}; %{customdata[4]})<extra></extra>",
        )
    )
    marked = [j for j in range(n) if official[j] < label_below]
    n_gated = int(gate.sum())
    fig.update_layout(
        title=dict(
            text=f"Which calibration tokens were down-weighted (window {window}, {n} tokens)",
            subtitle=dict(
                text=f"factor = 1 − sink score, mean over the noised timesteps; {len(marked)} tokens below {label_below:g} "
                f"under the official rule, {n_gated} gated at tau = {tau:g}"
            ),
        ),
        xaxis=dict(
            title="calibration position (labelled: tokens the official rule down-weights)",
            range=[-0.5, n - 0.5],
            tickmode="array",
            tickvals=marked,
            ticktext=[f"{tokens[j]} ({j})" for j in marked],
            tickangle=-45,
            showgrid=False,
            zeroline=False,
        ),
        yaxis=dict(autorange="reversed", showgrid=False),
        height=300,
        margin=dict(l=10, r=10, t=40, b=90),
        plot_bgcolor="white",
    )
    return _finished(fig)


AGREEMENT_SCALE = [[0.0, "#ef5350"], [0.5, "#ef5350"], [0.5, "#c8e6c9"], [1.0, "#c8e6c9"]]  # differs, same


def agreement_figure(
    table: dict[str, np.ndarray], prompt_length: int, tokens: dict[str, Sequence[str]] | None = None, dense: str = "dense"
) -> go.Figure:
    """Variants × generated positions strip: green where the variant's final token equals the dense
    model's, red where it differs. ``tokens`` maps each label (and ``dense``) to its token texts,
    shown in the hover."""
    labels = list(table)
    z = np.array([np.asarray(table[l], float) for l in labels]) if labels else np.zeros((0, 0))
    n = z.shape[1] if z.size else 0
    x = np.arange(n) + prompt_length
    fig = go.Figure()
    if n:
        theirs = [list((tokens or {}).get(l, [""] * n)) for l in labels]
        ref = list((tokens or {}).get(dense, [""] * n))
        custom = np.array([[[t, r] for t, r in zip(row, ref)] for row in theirs], dtype=object)
        fig.add_trace(
            go.Heatmap(
                z=z,
                x=x,
                y=labels,
                zmin=0,
                zmax=1,
                colorscale=AGREEMENT_SCALE,
                showscale=False,
                xgap=1,
                ygap=2,
                customdata=custom,
                hovertemplate="%{y}, position %{x}: '%{customdata[0]}' (dense: '%{customdata[1]}')<extra></extra>",
            )
        )
    for name, color in (("same token as dense", AGREEMENT_SCALE[-1][1]), ("different token", AGREEMENT_SCALE[0][1])):
        fig.add_trace(
            go.Scatter(x=[None], y=[None], mode="markers", name=name, marker=dict(size=11, color=color, symbol="square"))
        )
    fig.update_layout(
        title="Final tokens compared with the dense model's, per generated position",
        xaxis=dict(title="position (token index)", range=[prompt_length - 0.5, prompt_length + n - 0.5]),
        yaxis=dict(title="variant", type="category", autorange="reversed"),
        height=max(200, 120 + 36 * len(labels)),
        margin=dict(l=60, r=10, t=50, b=40),
        legend=dict(orientation="h", y=1.02, x=1, xanchor="right", yanchor="bottom"),
        plot_bgcolor="white",
    )
    return _finished(fig)


SWEEP_VIEWS = ("delta", "absolute")
PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f"]


def sweep_deltas(df: pd.DataFrame) -> pd.DataFrame:
    """Every pruned row of a sweep against its ``dense`` row: ``delta_nll`` (nats/token), ``se`` and
    ``paired``: the paired standard error of the difference (:func:`sap_core.evaluate.paired_se`, draw by draw
    on the per-draw estimates in ``df.attrs["estimates"]``) when both rows have them, else the independent
    one ``sqrt(se² + se_dense²)`` (``paired`` False: a causal model, or a CSV without its estimates); ``z``;
    ``rel_ppl`` = ppl/ppl_dense − 1 = exp(delta_nll) − 1 and its ±2 SE interval ``rel_lo``, ``rel_hi``.
    Empty without a dense row."""
    cols = ["method", "pattern", "sparsity", "label", "delta_nll", "se", "paired", "z", "rel_ppl", "rel_lo", "rel_hi"]
    dense = df[df["method"] == DENSE] if df is not None and len(df) else df
    if dense is None or dense.empty:
        return pd.DataFrame(columns=cols)
    d0 = dense.iloc[0]
    estimates = df.attrs.get("estimates") or {}
    e0 = estimates.get(str(d0.get("label", DENSE)))
    rows = []
    for _, r in df[df["method"] != DENSE].iterrows():
        e = estimates.get(str(r.get("label", "")))
        d = float(r["nll"]) - float(d0["nll"])
        sp = paired_se_if_known(e, e0)
        paired = bool(np.isfinite(sp))
        se = sp if paired else math.sqrt(float(r["nll_se"]) ** 2 + float(d0["nll_se"]) ** 2)
        rows.append(
            dict(
                method=r["method"],
                pattern=r["pattern"],
                sparsity=float(r["sparsity"]),
                label=str(r.get("label", "")),
                delta_nll=d,
                se=se,
                paired=paired,
                z=d / se if se > 0 else math.nan,
                rel_ppl=math.expm1(d),
                rel_lo=math.expm1(d - 2 * se),
                rel_hi=math.expm1(d + 2 * se),
            )
        )
    return pd.DataFrame(rows, columns=cols)


def _sweep_trace(part: pd.DataFrame, common: dict, deltas: pd.DataFrame | None, has_se: bool) -> go.Scatter:
    """One method × pattern line of :func:`sweep_figure`: Δ vs dense with its ±2 SE (``deltas`` given) or perplexity ± 1 SE."""
    if deltas is not None:
        d = deltas.reindex([str(v) for v in part["label"]])
        y = 100 * d["rel_ppl"].to_numpy(float)
        return go.Scatter(
            y=y,
            error_y=dict(
                type="data",
                symmetric=False,
                array=100 * d["rel_hi"].to_numpy(float) - y,
                arrayminus=y - 100 * d["rel_lo"].to_numpy(float),
                thickness=1.2,
                width=4,
            ),
            customdata=np.stack(
                [
                    part["sparsity"].to_numpy(float),
                    d["delta_nll"].to_numpy(float),
                    d["se"].to_numpy(float),
                    d["z"].to_numpy(float),
                    part["ppl"].to_numpy(float),
                    np.where(d["paired"].to_numpy(bool), 1.0, 0.0),
                ],
                axis=1,
            ),
            hovertemplate="%{text}<br>sparsity %{customdata[0]:.0%} · ppl %{customdata[4]:.2f}"
            "<br>Δ perplexity vs dense %{y:+.1f} %<br>Δ NLL %{customdata[1]:+.4f} ± %{customdata[2]:.4f} "
            "nats/token (z = %{customdata[3]:+.1f})<extra></extra>",
            **common,
        )
    else:
        se = part["ppl_se"].to_numpy(float) if has_se else None
        return go.Scatter(
            y=part["ppl"].to_numpy(float),
            error_y=dict(type="data", array=se, visible=se is not None, thickness=1.2, width=4),
            customdata=np.stack([part["sparsity"].to_numpy(float), se if se is not None else np.zeros(len(part))], axis=1),
            hovertemplate="%{text}<br>sparsity %{customdata[0]:.0%}<br>ppl %{y:.2f} ± %{customdata[1]:.2f}<extra></extra>",
            **common,
        )


def _delta_layout(fig: go.Figure, dense: pd.DataFrame, deltas: pd.DataFrame, xaxis: dict, x_range: list) -> None:
    """The dense line at 0 and the titles of :func:`sweep_figure`'s Δ view."""
    ppl = float(dense["ppl"].iloc[0])
    paired = bool(deltas["paired"].all()) if len(deltas) else True
    kind = "paired" if paired else "independent (no per-draw estimates)"
    fig.add_trace(
        go.Scatter(
            x=x_range,
            y=[0, 0],
            mode="lines",
            name=f"dense (perplexity {ppl:.2f})",
            line=dict(color="black", dash="dash", width=1.5),
            hovertemplate=f"dense: perplexity {ppl:.2f}<extra></extra>",
        )
    )
    fig.update_layout(
        title=dict(
            text="Perplexity after pruning: change against the dense model (lower is better)",
            subtitle=dict(text=f"error bars: ±2 {kind} standard errors of the difference; clear of 0 = beyond the noise"),
        ),
        xaxis=xaxis,
        yaxis=dict(title="Δ perplexity vs dense (%)", ticksuffix=" %", zeroline=True),
    )


def _absolute_layout(
    fig: go.Figure, df: pd.DataFrame, dense: pd.DataFrame, has_se: bool, xaxis: dict, x_range: list, fallback: str | None
) -> None:
    """The dense line with its ±1 SE band and the titles of :func:`sweep_figure`'s absolute view."""
    all_ppl = df["ppl"].to_numpy(float)
    all_ppl = all_ppl[np.isfinite(all_ppl) & (all_ppl > 0)]
    log_y = all_ppl.size > 0 and all_ppl.max() / all_ppl.min() > 10
    if not dense.empty:
        ppl = float(dense["ppl"].iloc[0])
        se = float(dense["ppl_se"].iloc[0]) if has_se and np.isfinite(dense["ppl_se"].iloc[0]) else 0.0
        label = f"dense {ppl:.2f}" + (f" ± {se:.2f}" if se > 0 else "")
        if se > 0:  # ±1 SE band as a filled trace (shapes need log10 coordinates on a log axis)
            fig.add_trace(
                go.Scatter(
                    x=[x_range[0], x_range[1], x_range[1], x_range[0]],
                    y=[ppl - se, ppl - se, ppl + se, ppl + se],
                    fill="toself",
                    mode="none",
                    fillcolor="rgba(0,0,0,0.1)",
                    hoverinfo="skip",
                    showlegend=False,
                    legendgroup="dense",
                )
            )
        fig.add_trace(
            go.Scatter(
                x=x_range,
                y=[ppl, ppl],
                mode="lines",
                name=label,
                legendgroup="dense",
                line=dict(color="black", dash="dash", width=1.5),
                hovertemplate=f"{label}<extra></extra>",
            )
        )
    note = "error bars: ±1 standard error of each row (unpaired; mostly masking noise that every row shares)"
    if fallback:
        note = f"Δ view unavailable ({fallback}); " + note
    fig.update_layout(
        title=dict(text="Perplexity after pruning (lower is better)", subtitle=dict(text=note)),
        xaxis=xaxis,
        yaxis=dict(title="perplexity" + (" (log scale)" if log_y else ""), type="log" if log_y else "linear"),
    )


def sweep_figure(df: pd.DataFrame, view: str = "delta") -> go.Figure:
    """A sweep DataFrame (:func:`sap_core.sweep.run_sweep`) against sparsity, in one of two views.

    ``view="delta"`` (default): the change of perplexity against the dense model, ppl/ppl_dense − 1 in
    percent, with error bars ±2 standard errors of the *difference* (:func:`sweep_deltas`: paired, draw
    by draw on the same windows and masks, when the per-draw estimates are there); a bar that does not
    cross 0 is a change beyond the Monte Carlo noise. Each row's own error is mostly the masking noise that
    every row shares, so it hides differences that the paired error shows. Without a dense row (or without
    ``nll`` columns) it falls back to the absolute view and says so in the title.

    ``view="absolute"``: perplexity with each row's own ±1 SE (``ppl_se``, unpaired), the dense row as a
    horizontal dashed line with a ±1 SE band; the y axis turns logarithmic when the perplexities span more
    than a factor of 10.

    Both: one line per method and pattern (colour: method; dash and marker: pattern); an N:M pattern,
    whose sparsity is fixed, is one marker per method; points of different methods at the same sparsity
    are spread a little sideways so that their error bars stay readable (the hover shows the row's
    ``label``, true sparsity and, in the delta view, the difference in nats/token with its SE and z).
    """
    if view not in SWEEP_VIEWS:
        raise ValueError(f"view must be one of {SWEEP_VIEWS} (got {view!r})")
    fig = go.Figure()
    if df is None or len(df) == 0:
        fig.add_annotation(text="no sweep results yet", showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper")
        fig.update_layout(xaxis_title="sparsity (fraction of weights removed)", yaxis_title="perplexity")
        return _finished(fig)
    fallback = None
    if view == "delta":
        if not (df["method"] == DENSE).any():
            fallback = "no dense row to compare with"
        elif not {"nll", "nll_se"} <= set(df.columns):
            fallback = "no nll columns"
    if fallback:
        view = "absolute"
    dense = df[df["method"] == DENSE]
    rest = df[df["method"] != DENSE]
    rest = rest.assign(method=series(rest))  # a gated method at each tau is a line of its own
    deltas = sweep_deltas(df).set_index("label") if view == "delta" else None
    methods = list(dict.fromkeys(rest["method"]))
    patterns = list(dict.fromkeys(rest["pattern"]))
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
            labels = [v if isinstance(v, str) and v else name for v in part.get("label", [None] * len(part))]
            common = dict(
                x=part["sparsity"].to_numpy(float) + offset,
                mode="lines+markers" if len(part) > 1 else "markers",
                name=name,
                legendgroup=method,
                line=dict(color=PALETTE[i % len(PALETTE)], dash=dashes[j % len(dashes)]),
                marker=dict(symbol=symbols[j % len(symbols)], size=8 if len(part) > 1 else 10),
                text=labels,
            )
            fig.add_trace(_sweep_trace(part, common, deltas, has_se))
    xs = rest["sparsity"].to_numpy(float) if not rest.empty else np.array([0.0])
    x_range = [max(float(xs.min()) - 0.08, 0.0), min(float(xs.max()) + 0.08, 1.0)]
    xaxis = dict(
        title="sparsity (fraction of weights removed)", tickformat=".0%", tickvals=sorted(set(np.round(xs, 4))), range=x_range
    )
    if view == "delta":
        _delta_layout(fig, dense, deltas, xaxis, x_range)
    else:
        _absolute_layout(fig, df, dense, has_se, xaxis, x_range, fallback)
    fig.update_layout(
        legend=dict(title="method (pattern)"), template="plotly_white", hovermode="closest", margin=dict(t=50, b=60)
    )
    return _finished(fig)


# --- picking tau (sap_core.tau) -------------------------------------------------------------------


def tau_variance_figure(
    calibration: tuple[np.ndarray, np.ndarray], tau: float, trajectory: tuple[np.ndarray, np.ndarray] | None = None
) -> go.Figure:
    """ECDF of the sink-score variance ``v_j`` of the sink positions of the calibration windows and, when
    given, of the current generation's trajectory, with a vertical line at ``tau``: the gate down-weights the
    sink positions to the right of it (every sink at tau = 0; never a non-sink). Each is a ``(frequency,
    variance)`` pair of per-position arrays (the record's, :func:`sap_core.tau.trajectory_gate_inputs`); the
    sink positions and the share gated are :func:`sap_core.sinks.sink_variance` and
    :func:`sap_core.sinks.gated_share`."""
    fig = go.Figure()
    for name, pair, color in (
        ("calibration windows (what the pruner gates)", calibration, "#1f77b4"),
        ("current generation", trajectory, "#d62728"),
    ):
        if pair is None:
            continue
        v = np.sort(sinks.sink_variance(*pair))
        if v.size == 0:
            continue
        gated = sinks.gated_share(*pair, tau)
        fig.add_trace(
            go.Scatter(
                x=v,
                y=np.arange(1, v.size + 1) / v.size,
                mode="lines",
                line=dict(color=color, shape="hv"),
                name=f"{name}: {v.size} sink positions, {gated:.0%} gated",
                hovertemplate="v_j ≤ %{x:.4f}: %{y:.0%} of sink positions<extra></extra>",
            )
        )
    fig.add_vline(x=tau, line=dict(color="black", dash="dash"), annotation_text=f"tau = {tau:g}", annotation_position="top right")
    if not fig.data:
        fig.add_annotation(text="no sink positions", showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper")
    fig.update_xaxes(rangemode="tozero")
    fig.update_layout(
        title="Sink-score variance v_j over the noised timesteps",
        xaxis_title="variance v_j of the sink score s_t(j)",
        yaxis_title="share of sink positions with v_j ≤ x",
        yaxis=dict(range=[0, 1.02], tickformat=".0%"),
        legend=dict(orientation="h", y=-0.25),
        height=420,
        margin=dict(t=60, b=10),
    )
    return _finished(fig)


def tau_layer_figure(shares: pd.DataFrame, tau: float) -> go.Figure:
    """Per layer, the share of its sink occurrences, and of the mass they receive, that the gate
    down-weights at ``tau`` (:meth:`sap_core.pruning.record.SinkRecord.layer_shares`)."""
    layers = [f"layer {int(l)}" for l in shares["layer"]]
    fig = go.Figure(
        [
            go.Bar(
                x=layers,
                y=shares["occurrence_share"],
                name="sink occurrences",
                marker_color="#1f77b4",
                customdata=np.stack([shares["gated"], shares["occurrences"]], axis=1),
                hovertemplate="%{x}: %{y:.1%} (%{customdata[0]} of %{customdata[1]})<extra>occurrences</extra>",
            ),
            go.Bar(
                x=layers,
                y=shares["mass_share"],
                name="sink mass",
                marker_color="#ff7f0e",
                hovertemplate="%{x}: %{y:.1%}<extra>mass</extra>",
            ),
        ]
    )
    fig.update_layout(
        title=f"Share of each layer's sinks gated at tau = {tau:g}",
        barmode="group",
        yaxis=dict(title="share gated", range=[0, 1.05], tickformat=".0%"),
        xaxis_title="layer",
        legend=dict(orientation="h", y=-0.2),
        height=380,
        margin=dict(t=60, b=10),
    )
    return _finished(fig)


def tau_sweep_figure(table: pd.DataFrame, best: pd.DataFrame | None = None, bands: pd.DataFrame | None = None) -> go.Figure:
    """Perplexity against tau at one sparsity and pattern (:func:`sap_core.tau.tau_table`) on a numeric tau
    axis (the taus are ticks at their values, not evenly spaced categories): one line per gated method,
    error bars ±2 paired standard errors of the difference from its ungated twin, the official rule
    (``ppl · exp(±2 se_paired)``: a bar that does not reach the twin's line is a difference beyond the
    noise); the twin as a dotted horizontal line in the method's colour; ``wanda`` and ``noised_wanda``
    as horizontal dashed lines, each in a shaded band of ±2 paired SE (``bands``:
    :func:`sap_core.tau.reference_bands`; a point inside a band is within the noise of that reference),
    and a y range that holds every bar and band. A star marks a method's best tau (:func:`sap_core.tau.best_taus`) only
    when it beats the twin beyond the threshold (``beats_official``); the subtitle says when no tau does."""
    fig = go.Figure()
    gated = table[table["kind"] == "gated"]
    palette = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"]
    taus = sorted(set(gated["tau"].astype(float)))
    span = (taus[-1] - taus[0]) if len(taus) > 1 else max(taus[0] if taus else 0.0, 0.01)
    x0, x1 = (taus[0] - 0.04 * span, taus[-1] + 0.04 * span) if taus else (0.0, 1.0)
    notes = []
    for i, (method, part) in enumerate(gated.groupby("method", sort=True)):
        part = part.sort_values("tau")
        ppl, se = part["ppl"].to_numpy(float), np.nan_to_num(part["se_paired"].to_numpy(float))
        fig.add_trace(
            go.Scatter(
                x=part["tau"].to_numpy(float),
                y=ppl,
                mode="lines+markers",
                name=method,
                line=dict(color=palette[i % len(palette)]),
                error_y=dict(
                    type="data",
                    symmetric=False,
                    array=ppl * np.expm1(2 * se),
                    arrayminus=-ppl * np.expm1(-2 * se),
                    thickness=1.2,
                    width=5,
                ),
                customdata=np.stack([part["delta_nll"].to_numpy(float), part["se_paired"].to_numpy(float), part["z"]], axis=1),
                hovertemplate=f"{method}<br>tau %{{x:g}}<br>ppl %{{y:.2f}}<br>Δnll vs official: %{{customdata[0]:+.4f}} "
                f"± %{{customdata[1]:.4f}} (z = %{{customdata[2]:+.1f}})<extra></extra>",
            )
        )
        twin = None
        for _, r in table[(table["kind"] == "official") & (table["family"] == method)].iterrows():
            twin = r["method"]
            fig.add_trace(
                go.Scatter(
                    x=[x0, x1],
                    y=[r["ppl"], r["ppl"]],
                    mode="lines",
                    name=f"{r['method']} {r['ppl']:.2f} (official rule, no gate)",
                    line=dict(color=palette[i % len(palette)], dash="dot"),
                    hovertemplate=f"{r['method']} (official rule, no gate): ppl {r['ppl']:.2f}<extra></extra>",
                )
            )
        b = best[best["method"] == method].iloc[0] if best is not None and method in set(best["method"]) else None
        if b is not None and bool(b.get("beats_official", False)):
            text = f"best {method}: tau {b['tau']:g}, Δnll vs {b.get('official', 'official')} {b['delta_nll']:+.4f} ± {b['se_paired']:.4f}"
            fig.add_trace(
                go.Scatter(
                    x=[float(b["tau"])],
                    y=[b["ppl"]],
                    mode="markers",
                    name=text,
                    marker=dict(symbol="star", size=16, color=palette[i % len(palette)], line=dict(color="black", width=1)),
                    hoverinfo="name",
                )
            )
            notes.append(f"{method}: best tau {b['tau']:g}")
        elif twin is not None:
            notes.append(f"{method}: no tau beats {twin} beyond the noise")
    refs = table[table["kind"] == "reference"]
    band_of = {} if bands is None else {str(b["method"]): b for _, b in bands.iterrows()}
    for j, (_, r) in enumerate(refs.iterrows()):
        ink = ["black", "#7f7f7f"][j % 2]
        b = band_of.get(str(r["method"]))
        se = float(b["se_paired"]) if b is not None else math.nan
        said = f" ± {se:.4f} nats (paired SE vs {b['against']})" if math.isfinite(se) else ""
        if math.isfinite(se):
            lo, hi = r["ppl"] * math.exp(-2 * se), r["ppl"] * math.exp(2 * se)
            fig.add_trace(
                go.Scatter(
                    x=[x0, x1, x1, x0, x0],
                    y=[lo, lo, hi, hi, lo],
                    mode="lines",
                    fill="toself",
                    fillcolor=["rgba(0,0,0,0.10)", "rgba(127,127,127,0.14)"][j % 2],
                    line=dict(width=0),
                    name=f"{r['method']} ±2 paired SE",
                    hovertemplate=f"{r['method']} ±2 paired SE: ppl {lo:.2f} – {hi:.2f} (within the noise of {r['method']})"
                    "<extra></extra>",
                )
            )
        fig.add_trace(
            go.Scatter(
                x=[x0, x1],
                y=[r["ppl"], r["ppl"]],
                mode="lines",
                name=f"{r['method']} {r['ppl']:.2f}",
                line=dict(color=ink, dash="dash"),
                hovertemplate=f"{r['method']}: ppl {r['ppl']:.2f}{said}<extra></extra>",
            )
        )
    if not fig.data:
        fig.add_annotation(text="no tau sweep results yet", showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper")
    subtitle = "error bars: ±2 paired SE against the official rule (no gate)" + ("; " + "; ".join(notes) if notes else "")
    if band_of:
        subtitle += "; shaded: ±2 paired SE around each reference"
    ys = []  # every line, bar and band: a range that shows what is within the noise
    for t in fig.data:
        y = np.asarray(t.y, float)
        ys.append(y)
        if t.error_y is not None and t.error_y.array is not None:
            ys += [y + np.asarray(t.error_y.array, float), y - np.asarray(t.error_y.arrayminus, float)]
    ys = np.concatenate(ys) if ys else np.array([])
    ys = ys[np.isfinite(ys)]
    y_range = None
    if ys.size:
        pad = 0.08 * max(ys.max() - ys.min(), 1e-3 * abs(ys.max()))
        y_range = [ys.min() - pad, ys.max() + pad]
    fig.update_layout(
        title=dict(text="Perplexity against tau", subtitle=dict(text=subtitle)),
        xaxis=dict(
            title="tau (variance threshold; 0 = every sink down-weighted, no non-sink)",
            type="linear",
            range=[x0, x1],
            tickmode="array",
            tickvals=taus,
            ticktext=[f"{t:g}" for t in taus],
        ),
        yaxis=dict(title="perplexity (masked-diffusion bound)", range=y_range),
        legend=dict(orientation="h", y=-0.3),
        height=460,
        margin=dict(t=60, b=10),
    )
    return _finished(fig)


def sink_trajectory_pair(reports: dict, normalize: str = "raw") -> go.Figure:
    """Step × position sink trajectories of two models side by side (e.g. ``{"AR": r1, "DLM": r2}``),
    on the same axes and colour range: colour = the aggregate mass in the view ``normalize`` (the
    one whose argmax is the dominant position ``d_t``, traced in red). Positions a causal model has
    not fed yet are blank. The colour range runs from 0 to the 99th percentile of both panels, so
    one extreme cell does not wash out the rest."""
    labels = list(reports)
    views = [mass_view(r.mass, normalize, r.valid_length, r.causal, absent=np.nan) for r in reports.values()]
    finite = np.concatenate([v[np.isfinite(v)] for v in views])
    zmax = float(np.percentile(finite, 99)) if finite.size else 1.0
    length = max(r.length for r in reports.values())
    steps = max(r.n_steps for r in reports.values())
    title = VIEW_NOTES[normalize][0]
    fig = make_subplots(
        rows=1,
        cols=len(labels),
        shared_yaxes=True,
        horizontal_spacing=0.04,
        subplot_titles=[
            f"{label}: {r.n_steps} steps, {'causal' if r.causal else 'masked diffusion'}" for label, r in reports.items()
        ],
    )
    for i, (label, r) in enumerate(reports.items()):
        fig.add_trace(
            go.Heatmap(
                z=views[i],
                zmin=0,
                zmax=zmax,
                colorscale=MASS_SCALE,
                showscale=i == 0,
                colorbar=dict(title=dict(text=title, side="right"), len=0.9),
                hovertemplate=f"{label}<br>step %{{y}}, pos %{{x}}: %{{z:.3g}}<extra></extra>",
            ),
            row=1,
            col=i + 1,
        )
        fig.add_trace(
            go.Scatter(
                x=r.dominant,
                y=np.arange(r.n_steps),
                mode="lines+markers",
                name="dominant sink d_t",
                showlegend=i == 0,
                legendgroup="dominant",
                line=dict(color="red", width=1.5),
                marker=dict(size=4),
            ),
            row=1,
            col=i + 1,
        )
        fig.update_xaxes(title_text="key position", range=[-0.5, length - 0.5], row=1, col=i + 1)
    fig.update_yaxes(title_text="step", range=[steps - 0.5, -0.5], row=1, col=1)
    fig.update_layout(
        title=f"Sink trajectories, same axes and colour range · {title}",
        height=460,
        margin=dict(l=60, r=10, t=70, b=40),
        legend=dict(orientation="h", y=-0.15),
        plot_bgcolor="white",
    )
    return _finished(fig)


def sinkstats_figure(summary: pd.DataFrame, labels: Sequence[str]) -> go.Figure:
    """Across-prompt statistics per layer with ±1 standard-error bars: one panel per statistic, one
    series per model (``labels`` = (DLM, AR), drawn AR first in the AR and DLM colours), from :meth:`sap_core.sinkstats.SinkStats.summary`. Layer "all"
    is the aggregate over the selected layers (the Sink stability page's figures)."""
    stats = list(STATISTICS)
    fig = make_subplots(
        rows=2, cols=2, subplot_titles=[STATISTICS[s] for s in stats], vertical_spacing=0.2, horizontal_spacing=0.08
    )
    layers = sorted(summary["layer"].unique(), key=lambda x: (x != -1, x))
    names = ["all" if l == -1 else str(l) for l in layers]
    n = int(summary["n"].max()) if len(summary) else 0
    for k, stat in enumerate(stats):
        row, col = k // 2 + 1, k % 2 + 1
        for label, color in ((labels[1], PAIR_COLORS[0]), (labels[0], PAIR_COLORS[1])):  # AR first, as everywhere
            part = summary[(summary["statistic"] == stat) & (summary["group"] == label)].set_index("layer").reindex(layers)
            fig.add_trace(
                go.Bar(
                    x=names,
                    y=part["mean"],
                    name=label,
                    marker_color=color,
                    showlegend=k == 0,
                    legendgroup=label,
                    error_y=dict(type="data", array=part["se"].fillna(0), thickness=1.2, width=3, color="#333333"),
                    hovertemplate=f"{label}, layer %{{x}}: %{{y:.3g}} ± %{{error_y.array:.2g}}<extra></extra>",
                ),
                row=row,
                col=col,
            )
        fig.update_xaxes(title_text="layer", type="category", row=row, col=col)
    fig.update_layout(
        title=f"Across {n} prompts: mean ± 1 standard error",
        barmode="group",
        height=640,
        margin=dict(l=60, r=10, t=100, b=40),
        template="plotly_white",
        legend=dict(orientation="h", x=0.5, xanchor="center", y=1.1, yanchor="bottom"),
    )
    return _finished(fig)
