"""Loading a family's weights: placement arguments and a check that the weights match the family.

transformers initialises any parameter missing from a checkpoint at random and only logs it; a
directory whose ``config.json`` names one family while its weights belong to another would then load
"successfully" as a random model. :func:`load_pretrained` refuses that with a :class:`ModelLoadError`.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from transformers import PreTrainedModel

from sap_core.errors import ModelLoadError
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


def load_pretrained(cls, path: Path, family: str, dtype: torch.dtype, device: torch.device,
                    device_map: DeviceMap = None, **kwargs) -> PreTrainedModel:
    """``cls.from_pretrained(path)`` from safetensors, placed on ``device`` (or by ``device_map``), with
    every parameter of the model present in the checkpoint at its shape; else :class:`ModelLoadError`."""
    try:
        model, info = cls.from_pretrained(str(path), dtype=dtype, use_safetensors=True, output_loading_info=True,
                                          **from_pretrained_kwargs(device, device_map), **kwargs)
    except RuntimeError as exc:
        if "mismatch" not in str(exc):
            raise
        raise ModelLoadError(f"The weights in '{path}' do not have the shapes its config.json gives for a "
                             f"'{family}' model; config.json and the weights belong to different models.") from exc
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise ModelLoadError(f"'{path}' says model_type '{family}' but its weights lack {len(missing)} of that "
                             f"family's parameters ({shown}); config.json and the weights belong to different models.")
    return model if device_map is not None else model.to(device)
