"""Autoregressive comparison models: any transformers-native causal LM directory (Llama, Qwen2, ...).

The model is transformers' own class (``AutoModelForCausalLM``, no remote code), loaded with
``attn_implementation="sinkscope"``: an attention function registered with transformers'
``AttentionInterface``. Without a recorder it *is* transformers' SDPA attention (same function, same
mask rules, registered for masks with ``AttentionMaskInterface``); when a call passes
``attention_recorder=``, the kwarg travels through transformers' ``**kwargs`` down to every attention
call, which then runs :func:`sap_core.attention.attention_with_mass` and records the mass each key
receives. ``output_attentions`` is never used (it would build full ``T×T`` maps).

The loaded object keeps its class (``isinstance(m, LlamaForCausalLM)`` holds, ``save_pretrained`` writes
the same checkpoint) but gains the SinkScope contract through a mixin: ``blocks`` (one
:class:`HFBlock` per decoder layer, ``forward(hidden, recorder=None)``), ``embed(ids)``, ``head(hidden)``,
``causal_lm = True``. Supported model types are those whose decoder layers share Llama's interface
(``model.embed_tokens``, ``model.layers``, ``model.norm``, ``model.rotary_emb``, ``lm_head``) and
whose attention goes through the interface: :data:`HF_CAUSAL_TYPES`. GPT-2 is not among them (Conv1D
projections rather than ``nn.Linear``, learned positions).

Limits of capture: one unpadded sequence per row (no padding mask), and for sliding-window layers
(Mistral, Qwen2 with ``use_sliding_window``) sequences no longer than the window.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import AttentionInterface, AutoConfig, AutoModelForCausalLM, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from sap_core.attention import AttentionRecorder, attention_with_mass
from sap_core.errors import DecodeSpecError, ModelLoadError
from sap_core.models.loading import load_pretrained
from sap_core.models.placement import DeviceMap, execution_device

ATTENTION_NAME = "sinkscope"
HF_CAUSAL_TYPES = ("llama", "qwen2", "mistral", "qwen3")


def sinkscope_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention-function signature: ``query`` ``[B, H, T, d]``, ``key``/``value``
    ``[B, Hkv, S, d]``; returns ``([B, T, H, d], None)``. Records mass when ``attention_recorder`` is given."""
    recorder: AttentionRecorder | None = kwargs.pop("attention_recorder", None)
    window = kwargs.get("sliding_window")
    S = key.shape[-2]
    if window is not None and S > window and attention_mask is None:
        raise DecodeSpecError(
            f"Layer {module.layer_idx} attends within a sliding window of {window} tokens, but the sequence has {S}; "
            f"block-by-block runs and attention capture need sequences of at most {window} tokens."
        )
    if recorder is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if attention_mask is not None and not _is_plain_causal(attention_mask, query.shape[-2], S):
        why = (
            f"layer {module.layer_idx} attends within a sliding window of {window} tokens and the sequence has {S}"
            if window is not None and S > window
            else "the inputs come with a padding mask"
        )
        raise DecodeSpecError(
            "Attention capture on a transformers causal LM needs plain causal attention over one unpadded sequence, "
            f"but {why}; capture one sequence at a time, without padding and no longer than the window."
        )
    causal = kwargs.get("is_causal")
    causal = getattr(module, "is_causal", True) if causal is None else causal
    out = attention_with_mass(query, key, value, bool(causal), recorder, module.layer_idx, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def _is_plain_causal(mask: torch.Tensor, T: int, S: int) -> bool:
    """Whether a ``[B, 1|H, T, S]`` mask (bool: True = attend; float: 0 = attend) is exactly the causal
    pattern of the last ``T`` of ``S`` positions, the one :func:`attention_with_mass` applies itself."""
    allowed = mask if mask.dtype == torch.bool else mask == 0
    query_pos = torch.arange(S - T, S, device=mask.device)
    causal = torch.arange(S, device=mask.device)[None, :] <= query_pos[:, None]
    return bool((allowed == causal).all())


AttentionInterface.register(ATTENTION_NAME, sinkscope_attention)
AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


class HFBlock(nn.Module):
    """One decoder layer behind the SinkScope block interface ``forward(hidden, recorder=None)``.

    The layer is a registered submodule (``block.layer``), so the block's ``nn.Linear`` layers are the
    model's own; positions are ``0..T-1`` and the mask is plain causal, as for one unpadded sequence.
    """

    def __init__(self, layer: nn.Module, rotary: nn.Module, n_heads: int, n_kv_heads: int):
        super().__init__()
        self.layer = layer
        self.__dict__["_rotary"] = rotary  # shared by all layers; a reference, not a submodule
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads

    def forward(self, hidden: torch.Tensor, recorder: AttentionRecorder | None = None) -> torch.Tensor:
        device = execution_device(self.layer)
        hidden = hidden.to(device)
        positions = torch.arange(hidden.shape[1], device=device)[None]
        cos, sin = self._rotary(hidden, positions)
        extra = {"attention_recorder": recorder} if recorder is not None else {}
        out = self.layer(
            hidden,
            attention_mask=None,
            position_ids=positions,
            position_embeddings=(cos.to(device), sin.to(device)),
            use_cache=False,
            **extra,
        )
        return out[0] if isinstance(out, tuple) else out


class CausalLMContract:
    """Mixin put in front of a transformers causal-LM class: the SinkScope model contract."""

    causal_lm = True

    @property
    def blocks(self) -> nn.ModuleList:
        blocks = self.__dict__.get("_sinkscope_blocks")
        if blocks is None:
            config = self.config
            heads = config.num_attention_heads
            kv_heads = getattr(config, "num_key_value_heads", None) or heads
            rotary = self.base_model.rotary_emb
            # Kept out of the module tree (plain __dict__ entry): the layers are registered once, under
            # model.layers, so state_dict() and save_pretrained() are those of the original model.
            blocks = nn.ModuleList(HFBlock(layer, rotary, heads, kv_heads) for layer in self.base_model.layers)
            self.__dict__["_sinkscope_blocks"] = blocks
        return blocks

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.get_input_embeddings()(input_ids)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        norm = self.base_model.norm
        return self.get_output_embeddings()(norm(hidden.to(execution_device(norm))))

    def forward(self, input_ids: torch.Tensor | None = None, attention_recorder: AttentionRecorder | None = None, **kwargs):
        kwargs.setdefault("use_cache", False)
        if attention_recorder is not None:
            kwargs["attention_recorder"] = attention_recorder
        return super().forward(input_ids=input_ids, **kwargs)


_CONTRACT_CLASSES: dict[type, type] = {}


def with_contract(model: PreTrainedModel) -> PreTrainedModel:
    """Give a loaded transformers causal LM the SinkScope contract, in place (its class gains the mixin;
    the subclass keeps the original name, so saved configs name the original architecture)."""
    base = type(model)
    if isinstance(model, CausalLMContract):
        return model
    cls = _CONTRACT_CLASSES.get(base)
    if cls is None:
        cls = _CONTRACT_CLASSES[base] = type(base.__name__, (CausalLMContract, base), {"__module__": base.__module__})
    model.__class__ = cls
    return model


def load_hf_causal(path: Path, device: torch.device, dtype: torch.dtype, device_map: DeviceMap = None):
    """Loader for FAMILY_LOADERS: ``(model, config)`` for a transformers-native causal LM directory."""

    config = AutoConfig.from_pretrained(str(path), trust_remote_code=False)
    try:
        model = load_pretrained(
            AutoModelForCausalLM,
            path,
            config.model_type,
            dtype,
            device,
            device_map,
            config=config,
            trust_remote_code=False,
            attn_implementation=ATTENTION_NAME,
        )
    except ValueError as exc:  # e.g. a class that refuses custom attention functions
        raise ModelLoadError(f"Could not load '{path}' as a transformers causal LM with attention capture ({exc}).") from exc
    return with_contract(model), model.config
