"""Model families, family detection from ``config.json``, and :func:`load_model`.

A model source is a local directory (``config.json``, safetensors weights, tokenizer files) or the
name of a built-in model in ``sap_core/assets/models/``. Nothing is downloaded: hubs are never contacted.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

from sap_core import ASSETS
from sap_core.attention import AttentionRecorder
from sap_core.errors import ModelLoadError, SapError
from sap_core.memory import tune_allocator
from sap_core.models import dream, llada, mmada
from sap_core.models.checkpoint import SPECIAL_ID_FIELDS, check_declared_size, check_fields, read_config, read_headers
from sap_core.models.dream import load_dream, load_dream_tokenizer
from sap_core.models.hf_causal import HF_CAUSAL_TYPES, load_hf_causal
from sap_core.models.llada import LLaDAConfig, LLaDAModelLM
from sap_core.models.loading import load_pretrained
from sap_core.models.mmada import load_mmada, load_mmada_tokenizer
from sap_core.models.placement import DeviceMap, input_device

tune_allocator()  # freed capture buffers go back to the system (see sap_core.memory, bench/memory_growth.py)

BUILTIN_MODELS = {"tiny-dlm": ASSETS / "models" / "tiny-dlm", "tiny-ar": ASSETS / "models" / "tiny-ar"}
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


@dataclass
class ModelHandle:
    """A loaded model and everything needed to run it.

    ``module`` is the transformers model; it exposes ``blocks`` (the transformer blocks, each a
    ``forward(hidden, recorder=None)``), ``embed(input_ids)`` and ``head(hidden)``, which is what
    layer-by-layer code (pruning) uses; the DLM families add ``hidden_states(input_ids, recorder=None)``
    (the blocks' output before ``head``, for logits at chosen positions). ``mask_id`` is the [MASK] token
    id (None only for causal models without one). ``device`` is where token ids go (the embedding's device; with a
    ``device_map`` the blocks may sit elsewhere, see :mod:`sap_core.models.placement`). ``lock``
    guards any in-place work on ``module``: it is shared by every user of a cached handle.
    """

    module: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    mask_id: int | None
    family: str
    device: torch.device
    dtype: torch.dtype
    causal: bool
    source: str
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False, compare=False)

    @property
    def name(self) -> str:
        return Path(self.source).name if Path(self.source).exists() else self.source

    @property
    def n_layers(self) -> int:
        return len(self.module.blocks)

    @property
    def n_heads(self) -> int:
        return self.module.blocks[0].n_heads

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.module.parameters())

    @property
    def max_length(self) -> int | None:
        """The model's context in tokens (``max_sequence_length`` or ``max_position_embeddings`` of its
        config), None when the config states none: the one length limit generation, perplexity, sweeps
        and pruning calibration all check against (:func:`sap_core.text.check_length`)."""
        cfg = self.module.config
        for key in ("max_sequence_length", "max_position_embeddings"):
            value = getattr(cfg, key, None)
            if value is not None:
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise SapError(f"The model's {key} is {value!r}; it must be a whole number >= 1 (fix config.json).")
                return value
        return None

    @property
    def d_model(self) -> int:
        """Width of the hidden states (``d_model`` of LLaDA's config, ``hidden_size`` of the others)."""
        cfg = self.module.config
        return int(getattr(cfg, "d_model", None) or cfg.hidden_size)

    @property
    def vocab_size(self) -> int | None:
        """Token ids a prompt may use: the tokenizer's (``load_model`` checks each has an embedding row),
        else the embedding's rows, else None (unknown)."""
        try:
            return len(self.tokenizer)
        except TypeError:
            embedding = next((m for m in self.module.modules() if isinstance(m, torch.nn.Embedding)), None)
            return None if embedding is None else int(embedding.num_embeddings)

    def logits(
        self,
        input_ids: torch.Tensor,
        recorder: AttentionRecorder | None = None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``[B, T, V]`` logits on ``device``. DLM: the prediction for position i sits at index i (families
        whose raw logits are shifted, as Dream's, define ``align_logits``). Causal: index i predicts i + 1.

        ``positions`` (bool ``[B, T]``): only the logits at its True entries, ``[N, V]`` in row-major order,
        equal to ``logits(input_ids)[positions]``. Families with ``hidden_states`` (LLaDA, Dream) apply the
        LM head at those positions only, saving its ``d × V`` product everywhere else; the others index
        their full logits. Runs under ``lock``, so a forward pass never sees weights that another thread
        has swapped in."""
        align = getattr(self.module, "align_logits", None)
        hidden_states = getattr(self.module, "hidden_states", None)
        with self.lock:  # a variant applied in place by another thread is never seen half-way
            if positions is not None and hidden_states is not None:
                hidden = hidden_states(input_ids.to(self.device), recorder)
                hidden = align(hidden) if align is not None else hidden  # a shift of positions: the head is per position
                return self.module.head(hidden[positions.to(hidden.device)]).to(self.device)
            logits = self.module(input_ids.to(self.device), attention_recorder=recorder).logits
        logits = align(logits) if align is not None else logits
        if positions is not None:
            logits = logits[positions.to(logits.device)]
        return logits.to(self.device)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` with the tokenizer's own special-token convention; text that is not a
        ``str`` of Unicode characters (bytes, a lone surrogate) is a :class:`SapError`."""
        if not isinstance(text, str):
            raise SapError(
                f"Text to encode must be a str, not {type(text).__name__}; decode bytes first (e.g. data.decode('utf-8'))."
            )
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise SapError(
                f"The text holds a lone surrogate at character {exc.start} ({text[exc.start]!r}), which is not "
                "Unicode text; remove it or decode the source bytes as UTF-8."
            ) from None
        return list(self.tokenizer.encode(text, add_special_tokens=True))

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)


def resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ModelLoadError(f"Unknown device '{device}'; use auto, cpu, cuda or cuda:N.") from None
    if device.type not in ("cpu", "cuda"):
        raise ModelLoadError(f"SinkScope runs on cpu or cuda, not '{device}'; use auto, cpu, cuda or cuda:N.")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("CUDA was requested but no CUDA GPU is available here; use device='cpu'.")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ModelLoadError(
            f"'{device}' does not exist: this machine has {torch.cuda.device_count()} GPU(s); use cuda:0 or auto."
        )
    return device


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in DTYPES:
        raise ModelLoadError(f"Unknown dtype '{dtype}'; choose one of auto, float32, bfloat16, float16.")
    return DTYPES[dtype]


def load_tokenizer(path: Path, family: str | None = None) -> PreTrainedTokenizerBase:

    try:
        if family in FAMILY_TOKENIZERS:
            return FAMILY_TOKENIZERS[family](path)
        if (path / "tokenizer.json").exists():
            return PreTrainedTokenizerFast.from_pretrained(str(path))
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    except Exception as exc:  # transformers raises many kinds here
        raise ModelLoadError(
            f"Could not load a tokenizer from '{path}' ({exc}). Put tokenizer.json (and tokenizer_config.json) in the model directory."
        ) from exc


def _load_llada(
    path: Path, device: torch.device, dtype: torch.dtype, device_map: DeviceMap = None
) -> tuple[PreTrainedModel, LLaDAConfig]:
    config = LLaDAConfig.from_pretrained(str(path))
    return load_pretrained(LLaDAModelLM, path, "llada", dtype, device, device_map, config=config), config


# model_type in config.json -> loader(path, device, dtype[, device_map]) returning (module, config).
# Loaders that take a device_map get it only when load_model() is given one.
FAMILY_LOADERS: dict[str, Callable[..., tuple[PreTrainedModel, object]]] = {
    "llada": _load_llada,
    "mmada": load_mmada,
    "Dream": load_dream,
    **{model_type: load_hf_causal for model_type in HF_CAUSAL_TYPES},
}
# model_type -> the config.json fields its code reads and the values they may take (others: the common ones).
FAMILY_FIELDS: dict[str, dict] = {"llada": llada.CONFIG_FIELDS, "mmada": mmada.CONFIG_FIELDS, "Dream": dream.CONFIG_FIELDS}
# model_type -> a check of the keys its config.json must carry, before any work.
FAMILY_REQUIRED: dict[str, Callable[[Path, dict], None]] = {"mmada": mmada.check_llada_keys}
# model_type -> tokenizer loader, for families whose released tokenizer is remote code or needs the family's chat template.
FAMILY_TOKENIZERS: dict[str, Callable[[Path], PreTrainedTokenizerBase]] = {
    "Dream": load_dream_tokenizer,
    "mmada": load_mmada_tokenizer,
}
# The masked-diffusion families (the others are causal LMs).
DLM_FAMILIES = ("llada", "mmada", "Dream")


def resolve_source(source: str | Path) -> Path:
    if str(source) in BUILTIN_MODELS:
        path = BUILTIN_MODELS[str(source)]
        if not path.exists():
            raise ModelLoadError(f"The built-in model '{source}' is missing from {path}; reinstall SinkScope from a full clone.")
        return path
    path = Path(source).expanduser()
    if not path.exists():
        names = ", ".join(BUILTIN_MODELS)
        raise ModelLoadError(f"No model at '{source}'. Give a local model directory or a built-in name ({names}).")
    if not path.is_dir():
        raise ModelLoadError(f"'{source}' is a file; give the directory that holds config.json and the weights.")
    return path


def portable_source(source: str) -> str:
    """A model source every process can open: a built-in name as it is, a directory as an absolute path."""
    if source in BUILTIN_MODELS:
        return source
    return str(Path(source).expanduser().resolve())


def load_model(
    source: str | Path,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
    device_map: DeviceMap = None,
) -> ModelHandle:
    """Load a model directory or built-in name (``tiny-dlm``, ``tiny-ar``) into a :class:`ModelHandle`.

    ``device_map`` (``"auto"``, or a dict module name → device / ``"cpu"`` / ``"disk"``) spreads a model
    that does not fit one device over several with accelerate; ``device`` then only picks the default
    dtype, and the handle's ``device`` is the embedding's.
    """
    path = resolve_source(source)
    config_dict = read_config(path)
    family = config_dict.get("model_type")
    if family not in FAMILY_LOADERS:
        known = ", ".join(sorted(FAMILY_LOADERS))
        raise ModelLoadError(f"'{path}' is a '{family}' model; SinkScope knows the families: {known}.")
    if family in FAMILY_REQUIRED:
        FAMILY_REQUIRED[family](path, config_dict)
    check_fields(path, config_dict, FAMILY_FIELDS.get(family, {}))
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    check_declared_size(path, config_dict, read_headers(path))  # before any allocation
    tokenizer = load_tokenizer(path, family)
    causal = bool(config_dict.get("causal", False)) or family not in DLM_FAMILIES
    # The raw config.json, not the config class: LLaDAConfig defaults mask_token_id to LLaDA-8B's 126336.
    mask_id = config_dict.get("mask_token_id")
    if mask_id is None:
        mask_id = tokenizer.mask_token_id
    if mask_id is None and not causal:
        raise ModelLoadError(
            f"Cannot determine the [MASK] token of '{path}': set mask_token_id in config.json or a mask_token in the tokenizer."
        )
    hf_logging.disable_progress_bar()  # our own progress reporting; no per-load bars
    try:
        if device_map is None:
            module, config = FAMILY_LOADERS[family](path, dev, dt)
        else:
            module, config = FAMILY_LOADERS[family](path, dev, dt, device_map=device_map)
            dev = input_device(module)
    except (SapError, torch.OutOfMemoryError):
        raise
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, AttributeError) as exc:
        # transformers / safetensors raise many kinds for a damaged checkpoint
        raise ModelLoadError(
            f"Could not load the weights of '{path}' ({type(exc).__name__}: "
            f"{' '.join(str(exc).split())[:200]}); check config.json and the *.safetensors files."
        ) from exc
    module.eval().requires_grad_(False)
    causal = bool(getattr(config, "causal", False) or getattr(module, "causal_lm", False))
    _check_special_ids(path, module, config_dict, tokenizer, mask_id)
    if mask_id is not None and hasattr(config, "mask_token_id"):
        config.mask_token_id = int(mask_id)
    return ModelHandle(module, tokenizer, None if mask_id is None else int(mask_id), family, dev, dt, causal, str(source))


def _check_special_ids(path: Path, module, config_dict: dict, tokenizer, mask_id: int | None) -> None:
    """Every special token id (config and tokenizer) indexes a row of the embedding."""
    try:
        embedding = module.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        embedding = next(m for m in module.modules() if isinstance(m, torch.nn.Embedding))
    rows = embedding.weight.shape[0]
    ids = {name: config_dict.get(name) for name in SPECIAL_ID_FIELDS}
    ids["mask_token_id"] = mask_id
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        ids.setdefault(name, None)
        if ids[name] is None:
            ids[name] = getattr(tokenizer, name, None)
    for name, value in ids.items():
        if value is not None and not 0 <= int(value) < rows:
            raise ModelLoadError(
                f"'{path}': {name} {value} is outside the embedding's {rows} rows; fix "
                f"{name} in config.json (or the tokenizer's special tokens)."
            )
    if len(tokenizer) > rows:
        raise ModelLoadError(
            f"'{path}': the tokenizer has {len(tokenizer)} tokens but the embedding only {rows} rows; "
            "the tokenizer and the weights belong to different models."
        )
