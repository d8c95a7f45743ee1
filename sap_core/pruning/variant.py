"""A pruning run's result: :class:`PrunedVariant`, the new weights of every pruned linear, which can be
swapped into the dense model and back (:meth:`PrunedVariant.applied`), applied to a copy
(:meth:`PrunedVariant.apply_to_copy`) or saved as a model directory (:meth:`PrunedVariant.save`);
and :func:`check_sparsity`, the zeros of a model, a module or a variant. Every linear layer inside the
transformer blocks (:func:`target_linears`) is pruned; the embedding, norms and LM head are not.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import shutil
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import torch
from torch import nn

from sap_core.errors import OutputPathError, PruneSpecError
from sap_core.files import atomic_directory, check_output_dir, write_error
from sap_core.memory import human
from sap_core.models import BUILTIN_MODELS, ModelHandle, placement
from sap_core.pruning.record import CalibrationRecord
from sap_core.pruning.spec import STRUCTURED, PruneSpec

# --- which weights ------------------------------------------------------------------------------


def target_linears(module: nn.Module) -> list[tuple[int, str, nn.Linear]]:
    """``(block index, name inside the block, linear)`` for every linear in every block."""
    return [
        (i, name, m) for i, block in enumerate(module.blocks) for name, m in block.named_modules() if isinstance(m, nn.Linear)
    ]


def param_names(module: nn.Module) -> dict[int, str]:
    return {id(p): n for n, p in module.named_parameters()}


def _sparsity_row(block: int, module: str, W: torch.Tensor) -> dict:
    """One row of a sparsity table: a linear's shape, size and zeros."""
    zeros = int((W == 0).sum())
    return dict(
        block=block, module=module, rows=W.shape[0], cols=W.shape[1], params=W.numel(), zeros=zeros, sparsity=zeros / W.numel()
    )


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
    module = obj.module if isinstance(obj, ModelHandle) else obj
    if not hasattr(module, "blocks"):  # a model module of any class: duck-typed on its blocks
        raise PruneSpecError("check_sparsity needs a ModelHandle, a model with .blocks, or a PrunedVariant.")
    rows = []
    with torch.no_grad():
        for i, name, lin in target_linears(module):
            rows.append(_sparsity_row(i, name, lin.weight))
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


def weights_fingerprint(handle: ModelHandle) -> dict:
    """:func:`fingerprint` of a shared model's weights, taken under its lock (so never of another session's
    variant swapped in): what :func:`weights_restored` compares with after a cancelled job."""
    with handle.lock:
        return fingerprint(handle.module)


def weights_restored(handle: ModelHandle, before: dict | None) -> bool:
    """Whether the shared model's weights are exactly those of ``before`` (a :func:`weights_fingerprint`
    taken before a job): the check after a cancel that the dense model is back. Exact, not up to dtype
    rounding: restoring puts the very same tensors back. False without a ``before``."""
    return before is not None and weights_fingerprint(handle) == before


def is_variant_dir(path: Path) -> bool:
    """Whether ``path`` is a directory written by :meth:`PrunedVariant.save` (its ``pruning.json`` says so)."""
    record = Path(path) / "pruning.json"
    try:
        return record.is_file() and json.loads(record.read_text(encoding="utf-8")).get("format") == VARIANT_FORMAT
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return False


def _model_dir(handle) -> Path | None:
    source = BUILTIN_MODELS.get(str(handle.source), Path(str(handle.source)).expanduser())
    return source.resolve() if source.is_dir() else None


def check_save_target(directory: str | Path, handle, overwrite: bool = False) -> Path:
    """Refuse, before any work, a directory a variant may not be saved to: the loaded model's own
    directory (or one inside it or above it), a file, an unwritable place, a non-empty directory that is
    not a SinkScope variant, and an existing variant unless ``overwrite``. Returns the resolved path."""
    target = check_output_dir(directory, "Save directory").resolve()
    model_dir = _model_dir(handle)
    if model_dir is not None and (target == model_dir or model_dir in target.parents or target in model_dir.parents):
        raise OutputPathError(
            f"Save directory '{target}' is the loaded model's directory '{model_dir}' (or holds it, "
            "or sits inside it); saving there would overwrite the dense checkpoint. Choose another directory."
        )
    if target.is_dir() and any(target.iterdir()):
        if not is_variant_dir(target):
            raise OutputPathError(
                f"Save directory '{target}' is not empty and is not a SinkScope variant; saving would "
                "replace its files. Choose a new or empty directory."
            )
        if not overwrite:
            raise OutputPathError(
                f"Save directory '{target}' holds a pruned variant already; pass overwrite=True "
                "(--overwrite on the command line, the confirmation box in the app) to replace it."
            )
    return target


RECORD_TEXT_FIELDS = ("label", "method", "pattern", "source")
RECORD_FRACTION_FIELDS = ("sparsity", "achieved_sparsity", "target_sparsity")


def read_record(path: str | Path) -> tuple[dict, list[str]]:
    """A saved variant's ``pruning.json`` (``path``: the file) as ``(what is readable, problems)``: a file
    that is not a JSON object gives ``({}, [why])``; a field of the wrong type (a text field that is not
    text, a sparsity that is not a number in [0, 1]) is left out with a problem naming it. Never raises."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        return {}, [f"'{path.name}' cannot be read ({type(exc).__name__})."]
    if not isinstance(data, dict):
        return {}, [f"'{path.name}' holds a JSON {type(data).__name__}, not the record of a pruning run."]
    problems = []
    for name in RECORD_TEXT_FIELDS:
        if name in data and not isinstance(data[name], str):
            problems.append(f"'{path.name}': {name} is {data.pop(name)!r}, not text.")
    for name in RECORD_FRACTION_FIELDS:
        value = data.get(name)
        if name in data and (isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1):
            problems.append(f"'{path.name}': {name} is {data.pop(name)!r}, not a fraction in [0, 1].")
    return data, problems


def _existing_dir(path: Path) -> Path:
    while not path.is_dir() and path != path.parent:
        path = path.parent
    return path


@dataclass
class PrunedVariant:
    """The result of :func:`prune`.

    * ``spec``: the :class:`PruneSpec` that made it. ``seconds``: wall time of the run;
      ``timings``: its parts (``calibration``: the noised recorded passes, 0 for methods without them;
      ``pruning``: the rest, the block-sequential pass included). ``passes``: model forward passes over calibration batches.
    * ``weights``: ``{parameter name: new weight}`` for every pruned linear, on the dense weight's
      device and dtype. ``modules``: ``[(block, module, parameter name)]`` in model order.
    * ``layer_sparsity``: per (block, module) DataFrame as :func:`check_sparsity`.
    * ``calibration``: a :class:`~sap_core.pruning.record.CalibrationRecord`, the run's view of its calibration
      record (ids, noised inputs, sink scores, variance, labels, gate, and ``token_weights``: the per-token
      down-weighting factors), None for magnitude.
    """

    spec: PruneSpec
    weights: dict[str, torch.Tensor]
    modules: list[tuple[int, str, str]]
    seconds: float
    timings: dict[str, float]
    passes: int
    calibration: CalibrationRecord | None
    source: str
    layer_sparsity: pd.DataFrame = field(repr=False, default=None)
    dense_fingerprint: dict | None = field(repr=False, default=None)

    def __post_init__(self) -> None:
        if self.layer_sparsity is None:
            rows = []
            for block, name, pname in self.modules:
                rows.append(_sparsity_row(block, name, self.weights[pname]))
            self.layer_sparsity = _frame(rows)

    @property
    def achieved_sparsity(self) -> float:
        """Zeros over all pruned weights (also ``achieved_sparsity`` in ``pruning.json``, :meth:`summary` and a
        sweep's rows), next to the spec's target (``spec.sparsity``, ``spec.target_sparsity``)."""
        return float(self.layer_sparsity.attrs["overall"])

    @property
    def token_weights(self) -> np.ndarray | None:
        """Per-token factors the run multiplied layer inputs by (see :class:`CalibrationRecord`)."""
        return None if self.calibration is None else self.calibration.token_weights

    def settings_table(self) -> pd.DataFrame:
        """The settings this variant's method actually uses, labelled for people (one ``value`` column):
        channels and heads removed for a structured method, no calibration for magnitude, the noising and sink rule only for the noised methods, tau only for
        the gated ones, SparseGPT's block size and dampening only for the SparseGPT family."""
        spec, cal, sink = self.spec, self.spec.calibration, self.spec.sink
        rows = {"method": spec.method, "pattern": spec.structure}
        if spec.method in STRUCTURED:
            rows["MLP channels removed"] = f"{spec.sparsity:.2f}"
            rows["heads removed"] = f"{spec.heads:.2f}"
            if spec.row.statistic.compensates:
                rows["bias compensation"] = "yes" if spec.bias_compensation else "no"
            rows["removed parameters (pruned layers)"] = f"{self.achieved_sparsity:.3f}"
        else:
            if spec.nm is None:
                rows["target sparsity"] = f"{spec.sparsity:.2f}"
            rows["achieved sparsity (pruned layers)"] = f"{self.achieved_sparsity:.3f}"
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
        if spec.row.statistic.reconstructs:
            rows["SparseGPT block size / dampening"] = f"{spec.blocksize} columns / {spec.percdamp:g}"
        rows["time"] = f"{self.seconds:.1f} s"
        return pd.DataFrame({"value": list(rows.values())}, index=list(rows))

    def removed_summary(self, handle) -> str:
        """What the variant took away, in words: its zero weights (a structured variant: the channels and heads
        removed per block, and its parameter count against ``handle``'s dense model)."""
        return f"achieved sparsity {self.achieved_sparsity:.3f}"

    def summary(self) -> dict:
        spec = self.spec
        cal = dataclasses.asdict(spec.calibration)
        text = cal.pop("text")
        cal["text"] = "default (sap_core/assets/text/calibration.txt)" if text is None else f"user text, {len(text)} characters"
        return {
            "format": VARIANT_FORMAT,
            "source": self.source,
            "label": spec.label,
            "method": spec.method,
            "sparsity": spec.sparsity,
            "pattern": spec.structure,
            "target_sparsity": spec.target_sparsity,
            "achieved_sparsity": self.achieved_sparsity,
            "sink": spec.sink.to_dict(),
            "calibration": cal if spec.needs_calibration else None,
            "blocksize": spec.blocksize,
            "percdamp": spec.percdamp,
            "sparsegpt_selection": spec.sparsegpt_selection,
            "seconds": self.seconds,
            "timings": self.timings,
            "passes": self.passes,
            "dense_fingerprint": self.dense_fingerprint,
        }

    def _params(self, module: nn.Module) -> dict[str, nn.Parameter]:
        placement.require_resident(module, "put pruned weights into this model")
        if self.dense_fingerprint is not None and not same_weights(self.dense_fingerprint, fingerprint(module)):
            raise PruneSpecError(
                f"This variant was pruned from another model ({self.source}); its weights differ from "
                "this model's. Prune this model instead."
            )
        params = dict(module.named_parameters())
        out = {}
        for name, W in self.weights.items():
            p = params.get(name)
            if p is None or tuple(p.shape) != tuple(W.shape):
                raise PruneSpecError(
                    f"This variant was pruned from another model ({self.source}): '{name}' "
                    "is missing or has another shape here. Prune this model instead."
                )
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
        memo = {
            id(p): nn.Parameter(self.weights[name].to(p.device, p.dtype).clone(), requires_grad=False)
            for name, p in params.items()
        }
        with handle.lock:
            module = copy.deepcopy(handle.module, memo)
        module.eval()
        return dataclasses.replace(handle, module=module, lock=threading.RLock(), source=f"{handle.name} [{self.spec.label}]")

    def save(self, directory: str | Path, handle, overwrite: bool = False) -> Path:
        """Write the pruned model as a model directory (``model.safetensors``, ``config.json``,
        tokenizer files, and ``pruning.json`` with the spec, figures and the dense model's fingerprint)
        that ``load_model`` loads. Returns the absolute path.

        Guarantees: the target is checked first (:func:`check_save_target`: never the loaded model's own
        directory, never a non-empty directory that is not a variant, an existing variant only with
        ``overwrite``); everything is written into a hidden sibling directory, flushed to disk and renamed
        into place, so a crash leaves the previous directory intact and ``pruning.json`` always
        describes the weights beside it."""
        placement.require_resident(handle.module, "save a pruned variant of this model")
        target = check_save_target(directory, handle, overwrite)
        need = sum(p.numel() * p.element_size() for p in handle.module.parameters())
        free = shutil.disk_usage(_existing_dir(target)).free
        if need > free:
            raise OutputPathError(
                f"Saving to '{target}' needs about {human(need)} of disk space, {human(free)} is free there; "
                "free some space or choose another place."
            )
        try:
            with atomic_directory(target) as tmp:
                with self.applied(handle):
                    handle.module.save_pretrained(str(tmp))
                if handle.tokenizer is not None:
                    handle.tokenizer.save_pretrained(str(tmp))
                (tmp / "pruning.json").write_text(json.dumps(self.summary(), indent=1), encoding="utf-8")
        except Exception as exc:  # safetensors reports a full disk as a SafetensorError, not an OSError
            error = write_error(target, exc)
            if error is None:
                raise
            raise error from None
        return target


# --- the packed form of a mask-only variant ----------------------------------------------------------

_BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}  # a float dtype's bits, by element size


class MaskedWeights(Mapping):
    """``{parameter name: pruned weight}`` made on demand from the dense weights and a bit mask per weight
    (``numpy.packbits`` of "kept", uint8 in host RAM): a mask-only variant's :attr:`PrunedVariant.weights`.
    Each lookup builds one weight (``dense.masked_fill(~kept, 0)``), freed when dropped."""

    def __init__(self, dense: dict[str, torch.Tensor], packed: dict[str, np.ndarray]) -> None:
        self.dense, self.packed = dense, packed  # the dense tensors are the model's own (no copy)

    def __getitem__(self, name: str) -> torch.Tensor:
        W = self.dense[name]
        kept = torch.from_numpy(np.unpackbits(self.packed[name], count=W.numel()).view(np.bool_))
        return W.masked_fill(~kept.view(W.shape).to(W.device), 0)

    def __iter__(self):
        return iter(self.packed)

    def __len__(self) -> int:
        return len(self.packed)

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.packed.values())


class MaskedVariant(PrunedVariant):
    """A :class:`PrunedVariant` whose weights are the dense ones with zeros (magnitude, Wanda, the sink-aware
    Wanda family), held as one bit per weight (:class:`MaskedWeights`) instead of a copy: 1/16 of a bfloat16
    copy, 1/32 of a float32 one. It applies, saves and compares exactly as the variant it was packed from;
    :meth:`applied` builds the pruned weights while it runs (one copy, freed on exit). Made by :func:`pack`."""

    def _params(self, module: nn.Module) -> dict[str, nn.Parameter]:
        """As :meth:`PrunedVariant._params`, checked against the dense shapes (without building any weight)."""
        shapes = SimpleNamespace(weights=self.weights.dense, dense_fingerprint=self.dense_fingerprint, source=self.source)
        return PrunedVariant._params(shapes, module)


def pack(variant: PrunedVariant, handle) -> PrunedVariant:
    """The packed form (:class:`MaskedVariant`) of a variant whose every pruned weight is either the dense
    weight, bit for bit, or +0.0; any other variant (SparseGPT-style, structured, or already packed) unchanged."""
    if type(variant) is not PrunedVariant:  # already packed, or structured (it swaps smaller modules in)
        return variant
    with handle.lock:
        params = variant._params(handle.module)
        dense = {name: p.data for name, p in params.items()}
    packed = {}
    with torch.no_grad():
        for name, W in variant.weights.items():
            D = dense[name]
            if W.dtype != D.dtype or W.device != D.device:
                return variant
            bits = _BITS[D.element_size()]
            kept = W.view(bits) == D.view(bits)
            if bool((W.view(bits)[~kept] != 0).any()):  # a weight that changed to something other than +0.0
                return variant
            packed[name] = np.packbits(kept.reshape(-1).cpu().numpy())
    fields = {f.name: getattr(variant, f.name) for f in dataclasses.fields(variant)}
    return MaskedVariant(**{**fields, "weights": MaskedWeights(dense, packed)})


def resident_bytes(variant: PrunedVariant) -> int:
    """Memory a variant holds between uses: its packed masks, or its copies of the pruned weights."""
    if isinstance(variant.weights, MaskedWeights):
        return variant.weights.nbytes
    return sum(W.numel() * W.element_size() for W in variant.weights.values())
