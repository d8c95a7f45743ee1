"""The Dream transformer (Dream-v0 Base / Instruct 7B), owned by the project.

Dream is a Qwen2-architecture transformer trained as a masked-diffusion model and run with
bidirectional attention. Config keys and parameter names follow the released checkpoints
(``model_type: "Dream"``), so a Dream directory loads as it is, without its remote code:

    model.embed_tokens.weight                                token embedding  [vocab_size, hidden_size]
    model.layers.{i}.input_layernorm.weight                  RMSNorm before attention
    model.layers.{i}.self_attn.{q,k,v}_proj.{weight,bias}    attention projections, with biases (GQA)
    model.layers.{i}.self_attn.o_proj.weight                 attention output projection, no bias
    model.layers.{i}.post_attention_layernorm.weight         RMSNorm before the MLP
    model.layers.{i}.mlp.{gate,up,down}_proj.weight          SwiGLU: down(act(gate(x)) * up(x))
    model.norm.weight                                        final RMSNorm
    lm_head.weight                                           LM head (tied to the embedding when
                                                             tie_word_embeddings)

**The shift.** Dream was adapted from an AR model and keeps its output alignment: the logits at index
``i`` are the prediction for position ``i + 1``. So the prediction for position ``i`` comes from the
hidden state at ``i − 1`` (Dream's own sampler does ``cat([logits[:, :1], logits[:, :-1]])``).
``DreamModel.forward`` returns the raw logits, as Dream's code does; :meth:`DreamModel.align_logits`
applies the shift, and :meth:`sap_core.models.ModelHandle.logits` calls it, so everything built on the
handle (sampler, replay, evaluation) sees "prediction for position i at index i" as for LLaDA.

The tokenizer of the released models is remote code (``DreamTokenizer``, a copy of Qwen2's byte-level
BPE over ``vocab.json`` + ``merges.txt``); :func:`load_dream_tokenizer` reads the same files with
transformers' own ``Qwen2Tokenizer``.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    Qwen2Tokenizer,
)
from transformers.activations import ACT2FN
from transformers.modeling_outputs import MaskedLMOutput

from sap_core.attention import AttentionRecorder, attention_with_mass
from sap_core.errors import ModelLoadError
from sap_core.models.checkpoint import boolean, mapping_or_null, number, text, whole
from sap_core.models.llada import RMSNorm, Rotary
from sap_core.models.loading import load_pretrained
from sap_core.models.placement import DeviceMap, run_blocks

# Every config.json field this implementation reads, with the values it accepts (checked at load).
CONFIG_FIELDS = {
    "vocab_size": whole(),
    "hidden_size": whole(),
    "intermediate_size": whole(),
    "num_hidden_layers": whole(),
    "num_attention_heads": whole(),
    "num_key_value_heads": whole(null=True),
    "hidden_act": text(tuple(sorted(ACT2FN))),
    "max_position_embeddings": whole(),
    "initializer_range": number(0.0, low_open=False),
    "rms_norm_eps": number(),
    "use_cache": boolean(),
    "tie_word_embeddings": boolean(),
    "rope_theta": number(),
    "rope_scaling": mapping_or_null,
    "use_sliding_window": boolean(),
    "sliding_window": whole(null=True),
    "max_window_layers": whole(0),
    "attention_dropout": number(0.0, 1.0, low_open=False),
    "mask_token_id": whole(0, null=True),
    "pad_token_id": whole(0, null=True),
}


class DreamConfig(PretrainedConfig):
    model_type = "Dream"

    def __init__(
        self,
        vocab_size: int = 151936,
        hidden_size: int = 4096,
        intermediate_size: int = 22016,
        num_hidden_layers: int = 32,
        num_attention_heads: int = 32,
        num_key_value_heads: int | None = 32,
        hidden_act: str = "silu",
        max_position_embeddings: int = 32768,
        initializer_range: float = 0.02,
        rms_norm_eps: float = 1e-6,
        use_cache: bool = False,
        tie_word_embeddings: bool = False,
        rope_theta: float = 10000.0,
        rope_scaling: dict | None = None,
        use_sliding_window: bool = False,
        sliding_window: int | None = 4096,
        max_window_layers: int = 28,
        attention_dropout: float = 0.0,
        mask_token_id: int | None = None,
        pad_token_id: int | None = None,
        **kwargs,
    ):
        # Defaults are Dream's own, except the token ids: released configs write them (mask 151666,
        # pad 151643); when a config lacks mask_token_id, load_model takes the tokenizer's <|mask|>.
        # Checkpoints write rope_scaling: null and use_sliding_window: false; anything else would change the
        # model's function, and this implementation does not do it: refuse rather than run a different model.
        if rope_scaling:
            raise ValueError(f"Dream with rope_scaling={rope_scaling} is not supported (only plain RoPE).")
        if use_sliding_window:
            raise ValueError("Dream with use_sliding_window=true is not supported (attention is full and bidirectional).")
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads if num_key_value_heads is not None else num_attention_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        self.rope_theta = rope_theta
        self.use_sliding_window = use_sliding_window
        self.sliding_window = sliding_window
        self.max_window_layers = max_window_layers
        self.attention_dropout = attention_dropout
        self.mask_token_id = mask_token_id
        super().__init__(tie_word_embeddings=tie_word_embeddings, pad_token_id=pad_token_id, **kwargs)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


class DreamAttention(nn.Module):
    def __init__(self, config: DreamConfig, layer_idx: int, rotary: Rotary):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.rotary = rotary
        d, kv = config.hidden_size, config.num_key_value_heads * config.head_dim
        self.q_proj = nn.Linear(d, self.n_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(d, kv, bias=True)
        self.v_proj = nn.Linear(d, kv, bias=True)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, d, bias=False)

    def forward(self, x: torch.Tensor, recorder: AttentionRecorder | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = self.rotary.apply(q), self.rotary.apply(k)
        if recorder is None:  # bidirectional: no mask at all
            att = F.scaled_dot_product_attention(q, k, v, enable_gqa=self.n_kv_heads != self.n_heads)
        else:
            att = attention_with_mass(q, k, v, False, recorder, self.layer_idx)
        return self.o_proj(att.transpose(1, 2).reshape(B, T, -1))


class DreamMLP(nn.Module):
    def __init__(self, config: DreamConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class DreamDecoderLayer(nn.Module):
    """Pre-norm block: ``x + self_attn(input_layernorm(x))``, then ``+ mlp(post_attention_layernorm(.))``."""

    def __init__(self, config: DreamConfig, layer_idx: int, rotary: Rotary):
        super().__init__()
        self.layer_idx = layer_idx
        self.self_attn = DreamAttention(config, layer_idx, rotary)
        self.mlp = DreamMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    @property
    def n_heads(self) -> int:
        return self.self_attn.n_heads

    @property
    def n_kv_heads(self) -> int:
        return self.self_attn.n_kv_heads

    def forward(self, x: torch.Tensor, recorder: AttentionRecorder | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), recorder)
        return x + self.mlp(self.post_attention_layernorm(x))


class DreamBaseModel(nn.Module):
    """``embed_tokens``, ``layers``, ``norm``: the checkpoint's ``model.*``."""

    def __init__(self, config: DreamConfig):
        super().__init__()
        rotary = Rotary(config.head_dim, config.rope_theta)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DreamDecoderLayer(config, i, rotary) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class DreamModel(PreTrainedModel):
    """Dream as a transformers model: ``model(input_ids).logits`` is ``[B, T, vocab_size]``, *unshifted*
    (index i predicts position i + 1); :meth:`align_logits` shifts them (see the module docstring)."""

    config_class = DreamConfig
    base_model_prefix = "model"
    _no_split_modules = ["DreamDecoderLayer"]
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    main_input_name = "input_ids"

    def __init__(self, config: DreamConfig):
        super().__init__(config)
        self.model = DreamBaseModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    # The three pieces layer-by-layer code (pruning, placement) works with.
    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.layers

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Per-position logits, unshifted: ``head(h)[:, i]`` predicts position ``i + 1``."""
        return self.lm_head(self.model.norm(hidden))

    @staticmethod
    def align_logits(logits: torch.Tensor) -> torch.Tensor:
        """Shift ``[B, T, V]`` raw logits so that index ``i`` holds the prediction for position ``i``:
        ``out[:, i] = logits[:, i − 1]`` for ``i ≥ 1``; position 0 (always prompt) keeps ``logits[:, 0]``,
        exactly as Dream's own sampler does. It only moves positions, so it applies as well to the hidden
        states ``[B, T, d]`` before the (position-wise) head: ``head(align(h)) == align(head(h))``."""
        return torch.cat([logits[:, :1], logits[:, :-1]], dim=1)

    def hidden_states(self, input_ids: torch.Tensor, recorder: AttentionRecorder | None = None) -> torch.Tensor:
        """``[B, T, hidden_size]``: the last layer's output, before the head, *unshifted* (``head`` of it is
        ``forward``'s raw logits; :meth:`ModelHandle.logits` aligns it before applying the head at chosen positions)."""
        return run_blocks(self, input_ids, recorder, self.model.norm)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_recorder: AttentionRecorder | None = None,
        **kwargs,
    ) -> MaskedLMOutput:
        return MaskedLMOutput(logits=self.head(self.hidden_states(input_ids, attention_recorder)))


def load_dream_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    """The tokenizer of a Dream directory, without remote code.

    ``tokenizer.json`` when present; otherwise Qwen2's byte-level BPE over ``vocab.json`` + ``merges.txt``
    with the special tokens (``<|mask|>``, ``<|endoftext|>``, ...) listed in ``tokenizer_config.json``:
    the files the released ``DreamTokenizer`` reads, with the same rules.
    """

    if (path / "tokenizer.json").exists():
        return PreTrainedTokenizerFast.from_pretrained(str(path))
    if not ((path / "vocab.json").exists() and (path / "merges.txt").exists()):
        raise FileNotFoundError(f"'{path}' has neither tokenizer.json nor vocab.json + merges.txt")
    return Qwen2Tokenizer.from_pretrained(str(path))


def load_dream(path: Path, device: torch.device, dtype: torch.dtype, device_map: DeviceMap = None):
    """Loader for FAMILY_LOADERS: ``(model, config)`` for a Dream directory."""
    try:
        config = DreamConfig.from_pretrained(str(path))
    except ValueError as exc:
        raise ModelLoadError(f"'{path}' is a Dream checkpoint SinkScope cannot run: {exc}") from exc
    return load_pretrained(DreamModel, path, "Dream", dtype, device, device_map, config=config), config


AutoConfig.register("Dream", DreamConfig)
AutoModel.register(DreamConfig, DreamModel)
