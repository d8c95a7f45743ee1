"""Running the dense model's blocks without touching it: taps and the one recorded-pass loop.

Nothing here writes to the shared model: every forward runs through a :class:`BlockTap`, a clone of one block that shares its weights' storage (no copy) but has its own
parameter objects and hooks and can take replacement weights. A tap is a snapshot: a variant that
another thread swaps into the shared model later (:meth:`PrunedVariant.applied` replaces the
parameters' tensors, never their contents) does not reach it, so :func:`make_taps` is the only
step that needs ``handle.lock``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from sap_core.attention import AttentionRecorder
from sap_core.models.placement import execution_device

Group = tuple[str, ...]  # names of the linears of one block that read the same input tensor
Tick = Callable[[int, str], None]  # (units done in this call, message)


def shadow(module: nn.Module) -> nn.Module:
    """A clone of ``module`` whose parameters are new ``Parameter`` objects over the *same* tensors
    (no weight copy) and whose buffers are shared; it has its own submodule objects, hook
    dictionaries and parameter slots, so hooks and replacement weights never touch ``module``."""
    memo = {id(p): nn.Parameter(p.data, requires_grad=False) for p in module.parameters()}
    memo.update({id(b): b for b in module.buffers()})
    clone = copy.deepcopy(module, memo)
    for m in clone.modules():
        m._forward_hooks.clear()
        m._forward_pre_hooks.clear()
    return clone


class BlockTap:
    """Runs one transformer block on a parameter-sharing clone and captures its linears' inputs.

    ``tap(hidden, recorder)`` is ``block(hidden, recorder)``; afterwards :meth:`take_inputs` returns
    ``[(group, input)]``: each distinct input tensor once with the names of the linears that read it
    (q/k/v share one, gate/up share one). :meth:`set_weight` replaces a linear's weight in the clone
    only. Captured tensors are references, not copies: the block must not modify them in place.
    """

    def __init__(self, block: nn.Module):
        self.module = shadow(block)
        self.linears: dict[str, nn.Linear] = {n: m for n, m in self.module.named_modules() if isinstance(m, nn.Linear)}
        self.capture = True
        self._inputs: dict[str, torch.Tensor] = {}
        for name, lin in self.linears.items():
            lin.register_forward_pre_hook(self._hook(name))
        self.device = execution_device(block)

    def _hook(self, name: str):
        def fn(_module, args):
            if self.capture:
                self._inputs[name] = args[0]

        return fn

    def __call__(self, hidden: torch.Tensor, recorder: AttentionRecorder | None = None, capture: bool = True) -> torch.Tensor:
        self._inputs = {}
        self.capture = capture
        return self.module(hidden.to(self.device), recorder)

    def take_inputs(self) -> list[tuple[Group, torch.Tensor]]:
        groups: list[tuple[Group, torch.Tensor]] = []
        for name in self.linears:
            x = self._inputs[name]
            for i, (names, y) in enumerate(groups):
                if y is x:
                    groups[i] = (names + (name,), y)
                    break
            else:
                groups.append(((name,), x))
        self._inputs = {}
        return groups

    def weight(self, name: str) -> torch.Tensor:
        return self.linears[name].weight

    def set_weight(self, name: str, weight: torch.Tensor) -> None:
        self.linears[name]._parameters["weight"] = nn.Parameter(weight, requires_grad=False)


def make_taps(handle) -> list[BlockTap]:
    """One :class:`BlockTap` per block, taken under ``handle.lock`` (so no variant is swapped in)."""
    with handle.lock:
        return [BlockTap(b) for b in handle.module.blocks]


def embed(handle, ids: torch.Tensor) -> torch.Tensor:
    return handle.module.embed(ids.to(handle.device))


# --- the recorded passes: every block on noised inputs, attention recorded --------------------


def chunks(S: int, batch_size: int) -> list[tuple[int, int]]:
    return [(c, min(c + batch_size, S)) for c in range(0, S, batch_size)]


def recorded_passes(
    handle, noised: torch.Tensor, batch_size: int, taps: list[BlockTap], capture: bool, keys: torch.Tensor | None = None
):
    """The one recorded-pass loop: for each sample ``n`` of ``noised`` ``int64 [N, S, L]`` and each
    chunk ``[c0, c1)`` of up to ``batch_size`` timesteps, one forward through every block's tap with an
    :class:`AttentionRecorder` (attending to sample ``n``'s ``keys``, ``bool [N, L]``, when given). Yields ``(n, c0, c1, attention, inputs)``: ``attention`` the recorder's
    ``float32 [c1 − c0, layers, heads, L]`` mass per layer and head, ``inputs`` each block's
    :meth:`BlockTap.take_inputs` when ``capture`` (else None). :func:`sap_core.pruning.record.record_calibration`
    is its one caller."""
    N, S, _ = noised.shape
    for n in range(N):
        for c0, c1 in chunks(S, batch_size):
            recorder = AttentionRecorder(key_mask=None if keys is None else keys[n].expand(c1 - c0, -1))
            recorder.start_pass()
            h = embed(handle, noised[n, c0:c1])
            inputs = [] if capture else None
            for tap in taps:
                h = tap(h, recorder, capture=capture)
                if capture:
                    inputs.append(tap.take_inputs())
            del h
            yield n, c0, c1, recorder.end_pass(), inputs
