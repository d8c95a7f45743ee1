"""Pruning runs: :func:`prune` -> :class:`PrunedVariant`, and :func:`check_sparsity`.

The dense model is never written to. Pruning reads the shared weights under ``handle.lock`` (so no
variant is swapped in while they are read) and computes new weight tensors; a
:class:`PrunedVariant` holds them and can be swapped in and out (:meth:`PrunedVariant.applied`),
applied to a copy (:meth:`PrunedVariant.apply_to_copy`) or saved as a model directory
(:meth:`PrunedVariant.save`). Every linear layer inside the transformer blocks is pruned; the
embedding, norms and LM head are not.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Union

import numpy as np
import pandas as pd
import torch
from torch import nn

from sap_core.errors import OutputPathError, PruneSpecError, SapError
from sap_core.files import atomic_directory, check_output_dir
from sap_core.progress import Progress, report
from sap_core.pruning import scores as sc
from sap_core.pruning.calibration import CalibrationRecord, calibration_ids, noised_ids, tokenize
from sap_core.pruning.masks import select_mask
from sap_core.pruning.sparsegpt import Hessian, sparsegpt_prune
from sap_core.pruning.spec import (
    GATED, NEEDS_NOISE, NOISED_WANDA_FAMILY, SINK_SPARSEGPT_FAMILY, CalibrationSpec, PruneSpec,
)


# --- which weights ------------------------------------------------------------------------------

def target_linears(module: nn.Module) -> list[tuple[int, str, nn.Linear]]:
    """``(block index, name inside the block, linear)`` for every linear in every block."""
    return [(i, name, m) for i, block in enumerate(module.blocks) for name, m in block.named_modules()
            if isinstance(m, nn.Linear)]


def _param_names(module: nn.Module) -> dict[int, str]:
    return {id(p): n for n, p in module.named_parameters()}


def _frame(rows: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=["block", "module", "rows", "cols", "params", "zeros", "sparsity"])
    total = int(df["params"].sum()) if len(df) else 0
    df.attrs["overall"] = float(df["zeros"].sum() / total) if total else 0.0
    return df


def _by_layer(df: pd.DataFrame) -> pd.DataFrame:
    g = df.groupby("block", sort=True)[["params", "zeros"]].sum().reset_index()
    g["sparsity"] = g["zeros"] / g["params"]
    g.attrs["overall"] = df.attrs.get("overall", 0.0)
    return g


def check_sparsity(obj, by: str = "module") -> pd.DataFrame:
    """Zeros in the block linears of a :class:`~sap_core.models.ModelHandle`, a model module (with
    ``.blocks``) or a :class:`PrunedVariant`.

    ``by="module"``: one row per (block, module) with ``rows, cols, params, zeros, sparsity``;
    ``by="layer"``: one row per block. ``df.attrs["overall"]`` is the sparsity over all of them.
    """
    if by not in ("module", "layer"):
        raise PruneSpecError(f"by must be 'module' or 'layer' (got '{by}').")
    if isinstance(obj, PrunedVariant):
        return obj.layer_sparsity if by == "module" else _by_layer(obj.layer_sparsity)
    module = getattr(obj, "module", obj)
    if not hasattr(module, "blocks"):
        raise PruneSpecError("check_sparsity needs a ModelHandle, a model with .blocks, or a PrunedVariant.")
    rows = []
    with torch.no_grad():
        for i, name, lin in target_linears(module):
            W = lin.weight
            zeros = int((W == 0).sum())
            rows.append(dict(block=i, module=name, rows=W.shape[0], cols=W.shape[1], params=W.numel(),
                             zeros=zeros, sparsity=zeros / W.numel()))
    df = _frame(rows)
    return df if by == "module" else _by_layer(df)


# --- the variant --------------------------------------------------------------------------------

VARIANT_FORMAT = "sinkscope.pruned_variant/1"
FINGERPRINT_SAMPLES = 4096  # values sampled per parameter
FINGERPRINT_RTOL = 1e-2


def fingerprint(module: nn.Module) -> dict:
    """A fingerprint of a model's weights: the sha256 of its parameter names and shapes, and per
    parameter the sum and absolute sum (float64) of up to 4096 evenly strided values. It tells two models
    of the same architecture apart (different weights) while tolerating a change of dtype (the sums are
    compared with a 1 % relative tolerance by :func:`same_weights`). Cheap: a few thousand values per parameter."""
    names = hashlib.sha256()
    stats = []
    with torch.no_grad():
        for name, p in module.named_parameters():
            names.update(f"{name}:{tuple(p.shape)};".encode())
            if p.device.type == "meta":
                stats.append([0.0, 0.0])
                continue
            flat = p.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // FINGERPRINT_SAMPLES)][:FINGERPRINT_SAMPLES].double()
            stats.append([float(sample.sum()), float(sample.abs().sum())])
    return {"names": names.hexdigest(), "stats": stats}


def same_weights(a: dict, b: dict) -> bool:
    """Whether two :func:`fingerprint` s come from the same weights (up to dtype rounding)."""
    if a.get("names") != b.get("names") or len(a.get("stats", ())) != len(b.get("stats", ())):
        return False
    for (sa, aa), (sb, ab) in zip(a["stats"], b["stats"]):
        scale = max(aa, ab, 1e-12)
        if abs(sa - sb) > FINGERPRINT_RTOL * scale or abs(aa - ab) > FINGERPRINT_RTOL * scale:
            return False
    return True


def is_variant_dir(path: Path) -> bool:
    """Whether ``path`` is a directory written by :meth:`PrunedVariant.save` (its ``pruning.json`` says so)."""
    record = Path(path) / "pruning.json"
    try:
        return record.is_file() and json.loads(record.read_text(encoding="utf-8")).get("format") == VARIANT_FORMAT
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return False


def _model_dir(handle) -> Optional[Path]:
    from sap_core.models import BUILTIN_MODELS

    source = BUILTIN_MODELS.get(str(handle.source), Path(str(handle.source)).expanduser())
    return source.resolve() if source.is_dir() else None


def check_save_target(directory: Union[str, Path], handle, overwrite: bool = False) -> Path:
    """Refuse, before any work, a directory a variant may not be saved to: the loaded model's own
    directory (or one inside it or above it), a file, an unwritable place, a non-empty directory that is
    not a SinkScope variant, and an existing variant unless ``overwrite``. Returns the resolved path."""
    target = check_output_dir(directory, "Save directory").resolve()
    model_dir = _model_dir(handle)
    if model_dir is not None and (target == model_dir or model_dir in target.parents or target in model_dir.parents):
        raise OutputPathError(f"Save directory '{target}' is the loaded model's directory '{model_dir}' (or holds it, "
                              "or sits inside it); saving there would overwrite the dense checkpoint. Choose another directory.")
    if target.is_dir() and any(target.iterdir()):
        if not is_variant_dir(target):
            raise OutputPathError(f"Save directory '{target}' is not empty and is not a SinkScope variant; saving would "
                                  "replace its files. Choose a new or empty directory.")
        if not overwrite:
            raise OutputPathError(f"Save directory '{target}' holds a pruned variant already; pass overwrite=True "
                                  "(--overwrite on the command line, the confirmation box in the app) to replace it.")
    return target

@dataclass
class PrunedVariant:
    """The result of :func:`prune`.

    * ``spec``: the :class:`PruneSpec` that made it. ``seconds``: wall time of the run;
      ``timings``: its parts (``calibration``: statistics from the model, ``pruning``: masks and
      reconstruction). ``passes``: model forward passes over calibration batches.
    * ``weights``: ``{parameter name: new weight}`` for every pruned linear, on the dense weight's
      device and dtype. ``modules``: ``[(block, module, parameter name)]`` in model order.
    * ``layer_sparsity``: per (block, module) DataFrame as :func:`check_sparsity`.
    * ``calibration``: a :class:`CalibrationRecord` (ids, noised inputs, sink scores, variance,
      labels, and ``token_weights``: the per-token down-weighting factors), None for magnitude.
    """

    spec: PruneSpec
    weights: dict[str, torch.Tensor]
    modules: list[tuple[int, str, str]]
    seconds: float
    timings: dict[str, float]
    passes: int
    calibration: Optional[CalibrationRecord]
    source: str
    layer_sparsity: pd.DataFrame = field(repr=False, default=None)
    dense_fingerprint: Optional[dict] = field(repr=False, default=None)

    def __post_init__(self) -> None:
        if self.layer_sparsity is None:
            rows = []
            for block, name, pname in self.modules:
                W = self.weights[pname]
                zeros = int((W == 0).sum())
                rows.append(dict(block=block, module=name, rows=W.shape[0], cols=W.shape[1], params=W.numel(),
                                 zeros=zeros, sparsity=zeros / W.numel()))
            self.layer_sparsity = _frame(rows)

    @property
    def sparsity(self) -> float:
        """Zeros over all pruned weights."""
        return float(self.layer_sparsity.attrs["overall"])

    @property
    def token_weights(self) -> Optional[np.ndarray]:
        """Per-token factors the run multiplied layer inputs by (see :class:`CalibrationRecord`)."""
        return None if self.calibration is None else self.calibration.token_weights

    def summary(self) -> dict:
        spec = self.spec
        cal = dataclasses.asdict(spec.calibration)
        text = cal.pop("text")
        cal["text"] = "default (assets/text/calibration.txt)" if text is None else f"user text, {len(text)} characters"
        return {
            "format": VARIANT_FORMAT,
            "source": self.source,
            "method": spec.method, "sparsity": spec.sparsity, "pattern": spec.pattern,
            "target_sparsity": spec.target_sparsity, "achieved_sparsity": self.sparsity,
            "sink": spec.sink.to_dict() if hasattr(spec.sink, "to_dict") else dataclasses.asdict(spec.sink),
            "calibration": cal if spec.needs_calibration else None,
            "blocksize": spec.blocksize, "percdamp": spec.percdamp, "sparsegpt_selection": spec.sparsegpt_selection,
            "seconds": self.seconds, "timings": self.timings, "passes": self.passes,
            "dense_fingerprint": self.dense_fingerprint,
        }

    def _params(self, module: nn.Module) -> dict[str, nn.Parameter]:
        if self.dense_fingerprint is not None and not same_weights(self.dense_fingerprint, fingerprint(module)):
            raise PruneSpecError(f"This variant was pruned from another model ({self.source}); its weights differ from "
                                 "this model's. Prune this model instead.")
        params = dict(module.named_parameters())
        out = {}
        for name, W in self.weights.items():
            p = params.get(name)
            if p is None or tuple(p.shape) != tuple(W.shape):
                raise PruneSpecError(f"This variant was pruned from another model ({self.source}): '{name}' "
                                     "is missing or has another shape here. Prune this model instead.")
            out[name] = p
        return out

    @contextmanager
    def applied(self, handle) -> Iterator:
        """``with variant.applied(handle): ...`` runs ``handle`` with the pruned weights.

        Holds ``handle.lock`` throughout; swaps the parameters' storage for the variant's tensors and
        puts the original tensors back on exit, exceptions included, so the dense weights come back
        bit for bit (they are never written to). Do not modify weights in place inside the block:
        that would write into the variant.
        """
        with handle.lock:  # the fingerprint is taken of the dense weights, never of another variant's
            params = self._params(handle.module)
            saved: list[tuple[nn.Parameter, torch.Tensor]] = []
            try:
                for name, p in params.items():
                    saved.append((p, p.data))
                    p.data = self.weights[name].to(p.device, p.dtype)
                yield handle
            finally:
                for p, data in reversed(saved):
                    p.data = data

    def apply_to_copy(self, handle):
        """A new :class:`~sap_core.models.ModelHandle` with a pruned copy of the model (own lock,
        same tokenizer). Costs one model's memory; the dense weights of pruned layers are not copied."""
        with handle.lock:
            params = self._params(handle.module)
        memo = {id(p): nn.Parameter(self.weights[name].to(p.device, p.dtype).clone(), requires_grad=False)
                for name, p in params.items()}
        with handle.lock:
            module = copy.deepcopy(handle.module, memo)
        module.eval()
        return dataclasses.replace(handle, module=module, lock=threading.RLock(),
                                   source=f"{handle.name} [{self.spec.label}]")

    def save(self, directory: Union[str, Path], handle, overwrite: bool = False) -> Path:
        """Write the pruned model as a model directory (``model.safetensors``, ``config.json``,
        tokenizer files, and ``pruning.json`` with the spec, figures and the dense model's fingerprint)
        that ``load_model`` loads. Returns the absolute path.

        Guarantees: the target is checked first (:func:`check_save_target`: never the loaded model's own
        directory, never a non-empty directory that is not a variant, an existing variant only with
        ``overwrite``); everything is written into a hidden sibling directory, flushed to disk and renamed
        into place, so a crash leaves the previous directory intact and ``pruning.json`` always
        describes the weights beside it."""
        target = check_save_target(directory, handle, overwrite)
        with atomic_directory(target) as tmp:
            with self.applied(handle):
                handle.module.save_pretrained(str(tmp))
            if handle.tokenizer is not None:
                handle.tokenizer.save_pretrained(str(tmp))
            (tmp / "pruning.json").write_text(json.dumps(self.summary(), indent=1), encoding="utf-8")
        return target


# --- the run ------------------------------------------------------------------------------------

def _check_against_model(handle, spec: PruneSpec) -> Optional[list[int]]:
    """Model-dependent checks; returns the calibration token ids when the method needs them."""
    module = handle.module
    if not hasattr(module, "blocks"):
        raise PruneSpecError(f"{type(module).__name__} exposes no transformer .blocks; SinkScope cannot prune it.")
    linears = target_linears(module)
    if not linears:
        raise PruneSpecError("The model has no linear layers inside its blocks to prune.")
    nm = spec.nm
    if nm is not None:
        bad = sorted({f"{name} (in_features {lin.in_features})" for _, name, lin in linears if lin.in_features % nm[1]})
        if bad:
            raise PruneSpecError(f"Pattern {spec.pattern} needs every input dimension divisible by {nm[1]}, but "
                                 f"{', '.join(bad)} is not. Choose an M that divides it, or unstructured.")
    if not spec.needs_calibration:
        return None
    cal = spec.calibration
    from sap_core.evaluate import check_length

    check_length(handle, cal.seqlen, "The calibration seqlen", PruneSpecError)
    if spec.method in NEEDS_NOISE:
        if handle.mask_id is None:
            raise PruneSpecError(f"{spec.method} corrupts calibration text with [MASK], but this model has no mask "
                                 "token. Use magnitude, wanda or sparsegpt.")
        try:
            spec.sink.resolve(len(module.blocks), handle.n_heads)
        except SapError as exc:
            raise PruneSpecError(f"Sink settings: {exc}") from exc
    return tokenize(handle, cal)


def prune(handle, spec: PruneSpec, calibration: Union[CalibrationSpec, str, None] = None,
          progress: Optional[Progress] = None, cache: Optional[sc.CalibrationCache] = None) -> PrunedVariant:
    """Prune ``handle``'s block linears as ``spec`` says; the dense model is left untouched.

    ``calibration`` overrides ``spec.calibration`` (a :class:`CalibrationSpec`, or a string: the
    calibration text). ``progress(done, total, message)`` is called per timestep of the
    calibration passes and per block; raising :class:`~sap_core.errors.Cancelled` in it stops the
    run (nothing to undo: the model was never modified). Every impossible setting raises
    :class:`PruneSpecError` before any forward pass. ``cache`` (a :class:`~sap_core.pruning.scores.CalibrationCache`)
    reuses the statistics of earlier runs that do not depend on sparsity, pattern or tau (sweeps).
    """
    if not isinstance(spec, PruneSpec):
        raise PruneSpecError(f"spec must be a PruneSpec (got {type(spec).__name__}).")
    if isinstance(calibration, str):
        spec = dataclasses.replace(spec, calibration=dataclasses.replace(spec.calibration, text=calibration))
    elif isinstance(calibration, CalibrationSpec):
        spec = dataclasses.replace(spec, calibration=calibration)
    elif calibration is not None:
        raise PruneSpecError(f"calibration must be a CalibrationSpec or a text (got {type(calibration).__name__}).")
    spec.validate()
    token_ids = _check_against_model(handle, spec)

    t_start = time.perf_counter()
    n_blocks = len(handle.module.blocks)
    cal = spec.calibration
    n_noised = cal.nsamples * len(cal.timesteps) if spec.method in NEEDS_NOISE else 0
    total = n_noised + n_blocks
    state = {"done": 0}

    def tick(units: int, message: str) -> None:
        state["done"] += units
        report(progress, state["done"], total, message)

    report(progress, 0, total, f"{spec.label}: starting")
    with handle.lock:  # the only moment the shared model is looked at: snapshot its block weights
        taps = sc.make_taps(handle)
        names = _param_names(handle.module)
        modules = [(i, name, names[id(lin.weight)]) for i, name, lin in target_linears(handle.module)]
        dense = fingerprint(handle.module)
    with torch.no_grad():
        new, record, passes, t_cal = _run(handle, taps, spec, token_ids, tick, cache)
    weights = {pname: new[(i, name)] for i, name, pname in modules}
    seconds = time.perf_counter() - t_start
    timings = {"calibration": t_cal, "pruning": seconds - t_cal}
    return PrunedVariant(spec, weights, modules, seconds, timings, passes, record, handle.source, dense_fingerprint=dense)


def _run(handle, taps, spec: PruneSpec, token_ids, tick, cache=None):
    """Dispatch on the method; returns ``({(block, name): weight}, record, passes, calibration seconds)``."""
    method, nm, sparsity = spec.method, spec.nm, spec.sparsity
    cal = spec.calibration
    if method == "magnitude":
        new = {}
        for i, tap in enumerate(taps):
            for name, lin in tap.linears.items():
                new[(i, name)] = _apply_mask(lin.weight, lin.weight.abs().float(), sparsity, nm)
            tick(1, f"block {i + 1}/{len(taps)} pruned")
        return new, None, 0, 0.0

    clean, generator = calibration_ids(token_ids, cal)
    record = CalibrationRecord(ids=clean.numpy(), timesteps=cal.timesteps if method in NEEDS_NOISE else [])
    t0 = time.perf_counter()

    if method in NOISED_WANDA_FAMILY:
        noised = noised_ids(clean, cal, handle.mask_id, generator)
        weighting = sc.WEIGHTING_OF[method]
        if cache is None:
            stats = sc.noised_wanda_stats(handle, noised, spec.sink, weighting, cal.batch_size, tick, taps)
        else:
            stats = cache.noised_wanda(handle, noised, cal, spec.sink, weighting, tick, taps)
        t_cal = time.perf_counter() - t0
        _describe(record, handle, spec, noised, stats.mass)
        record.token_weights = stats.token_weights
        new = {}
        for i, tap in enumerate(taps):
            for names, norms in stats.norms[i].items():
                for name in names:
                    W = tap.weight(name)
                    new[(i, name)] = _apply_mask(W, W.abs().float() * norms.to(W.device)[None, :], sparsity, nm)
            tick(1, f"block {i + 1}/{len(taps)} pruned")
        return new, record, stats.passes, t_cal

    token_weights = None
    passes = 0
    if method in SINK_SPARSEGPT_FAMILY:
        noised = noised_ids(clean, cal, handle.mask_id, generator)
        if cache is None:
            mass = sc.sink_mass(handle, noised, spec.sink, cal.batch_size, tick, taps)
            passes += int(np.ceil(len(cal.timesteps) / cal.batch_size)) * cal.nsamples
        else:
            mass, run = cache.mass(handle, noised, cal, spec.sink, tick, taps)
            passes += run
        weighting = "gated" if method in GATED else "official"
        token_weights = np.stack([sc.mean_weights(m, spec.sink, weighting, handle.causal) for m in mass])
        _describe(record, handle, spec, noised, mass)
        record.token_weights = token_weights

    if method == "wanda":
        def make_stat(cols, device):
            return sc.ColumnSquares(cols, device)

        def prune_linear(i, name, W, stat):
            return _apply_mask(W, W.abs().float() * stat.norm().to(W.device)[None, :], sparsity, nm)
    else:  # sparsegpt and the sink SparseGPT family
        def make_stat(cols, device):
            return Hessian(cols, device)

        def prune_linear(i, name, W, stat):
            if sparsity == 0 and nm is None:
                return W.detach()
            return sparsegpt_prune(W, stat.matrix(), sparsity, nm, spec.blocksize, spec.percdamp, spec.sparsegpt_selection)[0]

    new = sc.sequential_sweep(handle, clean, make_stat, prune_linear, cal.batch_size, token_weights, tick, taps)
    passes += 2 * int(np.ceil(cal.nsamples / cal.batch_size))  # block-sequential: stats pass + pruned pass
    return new, record, passes, time.perf_counter() - t0


def _apply_mask(W: torch.Tensor, score: torch.Tensor, sparsity: float, nm) -> torch.Tensor:
    """A new tensor: ``W`` with the lowest-scoring weights of each row (or N:M group) set to zero."""
    if sparsity == 0 and nm is None:
        return W.detach()
    return W.masked_fill(select_mask(score, sparsity, nm).to(W.device), 0)


def _describe(record: CalibrationRecord, handle, spec: PruneSpec, noised: torch.Tensor, mass: np.ndarray) -> None:
    d = sc.describe_sinks(mass, spec.sink, handle.causal)
    record.noised = noised.numpy()
    record.mass = d.mass
    record.sink_scores = d.scores
    record.variance = d.variance
    record.labels = d.labels
    record.gate = d.gate
