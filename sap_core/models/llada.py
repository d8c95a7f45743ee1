"""The LLaDA transformer, owned by the project.

Config keys and parameter names follow the released LLaDA checkpoints (``model_type: "llada"``),
so an LLaDA-8B / LLaDA-1.5 directory loads as it is, without remote code:

    model.transformer.wte.weight                       token embedding  [embedding_size, d_model]
    model.transformer.blocks.{i}.attn_norm.weight      RMSNorm before attention
    model.transformer.blocks.{i}.{q,k,v}_proj.weight   attention projections (GQA when n_kv_heads < n_heads)
    model.transformer.blocks.{i}.attn_out.weight       attention output projection
    model.transformer.blocks.{i}.ff_norm.weight        RMSNorm before the MLP
    model.transformer.blocks.{i}.{ff_proj,up_proj}     SwiGLU: ff_out(silu(ff_proj(x)) * up_proj(x))
    model.transformer.blocks.{i}.ff_out.weight         MLP output projection
    model.transformer.ln_f.weight                      final RMSNorm
    model.transformer.ff_out.weight                    LM head (absent when weight_tying)

Attention is bidirectional; ``causal: true`` in the config makes it causal (the AR twin of the
built-in DLM). Pass ``attention_recorder=`` to ``forward`` to record attention mass
(:mod:`sap_core.attention`); without it attention runs fused SDPA.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import MaskedLMOutput

from sap_core.attention import AttentionRecorder, attention_with_mass
from sap_core.models.checkpoint import boolean, number, text, whole
from sap_core.models.placement import run_blocks

# Keys of the official LLaDA configuration whose values this implementation fixes (RoPE in full
# precision, no ALiBi / QK norm / input-embedding norm / logit scaling, no dropout at inference).
OFFICIAL_KEYS = {
    "rope": True,
    "rope_full_precision": True,
    "alibi": False,
    "flash_attention": False,
    "attention_layer_norm": False,
    "input_emb_norm": False,
    "scale_logits": False,
    "block_group_size": 1,
    "multi_query_attention": None,
    "layer_norm_with_affine": True,
    "attention_layer_norm_with_affine": True,
    "bias_for_layer_norm": False,
    "attention_dropout": 0.0,
    "residual_dropout": 0.0,
    "embedding_dropout": 0.0,
}


# Every config.json field this implementation reads, with the values it accepts (checked at load by
# sap_core.models.checkpoint.check_fields, before anything is built).
CONFIG_FIELDS = {
    "d_model": whole(),
    "n_heads": whole(),
    "n_kv_heads": whole(null=True),
    "n_layers": whole(),
    "mlp_hidden_size": whole(null=True),
    "mlp_ratio": whole(),
    "vocab_size": whole(),
    "embedding_size": whole(null=True),
    "max_sequence_length": whole(),
    "rope_theta": number(),
    "rms_norm_eps": number(),
    "include_bias": boolean(),
    "include_qkv_bias": boolean(),
    "weight_tying": boolean(),
    "mask_token_id": whole(0, null=True),
    "causal": boolean(),
    "activation_type": text(),
    "block_type": text(),
    "layer_norm_type": text(),
    **{key: boolean(null=value is None) for key, value in OFFICIAL_KEYS.items() if value is None or isinstance(value, bool)},
    "block_group_size": whole(),
    **{key: number(0.0, 1.0, low_open=False) for key in ("attention_dropout", "residual_dropout", "embedding_dropout")},
}


class LLaDAConfig(PretrainedConfig):
    model_type = "llada"

    def __init__(
        self,
        d_model: int = 4096,
        n_heads: int = 32,
        n_kv_heads: int | None = None,
        n_layers: int = 32,
        mlp_hidden_size: int | None = None,
        mlp_ratio: int = 4,
        vocab_size: int = 126464,
        embedding_size: int | None = None,
        max_sequence_length: int = 4096,
        rope_theta: float = 10000.0,
        rms_norm_eps: float = 1e-5,
        include_bias: bool = False,
        include_qkv_bias: bool = False,
        weight_tying: bool = False,
        mask_token_id: int | None = 126336,
        causal: bool = False,
        activation_type: str = "silu",
        block_type: str = "llama",
        layer_norm_type: str = "rms",
        **kwargs,
    ):
        self.d_model = d_model
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads
        self.n_layers = n_layers
        self.mlp_hidden_size = mlp_hidden_size
        self.mlp_ratio = mlp_ratio
        self.vocab_size = vocab_size
        self.embedding_size = embedding_size
        self.max_sequence_length = max_sequence_length
        self.rope_theta = rope_theta
        self.rms_norm_eps = rms_norm_eps
        self.include_bias = include_bias
        self.include_qkv_bias = include_qkv_bias
        self.weight_tying = weight_tying
        self.mask_token_id = mask_token_id
        self.causal = causal
        self.activation_type = activation_type
        self.block_type = block_type
        self.layer_norm_type = layer_norm_type
        # The official configuration fills a missing key from its ModelConfig defaults, several of which
        # describe another architecture (rope false, embedding_size 50304, dropout 0.1): write the values
        # this model implements, so the official modelling code loads the same network from config.json.
        for key, value in OFFICIAL_KEYS.items():
            setattr(self, key, kwargs.pop(key, value))
        # Tying is done by the model itself (no separate LM head when weight_tying), not by transformers.
        kwargs["tie_word_embeddings"] = False
        super().__init__(**kwargs)

    @property
    def effective_n_kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_size(self) -> int:
        """Width of one attention head: ``head_dim`` when config.json gives it (a model whose heads were pruned,
        :mod:`sap_core.pruning.structured`; the official class does not read it), else ``d_model // n_heads``."""
        return getattr(self, "head_dim", None) or self.d_model // self.n_heads

    @property
    def ffn_hidden_size(self) -> int:
        return self.mlp_hidden_size if self.mlp_hidden_size is not None else self.mlp_ratio * self.d_model

    @property
    def padded_vocab_size(self) -> int:
        return self.embedding_size or self.vocab_size


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, bias: bool = False):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size))
        self.bias = nn.Parameter(torch.zeros(size)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        out = xf.to(x.dtype) * self.weight
        return out + self.bias if self.bias is not None else out


class Rotary:
    """RoPE in full precision, rotate-half layout (as LLaDA / OLMo). Not a module: no state to save."""

    def __init__(self, head_dim: int, theta: float):
        self.head_dim = head_dim
        self.theta = theta
        self._tables: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def cos_sin(self, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``[length, head_dim]`` cos and sin, sliced from one table per device that grows as needed."""
        table = self._tables.get(str(device))
        if table is None or table[0].shape[0] < length:
            dim = self.head_dim
            inv_freq = 1.0 / (self.theta ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim))
            freqs = torch.outer(torch.arange(length, device=device, dtype=torch.float32), inv_freq)
            pos = torch.cat((freqs, freqs), dim=-1)
            table = self._tables[str(device)] = (pos.cos(), pos.sin())
        return table[0][:length], table[1][:length]

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[B, heads, T, head_dim]``."""
        cos, sin = self.cos_sin(x.shape[-2], x.device)
        xf = x.float()
        x1, x2 = xf.chunk(2, dim=-1)
        rotated = torch.cat((-x2, x1), dim=-1)
        return (xf * cos + rotated * sin).to(x.dtype)


class LLaDABlock(nn.Module):
    """Pre-norm transformer block: ``x + attn(attn_norm(x))``, then ``+ mlp(ff_norm(.))``."""

    def __init__(self, config: LLaDAConfig, layer_idx: int, rotary: Rotary):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = config.n_heads
        self.n_kv_heads = config.effective_n_kv_heads
        self.head_dim = config.head_size
        self.causal = bool(config.causal)
        self.rotary = rotary
        d, kv = config.d_model, config.effective_n_kv_heads * config.head_size
        qkv_bias = bool(config.include_bias or config.include_qkv_bias)
        bias = bool(config.include_bias)
        hidden = config.ffn_hidden_size
        self.attn_norm = RMSNorm(d, config.rms_norm_eps, bias)
        self.ff_norm = RMSNorm(d, config.rms_norm_eps, bias)
        self.q_proj = nn.Linear(d, self.n_heads * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(d, kv, bias=qkv_bias)
        self.v_proj = nn.Linear(d, kv, bias=qkv_bias)
        self.attn_out = nn.Linear(self.n_heads * self.head_dim, d, bias=bias)
        self.ff_proj = nn.Linear(d, hidden, bias=bias)
        self.up_proj = nn.Linear(d, hidden, bias=bias)
        self.ff_out = nn.Linear(hidden, d, bias=bias)

    def attention(self, x: torch.Tensor, recorder: AttentionRecorder | None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = self.rotary.apply(q), self.rotary.apply(k)
        if recorder is None:
            att = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal, enable_gqa=self.n_kv_heads != self.n_heads)
        else:
            att = attention_with_mass(q, k, v, self.causal, recorder, self.layer_idx)
        return self.attn_out(att.transpose(1, 2).reshape(B, T, -1))

    def forward(self, x: torch.Tensor, recorder: AttentionRecorder | None = None) -> torch.Tensor:
        x = x + self.attention(self.attn_norm(x), recorder)
        h = self.ff_norm(x)
        return x + self.ff_out(F.silu(self.ff_proj(h)) * self.up_proj(h))


class LLaDAModel(nn.Module):
    """Holds ``transformer`` = {wte, blocks, ln_f, ff_out}, matching the checkpoint's names."""

    def __init__(self, config: LLaDAConfig):
        super().__init__()
        rotary = Rotary(config.head_size, config.rope_theta)
        parts = dict(
            wte=nn.Embedding(config.padded_vocab_size, config.d_model),
            blocks=nn.ModuleList(LLaDABlock(config, i, rotary) for i in range(config.n_layers)),
            ln_f=RMSNorm(config.d_model, config.rms_norm_eps, bool(config.include_bias)),
        )
        if not config.weight_tying:
            parts["ff_out"] = nn.Linear(config.d_model, config.padded_vocab_size, bias=bool(config.include_bias))
        self.transformer = nn.ModuleDict(parts)
        self.weight_tying = bool(config.weight_tying)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        x = self.transformer.ln_f(x)
        if self.weight_tying:
            return F.linear(x, self.transformer.wte.weight)
        return self.transformer.ff_out(x)


class LLaDAModelLM(PreTrainedModel):
    """LLaDA as a transformers model: ``model(input_ids).logits`` is ``[B, T, embedding_size]``."""

    config_class = LLaDAConfig
    base_model_prefix = "model"
    _no_split_modules = ["LLaDABlock"]
    main_input_name = "input_ids"

    def __init__(self, config: LLaDAConfig):
        super().__init__(config)
        self.model = LLaDAModel(config)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    # The three pieces layer-by-layer code (pruning, placement) works with.
    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.transformer.blocks

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.transformer.wte(input_ids)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.head(hidden)

    def hidden_states(self, input_ids: torch.Tensor, recorder: AttentionRecorder | None = None) -> torch.Tensor:
        """``[B, T, d_model]``: the last block's output, before the head (``head`` of it is ``forward``'s
        logits), so a caller can apply the head at chosen positions only (:meth:`ModelHandle.logits`)."""
        return run_blocks(self, input_ids, recorder, self.model.transformer.ln_f)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_recorder: AttentionRecorder | None = None,
        **kwargs,
    ) -> MaskedLMOutput:
        return MaskedLMOutput(logits=self.head(self.hidden_states(input_ids, attention_recorder)))


AutoConfig.register("llada", LLaDAConfig)
AutoModel.register(LLaDAConfig, LLaDAModelLM)
