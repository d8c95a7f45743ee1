"""Checks on a model directory that run before any weight is allocated.

* :func:`read_config`: ``config.json`` is a readable JSON object; the size fields it declares
  (layers, heads, widths, vocabulary, context) are positive integers.
* :func:`weight_files`: the safetensors files of the checkpoint (``model.safetensors`` or the files an
  index names), each inside the model directory (an index may not point elsewhere), none pickled.
* :func:`read_headers`: every file's safetensors header is read and checked against the file's size
  (empty, truncated or garbage files are refused), without reading the tensors.
* :func:`check_declared_size`: the number of layers the config declares is the number of layers the
  weights hold, so a config claiming 1000 layers for a 6-layer checkpoint is refused in milliseconds.

Every failure is a :class:`ModelLoadError` naming the file and what is wrong.
"""

from __future__ import annotations

import json
import math
import re
import struct
from pathlib import Path

from sap_core.errors import ModelLoadError
from sap_core.files import describe

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
INDEX = "model.safetensors.index.json"
MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit
DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "U16": 2,
    "U32": 4,
    "U64": 8,
}
# Config fields that size the model: each, when present and not null, must be an integer >= 1.
SIZE_FIELDS = (
    "n_layers",
    "num_hidden_layers",
    "n_heads",
    "num_attention_heads",
    "n_kv_heads",
    "num_key_value_heads",
    "d_model",
    "hidden_size",
    "mlp_hidden_size",
    "intermediate_size",
    "vocab_size",
    "embedding_size",
    "max_sequence_length",
    "max_position_embeddings",
    "head_dim",
)
LAYER_FIELDS = ("n_layers", "num_hidden_layers")
SPECIAL_ID_FIELDS = ("mask_token_id", "pad_token_id", "bos_token_id", "eos_token_id")
_LAYER_INDEX = re.compile(r"(?:^|\.)(?:blocks|layers|h)\.(\d+)\.")


def read_config(path: Path) -> dict:
    """``config.json`` of ``path`` as a dict, with its size fields checked; else :class:`ModelLoadError`."""
    config_file = path / "config.json"
    config = _config_object(path, config_file)
    _check_sizes(config_file, config)
    return config


def _config_object(path: Path, config_file: Path) -> dict:
    """The JSON object in ``config_file``; a missing file, a folder or another JSON value is refused."""
    if not config_file.exists():
        raise ModelLoadError(
            f"'{path}' has no config.json: it is not a model directory. Point to the folder that "
            "holds config.json and the *.safetensors files."
        )
    if not config_file.is_file():
        raise ModelLoadError(
            f"'{config_file}' is {describe(config_file)}, not a file; it must be the model's JSON configuration."
        )
    config = read_json(config_file, "restore the model's config.json")
    if not isinstance(config, dict):
        raise ModelLoadError(
            f"'{config_file}' holds a JSON {type(config).__name__}, not an object of settings; restore the model's config.json."
        )
    return config


def _check_sizes(config_file: Path, config: dict) -> None:
    """The size fields are whole numbers >= 1, the width splits into the heads, the special ids are >= 0 (in this order)."""
    for name in SIZE_FIELDS:
        if config.get(name) is not None and whole(1)(config[name]):
            raise ModelLoadError(f"'{config_file}': {name} is {config[name]!r}; it must be a whole number >= 1.")
    heads = config.get("n_heads") or config.get("num_attention_heads")
    width = config.get("d_model") or config.get("hidden_size")
    # An explicit head_dim (a head-pruned model the project saved) sets the head size; the weights' shapes
    # are then checked against it when the model is built.
    if heads and width and width % heads and config.get("head_dim") is None:
        raise ModelLoadError(
            f"'{config_file}': the width {width} is not divisible by the {heads} attention heads and no head_dim is "
            "given; config.json does not describe a valid model."
        )
    for name in SPECIAL_ID_FIELDS:
        if config.get(name) is not None and whole(0)(config[name]):
            raise ModelLoadError(f"'{config_file}': {name} is {config[name]!r}; it must be a token id (an integer >= 0).")


def read_json(file: Path, fix: str, what: str = "valid JSON"):
    """The JSON value in ``file``; a binary, malformed, unreadable or absurdly nested file (which would
    exhaust Python's recursion) is a one-line :class:`ModelLoadError` ending with ``fix``."""
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ModelLoadError(f"'{file}' is binary, not JSON text; {fix}.") from None
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"'{file}' is not {what} ({exc}); {fix}.") from None
    except RecursionError:
        raise ModelLoadError(f"'{file}' is nested too deeply to be a model's JSON file; {fix}.") from None
    except OSError as exc:
        raise ModelLoadError(f"Cannot read '{file}' ({exc.strerror}).") from None


# --- the fields a family reads: each checked for type and range at load ----------------------------------


def whole(minimum: int = 1, null: bool = False):
    def check(value):
        if value is None and null:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            return f"a whole number >= {minimum}" + (" or null" if null else "")
        return None

    return check


def number(low: float = 0.0, high: float | None = None, low_open: bool = True, null: bool = False):
    def check(value):
        if value is None and null:
            return None
        ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
        ok = ok and (value > low if low_open else value >= low) and (high is None or value <= high)
        if not ok:
            where = f"{'>' if low_open else '>='} {low:g}" + (f" and <= {high:g}" if high is not None else "")
            return f"a finite number {where}" + (" or null" if null else "")
        return None

    return check


def boolean(null: bool = False):
    def check(value):
        if value is None and null:
            return None
        return None if isinstance(value, bool) else "true or false" + (" or null" if null else "")

    return check


def text(choices: tuple[str, ...] = ()):
    def check(value):
        if not isinstance(value, str) or (choices and value not in choices):
            return "one of " + ", ".join(repr(c) for c in choices) if choices else "a string"
        return None

    return check


def mapping_or_null(value):
    return None if value is None or isinstance(value, dict) else "an object or null"


# Fields that every family reads with these meanings (transformers' causal LMs included).
COMMON_FIELDS = {
    "rope_theta": number(),
    "rms_norm_eps": number(),
    "layer_norm_eps": number(),
    "layer_norm_epsilon": number(),
    "tie_word_embeddings": boolean(),
    "use_cache": boolean(),
}


def check_fields(path: Path, config: dict, rules: dict) -> None:
    """Every field of ``config`` named in ``rules`` (and :data:`COMMON_FIELDS`) has a value its rule
    accepts; else a one-line :class:`ModelLoadError` naming the field, its value and what it must be."""
    for name, rule in {**COMMON_FIELDS, **rules}.items():
        if name in config:
            problem = rule(config[name])
            if problem:
                raise ModelLoadError(f"'{path / 'config.json'}': {name} is {config[name]!r}; it must be {problem}.")


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False


def weight_files(path: Path) -> list[Path]:
    """The safetensors files holding the weights of ``path``; refuses pickles, missing or foreign files."""
    index = path / INDEX
    if index.exists():
        if not index.is_file():
            raise ModelLoadError(f"'{index}' is {describe(index)}, not a file; restore it from the original checkpoint.")
        data = read_json(index, "restore it from the original checkpoint", "a valid JSON index")
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(v, str) for v in weight_map.values()):
            raise ModelLoadError(
                f"'{index}' has no 'weight_map' of parameter name -> shard file; restore it from the original checkpoint."
            )
        files = []
        for name in sorted(set(weight_map.values())):
            shard = path / name
            if Path(name).is_absolute() or not _inside(shard, path):
                raise ModelLoadError(
                    f"'{index}' points to '{name}', outside the model directory '{path}'; shards must "
                    "sit inside the model directory."
                )
            if shard.suffix in PICKLE_SUFFIXES or not name.endswith(".safetensors"):
                raise ModelLoadError(
                    f"'{index}' names the shard '{name}', which is not a .safetensors file. SinkScope "
                    "refuses pickled weights because unpickling can run arbitrary code; convert "
                    "the checkpoint to safetensors."
                )
            if not shard.is_file():
                raise ModelLoadError(
                    f"'{index}' names the shard '{name}', which is missing from '{path}'; copy every shard of the checkpoint."
                )
            files.append(shard)
        return files
    single = path / "model.safetensors"
    if single.exists():
        if not single.is_file():
            raise ModelLoadError(f"'{single}' is {describe(single)}, not a safetensors file.")
        return [single]
    shards = sorted(p for p in path.glob("*.safetensors") if p.is_file())
    if shards:
        raise ModelLoadError(
            f"'{path}' holds sharded weights ({shards[0].name}, ...) but no {INDEX} to say which "
            "parameter is where; copy the index file of the checkpoint."
        )
    pickled = sorted(p.name for p in path.iterdir() if p.is_file() and p.suffix in PICKLE_SUFFIXES)
    if pickled:
        raise ModelLoadError(
            f"'{path}' holds only pickled weights ({', '.join(pickled)}). SinkScope refuses them because unpickling "
            "can run arbitrary code. Convert the checkpoint to safetensors (e.g. model.save_pretrained(dir, "
            "safe_serialization=True) in a trusted environment) and load that."
        )
    raise ModelLoadError(f"'{path}' has no weights: expected model.safetensors or sharded *.safetensors with an index file.")


def read_header(file: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``{tensor name: (dtype, shape)}`` from a safetensors header, checked against the file's size."""
    header, data_size = _header_table(file)
    out, spans = {}, []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype, shape, start, end = _tensor_entry(file, name, info)
        if end > data_size:
            raise ModelLoadError(
                f"'{file}' is truncated: tensor '{name}' ends at byte {end} of {data_size} bytes of data; copy the weights again."
            )
        out[name] = (dtype, shape)
        spans.append((start, end, name))
    if not out:
        raise ModelLoadError(f"'{file}' holds no tensors; copy the weights again.")
    _check_tiling(file, spans, data_size)
    return out


def _header_table(file: Path) -> tuple[dict, int]:
    """The JSON table at the head of a safetensors ``file`` and the number of data bytes after it."""
    size = file.stat().st_size
    if size == 0:
        raise ModelLoadError(f"'{file}' is empty (0 bytes); copy the weights again.")
    if size < 8:
        raise ModelLoadError(f"'{file}' is truncated ({size} bytes): not a safetensors file; copy the weights again.")
    with open(file, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > MAX_HEADER or n > size - 8:
            raise ModelLoadError(
                f"'{file}' is not a valid safetensors file (its header claims {n} bytes of a "
                f"{size}-byte file): it is truncated or not safetensors; copy the weights again."
            )
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise ModelLoadError(f"'{file}' is not a valid safetensors file (unreadable header); copy the weights again.") from None
    if not isinstance(header, dict):
        raise ModelLoadError(f"'{file}' is not a valid safetensors file (its header is not a table of tensors).")
    return header, size - 8 - n


def _tensor_entry(file: Path, name: str, info) -> tuple[str, tuple[int, ...], int, int]:
    """``(dtype, shape, start, end)`` of one header entry whose byte span fits its dtype and shape."""
    try:
        dtype, shape, (start, end) = info["dtype"], tuple(int(s) for s in info["shape"]), info["data_offsets"]
        ok = dtype in DTYPE_BYTES and 0 <= start <= end and end - start == math.prod(shape) * DTYPE_BYTES[dtype]
    except (TypeError, KeyError, ValueError):
        ok = False
    if not ok:
        raise ModelLoadError(
            f"'{file}' is not a valid safetensors file (tensor '{name}' is described wrongly); copy the weights again."
        )
    return dtype, shape, start, end


def _check_tiling(file: Path, spans: list[tuple[int, int, str]], data_size: int) -> None:
    """safetensors: the tensors' ``(start, end, name)`` spans tile the data, no overlap and no gap."""
    offset = 0
    for start, end, name in sorted(spans):
        if start != offset:
            what = "overlaps the one before it" if start < offset else "leaves a gap before it"
            raise ModelLoadError(
                f"'{file}' is not a valid safetensors file (tensor '{name}' {what} in the data); copy the weights again."
            )
        offset = end
    if offset != data_size:
        raise ModelLoadError(
            f"'{file}' is not a valid safetensors file ({data_size - offset} bytes after the last tensor); copy the weights again."
        )


def read_headers(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Headers of every weight file of ``path``, merged (see :func:`weight_files`, :func:`read_header`)."""
    out: dict = {}
    for file in weight_files(path):
        out.update(read_header(file))
    return out


def check_declared_size(path: Path, config: dict, headers: dict) -> None:
    """The config's layer count is the checkpoint's (counted from the tensor names), so no model larger
    than its weights is ever allocated."""
    declared = next((config[f] for f in LAYER_FIELDS if config.get(f) is not None), None)
    indices = {int(m.group(1)) for name in headers for m in [_LAYER_INDEX.search(name)] if m}
    if declared is None or not indices:
        return
    found = max(indices) + 1
    if declared != found:
        raise ModelLoadError(
            f"'{path / 'config.json'}' declares {declared} layers but the weights hold {found}; "
            "config.json and the weights belong to different models."
        )
    if len(indices) != declared:
        raise ModelLoadError(
            f"'{path / 'config.json'}' declares {declared} layers but the weights hold tensors for {len(indices)} of them; "
            "the checkpoint is incomplete or config.json belongs to another model."
        )
