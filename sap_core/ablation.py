"""Sink ablation: at every forward pass, find each chosen layer's sinks and remove them as keys.

:class:`SinkAblation` says which layers (None: all) and which sink rule (a :class:`~sap_core.sinks.SinkSpec`,
applied by :func:`sap_core.sink_sets.layer_sink_flags`). The sinks are found **within the layer's own
pass**: the layer's attention is computed as usual, its per-head mass gives the sink set, and the layer's
attention is computed again with those keys' scores at ``-inf`` (the softmax renormalised over the other
keys; :func:`sap_core.attention.attention_with_mass`). Upstream ablation therefore shapes the sinks a later
layer finds, as it shapes its input. A pass in which no sink is found is exactly the plain recorded pass.

:func:`ablated` wraps a :class:`~sap_core.models.ModelHandle` so that every forward pass through it
(``generate``, perplexity, task accuracy) runs with the ablation: same module, weights, lock and tokenizer.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from sap_core.attention import AttentionRecorder
from sap_core.errors import SapError
from sap_core.models import ModelHandle
from sap_core.sink_sets import layer_sink_flags
from sap_core.sinks import SinkSpec


class AblationError(SapError):
    """Impossible sink-ablation settings."""


@dataclass(frozen=True)
class SinkAblation:
    """Remove the sinks (under ``sink``) as keys from the attention of ``layers`` (None: every layer)."""

    layers: tuple[int, ...] | None = None
    sink: SinkSpec = SinkSpec()

    def __post_init__(self) -> None:
        if self.layers is not None:
            values = (self.layers,) if isinstance(self.layers, int) else tuple(self.layers)
            if not values or any(isinstance(v, bool) or not isinstance(v, int) for v in values):
                raise AblationError(f"Ablation layers must be whole numbers, e.g. 0,1 (got {self.layers!r}).")
            object.__setattr__(self, "layers", tuple(sorted(set(values))))
        if not isinstance(self.sink, SinkSpec):
            raise AblationError(f"sink must be a SinkSpec (got {type(self.sink).__name__}).")

    def check(self, handle: ModelHandle) -> tuple[int, ...]:
        """The ablated layers of ``handle``; one line when a layer is not the model's (before any work)."""
        n = handle.n_layers
        if self.layers is None:
            return tuple(range(n))
        bad = [i for i in self.layers if not 0 <= i < n]
        if bad:
            raise AblationError(
                f"Ablation layers {bad} do not exist: {handle.name} has {n} layers (0..{n - 1}); pick layers in that range."
            )
        return self.layers

    def describe(self) -> str:
        layers = "all layers" if self.layers is None else "layers " + ",".join(map(str, self.layers))
        return f"sinks removed as keys in {layers} ({self.sink.rule} rule)"

    def ablate_keys(self, handle: ModelHandle):
        """The recorder's ablation: ``(layer, mass [B, H, S]) -> bool [B, S]`` for the ablated layers, None elsewhere."""
        layers, causal = frozenset(self.check(handle)), handle.causal

        def mask(layer: int, mass: torch.Tensor) -> torch.Tensor | None:
            if layer not in layers:
                return None
            return torch.from_numpy(layer_sink_flags(mass, self.sink, causal=causal))

        return mask

    def recorder(self, handle: ModelHandle, **kwargs) -> AttentionRecorder:
        """An :class:`~sap_core.attention.AttentionRecorder` that ablates (``kwargs`` as its constructor's)."""
        return AttentionRecorder(ablate_keys=self.ablate_keys(handle), **kwargs)


@dataclass
class AblatedHandle(ModelHandle):
    """A :class:`ModelHandle` whose every forward pass removes the sinks (:attr:`ablation`); shares the
    module, weights and lock of the handle it wraps. A recorder passed in gets the ablation."""

    ablation: SinkAblation = SinkAblation()

    def logits(self, input_ids, recorder=None, positions=None):
        if recorder is None:
            recorder = AttentionRecorder()  # mass of the pass dropped: nothing kept between calls
        recorder.ablate_keys = self.ablation.ablate_keys(self)
        return super().logits(input_ids, recorder, positions)


def ablated(handle: ModelHandle, ablation: SinkAblation) -> AblatedHandle:
    """``handle`` with the sinks removed (:class:`AblatedHandle`); ablation layers the model lacks: one line now."""
    ablation.check(handle)
    fields = {f.name: getattr(handle, f.name) for f in dataclasses.fields(ModelHandle)}
    return AblatedHandle(**fields, ablation=ablation)


__all__ = ["AblatedHandle", "AblationError", "SinkAblation", "ablated"]
