"""Whether a model can be read on this machine, without importing torch: what a Ray sweep
(:mod:`sap_core.distributed`) checks on every node, as a Ray task, before its workers load the model there.

A module of its own, on the standard library and :data:`sap_core.ASSETS` only, so that the task's process imports
no more than this (importing :mod:`sap_core.distributed`, which imports torch and the sweep, took ~4.5 s more a node).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from sap_core import ASSETS


def probe_model(source: str) -> str | None:
    """None when ``source`` (from :func:`sap_core.models.portable_source`) can be read here: its ``config.json`` is
    a JSON object and its weight files are readable; else the reason."""
    path = Path(source) if os.path.isabs(source) else ASSETS / "models" / source
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        if not isinstance(config, dict):
            return f"'{path / 'config.json'}' is not a JSON object"
        weights = sorted(path.glob("*.safetensors")) + sorted(path.glob("*.safetensors.index.json"))
        if not weights:
            return f"no *.safetensors in '{path}'"
        for w in weights:
            with open(w, "rb") as f:
                f.read(8)
    except (OSError, ValueError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None
