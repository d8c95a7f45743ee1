"""Where each part of a model runs, for models spread over several devices.

A model too large for one device is loaded with ``device_map`` (accelerate): every block then lives on
one device, or is *offloaded* (its weights sit in CPU memory or on disk, its parameters show as
``meta``, and an accelerate hook brings the weights to the block's *execution device* for each call).
Code that walks a model block by block (the models' own ``forward``, pruning, calibration) moves the
hidden state to :func:`execution_device` of the next block before calling it.

Rule, in order: the ``execution_device`` of the first accelerate hook found on the module or its
submodules; else the device of the module's first parameter (or buffer); else the CPU. The first rule
is what makes offloaded blocks work: their parameters are on ``meta``, but they run on the hook's device.
"""

from __future__ import annotations

import torch
from torch import nn

from sap_core.errors import OffloadedModelError

# What load_model(device_map=...) accepts: an accelerate strategy name or module name -> device.
DeviceMap = str | dict[str, int | str | torch.device] | None


def _as_device(device: int | str | torch.device) -> torch.device:
    if isinstance(device, int):  # accelerate writes GPU indices as plain ints
        return torch.device("cuda", device)
    return torch.device(device)


def hook_device(module: nn.Module) -> torch.device | None:
    """The execution device of an accelerate hook attached to ``module`` itself, or None."""
    hook = getattr(module, "_hf_hook", None)
    hooks = getattr(hook, "hooks", None) or ([hook] if hook is not None else [])  # SequentialHook or one hook
    for h in hooks:
        device = getattr(h, "execution_device", None)
        if device is not None:
            return _as_device(device)
    return None


def execution_device(module: nn.Module) -> torch.device:
    """The device on which ``module`` computes (see the module docstring for the rule)."""
    for sub in module.modules():
        device = hook_device(sub)
        if device is not None:
            return device
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return torch.device("cpu")


def block_devices(model: nn.Module) -> list[torch.device]:
    """Execution device of each of ``model.blocks``, in order: the block → device map actually in force."""
    return [execution_device(block) for block in model.blocks]


def input_device(model: nn.Module) -> torch.device:
    """Where token ids must go: the execution device of the input embedding."""
    try:
        embedding = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        embedding = None
    if not isinstance(embedding, nn.Module):
        embedding = next((m for m in model.modules() if isinstance(m, nn.Embedding)), model)
    return execution_device(embedding)


def is_offloaded(model: nn.Module) -> bool:
    """True when some weights are not resident on any device (CPU/disk offload: parameters on ``meta``)."""
    return any(p.device.type == "meta" for p in model.parameters())


def require_resident(model: nn.Module, doing: str) -> None:
    """Raise :class:`~sap_core.errors.OffloadedModelError` when ``model`` :func:`is_offloaded`: pruning reads
    every weight, and swapping or saving pruned weights writes them, but an offloaded block's parameters are
    ``meta`` placeholders (accelerate's hook reloads the stored dense weights on every call)."""
    if is_offloaded(model):
        raise OffloadedModelError(
            f"Cannot {doing}: some of the model's weights are offloaded to CPU memory or disk (device_map). "
            "Load it without offload: on one device with enough memory, with no device_map entry on disk (or on the CPU beside a GPU)."
        )


def run_blocks(model: nn.Module, input_ids: torch.Tensor, recorder, final: nn.Module) -> torch.Tensor:
    """The forward pass every SinkScope family shares, up to the LM head: ``embed``, then each block on its
    execution device (recording attention when ``recorder`` is given). Returns the last block's hidden
    state ``[B, T, d]`` on the device where ``final`` (the last norm, the head's first step) runs;
    ``model.head`` of it is the logits."""
    x = model.embed(input_ids)
    for block in model.blocks:
        x = block(x.to(execution_device(block)), recorder)
    return x.to(execution_device(final))
