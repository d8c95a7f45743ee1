"""Structured pruning: whole MLP channels and attention heads cut out of every block, so the model gets
smaller and faster (the ``structure="channels"`` rows of :data:`~sap_core.pruning.spec.METHOD_TABLE`).

A block's MLP is ``out(act(gate(h)) ⊙ up(h))``; MLP channel ``j`` is row ``j`` of ``gate`` and ``up`` and
column ``j`` of ``out`` (LLaDA: ``ff_proj``, ``up_proj``, ``ff_out``; Dream: ``mlp.gate_proj``, ``mlp.up_proj``,
``mlp.down_proj``). Attention head ``h`` is rows ``h·d_h … (h+1)·d_h`` of ``q_proj``, ``k_proj``, ``v_proj`` and
the same columns of ``attn_out`` (LLaDA with ``n_kv_heads == n_heads`` only). Scores, from the dense model's
inputs on the calibration windows (``X``: a linear's inputs, one row per token, each token ``t`` weighted by
``w_t``: 1 on clean windows, ``1 − s_t(j)`` / ``1 − g_j·s_t(j)`` on noised ones, the factors of sink_wanda):

* ``wanda`` (Wanda-sp): ``Σ |W|·‖w⊙X_c‖₂`` summed over every weight of the structure (gate and up rows
  with the MLP input's column norms, the out column with the channel's own input norm);
* ``fluctuation`` (FLAP): ``Var_w(a_j) · ‖W_out[:, j]‖²``, ``Var_w`` the ``w``-weighted variance over the
  calibration tokens of the channel's input ``a_j`` (summed over a head's columns for a head).

Each is its statistic's :meth:`~sap_core.pruning.statistics.Statistic.structure_scores`
(:mod:`sap_core.pruning.statistics`); this module takes the moments they read and cuts the model.

Each block keeps its ``round((1 − ratio)·n)`` best channels (and heads), so the saved config stays a standard
one with a smaller ``mlp_hidden_size`` / ``intermediate_size``. FLAP's bias compensation adds the removed
channels' mean contribution ``W_out[:, removed] · E_w[a_removed]`` to the output projection's bias; it is
refused for models whose output projection has no bias (LLaDA's default ``include_bias: false``): a bias
there would need a config the official class cannot express without biases everywhere.
"""

from __future__ import annotations

import copy
import dataclasses
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from torch import nn

from sap_core.errors import PruneSpecError
from sap_core.models import placement
from sap_core.progress import Progress, report
from sap_core.pruning.calibration import calibration_ids
from sap_core.pruning.record import CalibrationRecord, TokenFactors, record_calibration, weighting
from sap_core.pruning.spec import PruneSpec
from sap_core.pruning.taps import chunks, embed, make_taps
from sap_core.pruning.variant import PrunedVariant, fingerprint, same_weights


@dataclass(frozen=True)
class Layout:
    """Where a family's structures sit inside a block (dotted names) and the config field of the MLP width;
    ``attn`` (q, k, v, out) is None where heads cannot be dropped."""

    gate: str
    up: str
    out: str
    hidden_key: str
    attn: tuple[str, str, str, str] | None


LAYOUTS = {
    "llada": Layout("ff_proj", "up_proj", "ff_out", "mlp_hidden_size", ("q_proj", "k_proj", "v_proj", "attn_out")),
    "Dream": Layout("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "intermediate_size", None),
}
LAYOUTS["mmada"] = LAYOUTS["llada"]  # MMaDA's blocks are LLaDA's


@dataclass(frozen=True)
class Plan:
    """What a run removes per block: ``channels`` of ``hidden``, ``heads`` of ``n_heads`` (width ``head_dim``)."""

    layout: Layout
    hidden: int
    channels: int
    n_heads: int
    heads: int
    head_dim: int


def _count(ratio: float, n: int) -> int:
    return int(round(float(ratio) * n))


def check(handle, spec: PruneSpec) -> Plan:
    """Every model-dependent refusal of a structured run, before any work."""
    layout = LAYOUTS.get(handle.family)
    if layout is None:
        raise PruneSpecError(
            f"{spec.method} removes MLP channels of LLaDA or Dream blocks; this is a '{handle.family}' model. Use a masking method."
        )
    block = handle.module.blocks[0]
    hidden = block.get_submodule(layout.gate).out_features
    if any(b.get_submodule(layout.gate).out_features != hidden for b in handle.module.blocks):
        raise PruneSpecError("The blocks' MLP widths differ; a uniform structured ratio needs equal widths.")
    channels = _count(spec.sparsity, hidden)
    if channels >= hidden:
        raise PruneSpecError(
            f"sparsity {spec.sparsity} would remove all {hidden} MLP channels of every block; choose a ratio below {1 - 0.5 / hidden:.4f}."
        )
    n_heads, head_dim = handle.n_heads, handle.d_model // handle.n_heads
    heads = _count(spec.heads, n_heads)
    if spec.heads:
        _check_heads(handle, spec, layout, block, n_heads, heads)
        head_dim = block.head_dim
    if spec.bias_compensation:
        outs = [layout.out] + ([layout.attn[3]] if heads else [])
        for name in outs:
            if block.get_submodule(name).bias is None:
                raise PruneSpecError(
                    f"bias_compensation adds to the bias of '{name}', but this model has none there (LLaDA: include_bias "
                    "false); the saved config could not declare it. Run without bias_compensation."
                )
    return Plan(layout, hidden, channels, n_heads, heads, head_dim)


def _check_heads(handle, spec: PruneSpec, layout: Layout, block, n_heads: int, heads: int) -> None:
    if layout.attn is None:
        raise PruneSpecError(
            f"Attention heads cannot be dropped from a '{handle.family}' model: its class derives the head size from "
            "hidden_size // num_attention_heads. Use heads=0 (MLP channels only)."
        )
    if block.n_kv_heads != n_heads:
        raise PruneSpecError(
            f"This model shares {block.n_kv_heads} key/value heads among {n_heads} query heads (GQA); dropping single "
            "heads would break the sharing. Use heads=0 (MLP channels only)."
        )
    if heads >= n_heads:
        raise PruneSpecError(f"heads {spec.heads} would remove all {n_heads} attention heads of every block; choose less.")


# --- statistics ---------------------------------------------------------------------------------


class Moments:
    """Per input column, with token weights ``w``: ``Σw``, ``Σw·x``, ``Σw·x²`` and ``Σ(w·x)²`` (float64)."""

    def __init__(self, columns: int, device: torch.device):
        self.weight = torch.zeros((), dtype=torch.float64, device=device)
        self.sum, self.squares, self.scaled = (torch.zeros(columns, dtype=torch.float64, device=device) for _ in range(3))

    def add(self, x: torch.Tensor, w: torch.Tensor | None = None) -> None:
        xf = x.double().reshape(-1, x.shape[-1])
        wf = torch.ones(xf.shape[0], dtype=torch.float64, device=xf.device) if w is None else w.reshape(-1).double().to(xf.device)
        x2 = xf * xf
        self.weight += wf.sum()
        self.sum += wf @ xf
        self.squares += wf @ x2
        self.scaled += (wf * wf) @ x2

    def norm(self) -> torch.Tensor:
        """``‖w⊙X_c‖₂``: the Wanda norm of the scaled inputs."""
        return self.scaled.sqrt()

    def mean(self) -> torch.Tensor:
        return self.sum / self.weight.clamp_min(1e-12)

    def variance(self) -> torch.Tensor:
        """The ``w``-weighted variance over the tokens."""
        return (self.squares / self.weight.clamp_min(1e-12) - self.mean() ** 2).clamp_min(0.0)


class StructStats(TokenFactors):
    """Moments of every block's input groups; as an ``on_pass`` callback of
    :func:`~sap_core.pruning.record.record_calibration` it weights each step's tokens by the row's sink factors
    (:class:`~sap_core.pruning.record.TokenFactors`, as the noised Wanda family does)."""

    def __init__(self, n_blocks: int, factors: str = "none", tau: float = 0.0):
        super().__init__([weighting(factors, tau)])
        self.moments: list[dict[tuple[str, ...], Moments]] = [{} for _ in range(n_blocks)]

    def add(self, inputs: list, w: np.ndarray | None) -> None:
        for acc, groups in zip(self.moments, inputs):
            for names, x in groups:
                if names not in acc:
                    acc[names] = Moments(x.shape[-1], x.device)
                acc[names].add(x, None if w is None else torch.from_numpy(np.ascontiguousarray(w)))

    def consume(self, k: int, inputs: list, w: np.ndarray) -> None:
        self.add(inputs, w)

    def of(self, block: int, name: str) -> Moments:
        """The moments of the input ``name`` (a linear inside the block) reads."""
        return next(m for names, m in self.moments[block].items() if name in names)


def clean_stats(handle, taps, clean: torch.Tensor, batch_size: int, tick) -> StructStats:
    """Moments of the dense model's block inputs on the clean windows ``clean`` ``int64 [N, L]`` (weights 1)."""
    stats = StructStats(len(taps))
    for a, b in chunks(clean.shape[0], batch_size):
        h, inputs = embed(handle, clean[a:b]), []
        for tap in taps:
            h = tap(h)
            inputs.append(tap.take_inputs())
        stats.add(inputs, None)
        del inputs, h
        tick(b - a, f"windows {a + 1}–{b} of {clean.shape[0]}")
    return stats


def keep_best(scores: torch.Tensor, remove: int) -> torch.Tensor:
    """Indices of the ``len(scores) − remove`` highest scores, in ascending index order."""
    order = torch.argsort(scores, descending=True, stable=True)
    return order[: len(scores) - remove].sort().values


# --- the run ------------------------------------------------------------------------------------


def prune_structured(handle, spec: PruneSpec, token_ids: list[int], progress: Progress | None = None) -> StructuredVariant:
    """The structured run of ``spec`` (already validated and checked by :func:`sap_core.pruning.prune`)."""
    plan = check(handle, spec)
    t_start = time.perf_counter()
    row, cal = spec.row, spec.calibration
    n_blocks = len(handle.module.blocks)
    total = (cal.nsamples * len(cal.timesteps) if row.needs_noise else cal.nsamples) + n_blocks
    state = {"done": 0}

    def tick(units: int, message: str) -> None:
        state["done"] += units
        report(progress, state["done"], total, message)

    report(progress, 0, total, f"{spec.label}: starting")
    with handle.lock:
        taps = make_taps(handle)
        dense = fingerprint(handle.module)
        module_names = {id(m): n for n, m in handle.module.named_modules()}
        prefixes = [module_names[id(b)] + "." for b in handle.module.blocks]
    record = None
    with torch.no_grad():
        if row.needs_noise:
            stats = StructStats(n_blocks, row.factors, spec.sink.tau)
            record = record_calibration(handle, cal, spec.sink, token_ids, tick, taps, on_pass=stats)
            clean = record.ids
        else:
            clean = calibration_ids(token_ids, cal)[0]
            stats = clean_stats(handle, taps, clean, cal.batch_size, tick)
        t_cal = time.perf_counter() - t_start
        weights, kept = {}, []
        for i, tap in enumerate(taps):
            kept.append(_prune_block(tap, stats, i, plan, spec, prefixes[i], weights))
            tick(1, f"block {i + 1}/{n_blocks} pruned")
    token_weights = None if record is None else stats.token_weights[0]
    seconds = time.perf_counter() - t_start
    return StructuredVariant(
        spec,
        weights,
        [(i, name, f"{prefixes[i]}{name}.weight") for i in range(n_blocks) for name in _linears(plan)],
        seconds,
        {"calibration": t_cal, "pruning": seconds - t_cal},
        0 if record is None else record.passes,
        CalibrationRecord.of(spec, clean, record, token_weights),
        handle.source,
        layer_sparsity=_removed_frame(taps, plan),
        dense_fingerprint=dense,
        plan=plan,
        kept=kept,
    )


def _linears(plan: Plan) -> list[str]:
    names = [plan.layout.gate, plan.layout.up, plan.layout.out]
    return (list(plan.layout.attn) if plan.heads else []) + names


def _prune_block(tap, stats: StructStats, i: int, plan: Plan, spec: PruneSpec, prefix: str, out: dict) -> dict:
    lay, stat = plan.layout, spec.row.statistic
    lin = tap.linears
    x_in, x_a = stats.of(i, lay.gate), stats.of(i, lay.out)
    scores = stat.structure_scores([lin[lay.gate].weight, lin[lay.up].weight], lin[lay.out].weight, x_in, x_a)
    keep = keep_best(scores, plan.channels)
    _cut(out, prefix, lin[lay.gate], lay.gate, rows=keep)
    _cut(out, prefix, lin[lay.up], lay.up, rows=keep)
    _cut(out, prefix, lin[lay.out], lay.out, cols=keep, mean=x_a.mean() if spec.bias_compensation else None)
    kept = {"channels": keep.tolist()}
    if plan.heads:
        q, k, v, o = lay.attn
        x_q, x_o = stats.of(i, q), stats.of(i, o)
        cols = stat.structure_scores([lin[n].weight for n in (q, k, v)], lin[o].weight, x_q, x_o)
        head_keep = keep_best(cols.reshape(plan.n_heads, plan.head_dim).sum(1), plan.heads)
        idx = (head_keep[:, None] * plan.head_dim + torch.arange(plan.head_dim, device=head_keep.device)).reshape(-1)
        for n in (q, k, v):
            _cut(out, prefix, lin[n], n, rows=idx)
        _cut(out, prefix, lin[o], o, cols=idx, mean=x_o.mean() if spec.bias_compensation else None)
        kept["heads"] = head_keep.tolist()
    return kept


def _cut(out: dict, prefix: str, lin: nn.Linear, name: str, rows=None, cols=None, mean=None) -> None:
    """New weight (and bias) of ``lin`` with only ``rows`` / ``cols`` kept; ``mean`` (of the inputs) adds the
    removed columns' mean contribution to the bias (FLAP's compensation)."""
    W = lin.weight.detach()
    new = W[rows] if rows is not None else W[:, cols]
    out[f"{prefix}{name}.weight"] = new.clone()
    if lin.bias is not None:
        b = lin.bias.detach()
        if rows is not None:
            b = b[rows]
        elif mean is not None:
            removed = torch.ones(W.shape[1], dtype=torch.bool, device=W.device)
            removed[cols] = False
            b = (b.double() + W[:, removed].double() @ mean.to(W.device)[removed]).to(b.dtype)
        out[f"{prefix}{name}.bias"] = b.clone()


def _removed_frame(taps, plan: Plan) -> pd.DataFrame:
    """Per (block, module): the dense shape, its parameters, the removed ones ("zeros") and their share."""
    rows = []
    keep_c, keep_h = plan.hidden - plan.channels, plan.n_heads - plan.heads
    for i, tap in enumerate(taps):
        for name, lin in tap.linears.items():
            out_f, in_f = lin.weight.shape
            if name in (plan.layout.gate, plan.layout.up):
                kept = keep_c * in_f
            elif name == plan.layout.out:
                kept = out_f * keep_c
            elif plan.heads and name in plan.layout.attn[:3]:
                kept = keep_h * plan.head_dim * in_f
            elif plan.heads and name == plan.layout.attn[3]:
                kept = out_f * keep_h * plan.head_dim
            else:
                kept = out_f * in_f
            params = out_f * in_f
            rows.append(dict(block=i, module=name, rows=out_f, cols=in_f, params=params, zeros=params - kept))
    df = pd.DataFrame(rows, columns=["block", "module", "rows", "cols", "params", "zeros"])
    df["sparsity"] = df["zeros"] / df["params"]
    df.attrs["overall"] = float(df["zeros"].sum() / df["params"].sum())
    return df


# --- the variant --------------------------------------------------------------------------------


@dataclass
class StructuredVariant(PrunedVariant):
    """A :class:`~sap_core.pruning.variant.PrunedVariant` whose pruned linears are smaller: ``weights`` holds
    their new weights and biases. :meth:`applied` swaps smaller ``nn.Linear`` modules (and a config with
    the smaller widths) into the dense model under ``handle.lock`` and puts the dense modules back on exit,
    so the dense weights come back bit for bit (they are never written to); :meth:`save` (inherited) thus
    writes a smaller checkpoint with a standard config. ``layer_sparsity``'s ``zeros`` are the removed
    parameters. ``kept``: per block the kept channel (and head) indices."""

    plan: Plan = field(default=None, repr=False)
    kept: list[dict] = field(default_factory=list, repr=False)

    @property
    def config_changes(self) -> dict:
        """The config fields a saved model of this variant changes."""
        plan = self.plan
        changes = {plan.layout.hidden_key: plan.hidden - plan.channels}
        if plan.heads:
            kept = plan.n_heads - plan.heads
            changes.update(n_heads=kept, n_kv_heads=kept, head_dim=plan.head_dim)
        return changes

    def removed_summary(self, handle) -> str:
        plan = self.plan
        dense = sum(p.numel() for p in handle.module.parameters())
        removed = int(self.layer_sparsity["zeros"].sum())
        heads = f" and {plan.heads} of {plan.n_heads} heads" if plan.heads else ""
        return (
            f"removed {plan.channels} of {plan.hidden} MLP channels{heads} per block · "
            f"{dense - removed:,} parameters (dense {dense:,}, {removed / dense:.1%} fewer)"
        )

    def summary(self) -> dict:
        out = super().summary()
        out.update(
            structure="channels",
            heads=self.spec.heads,
            bias_compensation=self.spec.bias_compensation,
            removed={"mlp_channels_per_block": self.plan.channels, "heads_per_block": self.plan.heads},
            config_changes=self.config_changes,
            kept=self.kept,
        )
        return out

    def _params(self, module: nn.Module) -> dict:
        placement.require_resident(module, "put a structured variant into this model")
        if self.dense_fingerprint is not None and not same_weights(self.dense_fingerprint, fingerprint(module)):
            raise PruneSpecError(
                f"This variant was pruned from another model ({self.source}), or another variant is applied; "
                "its weights differ from this model's. Prune this model instead."
            )
        return {}

    def _modules(self, module: nn.Module) -> list[tuple[nn.Module, str, nn.Linear]]:
        """``(parent, attribute, new smaller linear)`` for every pruned linear, on the dense one's device and dtype."""
        out = []
        for i, name, pname in self.modules:
            block = module.blocks[i]
            parent_name, _, attr = name.rpartition(".")
            parent = block.get_submodule(parent_name) if parent_name else block
            old = getattr(parent, attr)
            W = self.weights[pname].to(old.weight.device, old.weight.dtype)
            new = nn.Linear(W.shape[1], W.shape[0], bias=old.bias is not None, device="meta")
            new.weight = nn.Parameter(W, requires_grad=False)
            if old.bias is not None:
                new.bias = nn.Parameter(self.weights[pname[: -len("weight")] + "bias"].to(W.device, W.dtype), requires_grad=False)
            out.append((parent, attr, new.eval()))
        return out

    @contextmanager
    def applied(self, handle) -> Iterator:
        """``with variant.applied(handle): ...`` runs ``handle`` as the smaller model (see the class)."""
        with handle.lock:
            module = handle.module
            self._params(module)
            swaps = [(parent, attr, getattr(parent, attr), new) for parent, attr, new in self._modules(module)]
            heads = []
            if self.plan.heads:
                kept = self.plan.n_heads - self.plan.heads
                heads = [(b, b.n_heads, b.n_kv_heads) for b in module.blocks]
            config = module.config
            try:
                for parent, attr, _, new in swaps:
                    setattr(parent, attr, new)
                for b, _, _ in heads:
                    b.n_heads = b.n_kv_heads = kept
                new_config = copy.deepcopy(config)
                for key, value in self.config_changes.items():
                    setattr(new_config, key, value)
                module.config = new_config
                yield handle
            finally:
                module.config = config
                for b, n, nkv in heads:
                    b.n_heads, b.n_kv_heads = n, nkv
                for parent, attr, old, _ in reversed(swaps):
                    setattr(parent, attr, old)

    def apply_to_copy(self, handle):
        """A new :class:`~sap_core.models.ModelHandle` holding a smaller copy of the model (own lock)."""
        with self.applied(handle):
            module = copy.deepcopy(handle.module)
        module.eval()
        return dataclasses.replace(handle, module=module, lock=threading.RLock(), source=f"{handle.name} [{self.spec.label}]")
