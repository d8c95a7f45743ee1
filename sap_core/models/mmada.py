"""MMaDA (Gen-Verse/MMaDA-8B-Base, -MixCoT), loaded as a text masked-diffusion model.

MMaDA's class (``MMadaModelLM`` in Gen-Verse/MMaDA ``models/modeling_mmada.py``) is a subclass of LLaDA's:
the same transformer, the same ``model.transformer.*`` parameter names, the same config keys, plus a few
keys of its own (``model_type: "mmada"``, ``llm_vocab_size``, ``codebook_size``, ``num_vq_tokens``,
``new_vocab_size``, ...). Its vocabulary is LLaDA's text rows (``llm_vocab_size`` = 126,464) followed by
the image codebook (``codebook_size`` = 8,192 rows; image code ``c`` is token ``llm_vocab_size + c``),
so the embedding and the LM head have 134,656 rows; every row is kept. The ``[MASK]`` id is LLaDA's
126336. So a released directory loads here through :class:`MMadaModelLM`, a thin subclass of
:class:`~sap_core.models.llada.LLaDAModelLM` that only names the family, with no remote code.

The tokenizer is LLaDA's (``tokenizer.json``); :func:`load_mmada_tokenizer` gives it the chat template
that MMaDA's own text scripts (``generate.py``, ``app.py``) set before ``apply_chat_template``
(:data:`CHAT_TEMPLATE`). MMaDA's text sampler is :mod:`sap_core.mmada_sampler`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModel, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from sap_core.errors import ModelLoadError
from sap_core.models import llada
from sap_core.models.checkpoint import boolean, whole
from sap_core.models.llada import LLaDAConfig, LLaDAModelLM
from sap_core.models.loading import load_pretrained
from sap_core.models.placement import DeviceMap

# The LLaDA keys that size the network: an MMaDA config.json without them does not describe the model
# (MMaDA's own class reads every LLaDA key from it); refused before anything is built.
LLADA_KEYS = ("d_model", "n_heads", "n_layers", "vocab_size", "max_sequence_length", "rope_theta")

# Every config.json field read here: LLaDA's, and MMaDA's own (checked at load, before anything is built).
CONFIG_FIELDS = {
    **llada.CONFIG_FIELDS,
    "llm_vocab_size": whole(null=True),
    "codebook_size": whole(0, null=True),
    "num_vq_tokens": whole(0, null=True),
    "num_new_special_tokens": whole(0, null=True),
    "new_vocab_size": whole(null=True),
    "w_clip_vit": boolean(null=True),
}

# MMaDA's chat template, as its generate.py / app.py set it on the tokenizer: the BOS token before the
# first message, each message as <|start_header_id|>role<|end_header_id|>\n content (trimmed) <|eot_id|>,
# and the assistant header always appended.
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first %}{{ bos_token }}{% endif %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n' }}"
    "{{ message['content'] | trim }}{{ '<|eot_id|>' }}{% endfor %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n' }}"
)


class MMadaConfig(LLaDAConfig):
    """LLaDA's configuration with MMaDA's keys: ``llm_vocab_size`` text rows, then ``codebook_size`` image rows."""

    model_type = "mmada"

    def __init__(
        self,
        llm_vocab_size: int | None = None,
        codebook_size: int | None = None,
        num_vq_tokens: int | None = None,
        num_new_special_tokens: int | None = 0,
        new_vocab_size: int | None = None,
        **kwargs,
    ):
        self.llm_vocab_size = llm_vocab_size
        self.codebook_size = codebook_size
        self.num_vq_tokens = num_vq_tokens
        self.num_new_special_tokens = num_new_special_tokens
        self.new_vocab_size = new_vocab_size
        super().__init__(**kwargs)

    @property
    def text_vocab_size(self) -> int | None:
        """Rows of the embedding / head that are text tokens (the rest are image codes): ``llm_vocab_size``,
        else the rows before the codebook, else None (unknown)."""
        if self.llm_vocab_size is not None:
            return int(self.llm_vocab_size)
        if self.codebook_size is not None:
            return self.padded_vocab_size - int(self.codebook_size) - int(self.num_new_special_tokens or 0)
        return None


class MMadaModelLM(LLaDAModelLM):
    """MMaDA as a transformers model: LLaDA's network over text + image rows (``model_type: "mmada"``)."""

    config_class = MMadaConfig


def check_llada_keys(path: Path, config: dict) -> None:
    """An MMaDA ``config.json`` carries LLaDA's keys; else a one-line :class:`ModelLoadError`, before any work."""
    missing = [key for key in LLADA_KEYS if config.get(key) is None]
    if config.get("mlp_hidden_size") is None and config.get("mlp_ratio") is None:
        missing.append("mlp_hidden_size")
    if missing:
        raise ModelLoadError(
            f"'{path / 'config.json'}' says model_type 'mmada' but lacks the LLaDA keys {', '.join(missing)}; MMaDA is "
            "LLaDA's architecture and its released config.json carries them: restore that file."
        )


def load_mmada_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    """LLaDA's tokenizer of an MMaDA directory, with MMaDA's chat template (:data:`CHAT_TEMPLATE`)."""

    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(path))
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def load_mmada(path: Path, device: torch.device, dtype: torch.dtype, device_map: DeviceMap = None):
    """Loader for FAMILY_LOADERS: ``(model, config)`` for an MMaDA directory (every row of embedding and head kept)."""
    config = MMadaConfig.from_pretrained(str(path))
    text_rows = config.text_vocab_size
    if text_rows is not None and not 0 < text_rows <= config.padded_vocab_size:
        raise ModelLoadError(
            f"'{path / 'config.json'}': {text_rows} text rows (llm_vocab_size) do not fit the {config.padded_vocab_size} "
            "rows of the embedding; config.json does not describe this checkpoint."
        )
    return load_pretrained(MMadaModelLM, path, "mmada", dtype, device, device_map, config=config), config


AutoConfig.register("mmada", MMadaConfig)
AutoModel.register(MMadaConfig, MMadaModelLM)
