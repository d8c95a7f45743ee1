"""Loading a family's weights: placement arguments and a check that the weights match the family.

transformers initialises any parameter missing from a checkpoint at random and only logs it; a
directory whose ``config.json`` names one family while its weights belong to another would then load
"successfully" as a random model. :func:`load_pretrained` refuses that with a :class:`ModelLoadError`.
"""

from __future__ import annotations

import math
import shutil
import tempfile
import weakref
from pathlib import Path

import torch
from transformers import PreTrainedModel

from sap_core.errors import ModelLoadError
from sap_core.memory import check_allocation
from sap_core.models.checkpoint import read_headers
from sap_core.models.placement import DeviceMap


def from_pretrained_kwargs(device: torch.device, device_map: DeviceMap = None) -> dict:
    """Placement arguments for ``from_pretrained``.

    Without ``device_map``: load straight onto a CUDA ``device`` (CPU models are moved afterwards).
    With one (``"auto"``, ``"balanced"``, ... or a dict module name → device / ``"cpu"`` / ``"disk"``),
    accelerate places the modules; a map that may spill to disk gets a fresh temporary offload folder.
    """
    if device_map is None:
        return {"device_map": str(device)} if device.type == "cuda" else {}
    kwargs: dict = {"device_map": device_map}
    if isinstance(device_map, str) or "disk" in {str(v) for v in device_map.values()}:
        kwargs["offload_folder"] = tempfile.mkdtemp(prefix="sinkscope-offload-")
    return kwargs


def check_shapes(cls, config, path: Path, family: str) -> int:
    """Build the model ``config`` describes on the meta device (no memory) and compare it with the
    safetensors headers: a parameter whose shape differs, or a model much larger than its weights, is
    refused before anything is allocated. Returns the number of parameters the config declares."""
    headers = read_headers(path)
    build = getattr(cls, "from_config", None) or cls._from_config
    with torch.device("meta"):
        try:
            skeleton = build(config)
        except (ValueError, TypeError, ZeroDivisionError, AssertionError) as exc:
            raise ModelLoadError(f"'{path / 'config.json'}' does not describe a valid '{family}' model ({exc}).") from None
    declared = 0
    for name, p in skeleton.named_parameters():
        declared += p.numel()
        if name in headers and tuple(headers[name][1]) != tuple(p.shape):
            raise ModelLoadError(
                f"'{path}': '{name}' has shape {list(headers[name][1])} in the weights but "
                f"{list(p.shape)} in config.json; config.json and the weights belong to different models."
            )
    stored = sum(math.prod(shape) for _, shape in headers.values())
    if declared > 1.05 * stored:
        raise ModelLoadError(
            f"'{path / 'config.json'}' declares a model of {declared:,} parameters but the weights hold "
            f"{stored:,}; config.json and the weights belong to different models."
        )
    return declared


def check_finite(model: PreTrainedModel, path: Path) -> None:
    """Refuse weights holding NaN or infinity (they would silently turn every output into NaN)."""
    for name, p in model.named_parameters():
        if p.device.type != "meta" and p.is_floating_point() and not bool(torch.isfinite(p).all()):
            raise ModelLoadError(
                f"The weights in '{path}' hold NaN or infinite values (first in '{name}'); the "
                "checkpoint is corrupt. Copy it again or re-export it."
            )


def load_pretrained(
    cls, path: Path, family: str, dtype: torch.dtype, device: torch.device, device_map: DeviceMap = None, **kwargs
) -> PreTrainedModel:
    """``cls.from_pretrained(path)`` from safetensors, placed on ``device`` (or by ``device_map``), with
    every parameter of the model present in the checkpoint at its shape and finite; else :class:`ModelLoadError`.
    The shapes are checked against the safetensors headers before anything is allocated; a temporary
    offload folder is removed with the model (or at exit)."""
    if "config" in kwargs:
        declared = check_shapes(cls, kwargs["config"], path, family)
        if device_map is None:  # the weights must fit where they go (a device_map spreads them instead)
            need = declared * torch.empty((), dtype=dtype).element_size()
            check_allocation(
                f"Loading '{path}' ({declared:,} parameters in {str(dtype).replace('torch.', '')})",
                need if device.type == "cpu" else 0,
                device,
                need,
                "Load it on a larger device, in a smaller dtype (--dtype bfloat16), or spread it with a device_map.",
            )
    placement = from_pretrained_kwargs(device, device_map)
    offload = placement.get("offload_folder")
    try:
        model, info = cls.from_pretrained(
            str(path), dtype=dtype, use_safetensors=True, output_loading_info=True, **placement, **kwargs
        )
    except RuntimeError as exc:
        if offload:
            shutil.rmtree(offload, ignore_errors=True)
        if "mismatch" not in str(exc):
            raise
        raise ModelLoadError(
            f"The weights in '{path}' do not have the shapes its config.json gives for a "
            f"'{family}' model; config.json and the weights belong to different models."
        ) from exc
    if offload:
        weakref.finalize(model, shutil.rmtree, offload, True)
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise ModelLoadError(
            f"'{path}' says model_type '{family}' but its weights lack {len(missing)} of that "
            f"family's parameters ({shown}); config.json and the weights belong to different models."
        )
    check_finite(model, path)
    return model if device_map is not None else model.to(device)
