"""How the app is served: :class:`ServerSettings`, read in one place from the environment that
``sinkscope app`` sets (:data:`ENV`), and what shared mode allows.

A plain ``streamlit run app.py`` (or ``sinkscope app``) is single-user mode: every setting at its default.
``sinkscope app --shared --models DIR --runs DIR`` serves a class: the model picker offers the built-in
models and the model directories directly under ``--models`` (by name, never a path), variants are saved
under ``--runs`` with names the server makes, and no message shown to a student names a server path
(:func:`without_paths`). The host can turn off heavy jobs (prune, sweeps, benchmarks) or cap their size.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from sap_core.errors import SapError

ENV = {
    "shared": "SINKSCOPE_SHARED",
    "models_dir": "SINKSCOPE_MODELS_DIR",
    "runs_dir": "SINKSCOPE_RUNS_DIR",
    "heavy_jobs": "SINKSCOPE_HEAVY_JOBS",
    "max_gen_length": "SINKSCOPE_MAX_GEN_LENGTH",
    "max_calibration_samples": "SINKSCOPE_MAX_CALIBRATION_SAMPLES",
    "memory_budget_gb": "SINKSCOPE_MEMORY_BUDGET_GB",
}
DOWNLOAD_LIMIT = 64 * 2**20  # a saved variant is offered as a zip download up to this size


class ServerSettingsError(SapError):
    """A shared-mode setting the server cannot start with."""


def _model_dir(path: Path) -> bool:
    return (path / "config.json").is_file()


@dataclass(frozen=True)
class ServerSettings:
    """The server's settings (all defaults: one user on their own machine).

    * ``shared``: serve a class (the rest applies only then). ``models_dir``: the directory whose model
      directories (those holding a ``config.json``) the picker offers; ``runs_dir``: where variants and
      stored runs are written.
    * ``heavy_jobs``: whether prune, sweeps and benchmarks run at all. ``max_gen_length``,
      ``max_calibration_samples``: caps on a generation's length and a prune's calibration windows (None: none).
    * ``memory_budget_gb``: GB all sessions' variants may hold together (None: half of what is free at start).
    """

    shared: bool = False
    models_dir: Path | None = None
    runs_dir: Path | None = None
    heavy_jobs: bool = True
    max_gen_length: int | None = None
    max_calibration_samples: int | None = None
    memory_budget_gb: float | None = None

    def __post_init__(self) -> None:
        if not self.shared:
            return
        for option, path in (("--models", self.models_dir), ("--runs", self.runs_dir)):
            if path is None:
                raise ServerSettingsError(f"Shared mode needs {option} DIR (an existing directory).")
            if not Path(path).is_dir():
                raise ServerSettingsError(f"{option} '{path}' is not a directory; create it or name an existing one.")
        runs = Path(self.runs_dir).resolve()
        if any(_model_dir(p) for p in (runs, *runs.parents)) or any(
            d == runs or d in runs.parents for d in self.model_dirs().values()
        ):
            raise ServerSettingsError(
                f"--runs '{self.runs_dir}' is inside a model directory; variants saved there would mix with a "
                "checkpoint. Choose a directory outside every model."
            )
        for name in ("max_gen_length", "max_calibration_samples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ServerSettingsError(f"--{name.replace('_', '-')} must be at least 1 (got {value}).")
        if self.memory_budget_gb is not None:
            need = max(self.variant_sizes().values())
            if self.memory_budget_gb * 1e9 < need:
                from sap_core.memory import human  # lazy: memory imports torch; `sinkscope app` checks before it

                raise ServerSettingsError(
                    f"--memory-budget {self.memory_budget_gb:g} GB is below one variant of the largest model offered "
                    f"({human(need)}); raise it or offer smaller models."
                )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ServerSettings:
        """The settings ``sinkscope app`` put in the environment (:data:`ENV`); validated."""
        env = os.environ if environ is None else environ

        def number(key: str, kind):
            raw = env.get(ENV[key], "").strip()
            if not raw:
                return None
            try:
                return kind(raw)
            except ValueError:
                raise ServerSettingsError(f"{ENV[key]}={raw!r} is not a number.") from None

        def path(key: str) -> Path | None:
            raw = env.get(ENV[key], "").strip()
            return Path(raw).expanduser() if raw else None

        return cls(
            shared=env.get(ENV["shared"], "") == "1",
            models_dir=path("models_dir"),
            runs_dir=path("runs_dir"),
            heavy_jobs=env.get(ENV["heavy_jobs"], "1") != "0",
            max_gen_length=number("max_gen_length", int),
            max_calibration_samples=number("max_calibration_samples", int),
            memory_budget_gb=number("memory_budget_gb", float),
        )

    def to_env(self) -> dict[str, str]:
        """The environment :meth:`from_env` reads back as these settings."""
        values = {
            "shared": "1" if self.shared else "",
            "models_dir": str(Path(self.models_dir).resolve()) if self.models_dir else "",
            "runs_dir": str(Path(self.runs_dir).resolve()) if self.runs_dir else "",
            "heavy_jobs": "1" if self.heavy_jobs else "0",
            "max_gen_length": "" if self.max_gen_length is None else str(self.max_gen_length),
            "max_calibration_samples": "" if self.max_calibration_samples is None else str(self.max_calibration_samples),
            "memory_budget_gb": "" if self.memory_budget_gb is None else repr(self.memory_budget_gb),
        }
        return {ENV[k]: v for k, v in values.items()}

    def model_dirs(self) -> dict[str, Path]:
        """The models offered besides the built-in ones: ``{name: directory}`` for each directory directly under
        ``models_dir`` that holds a ``config.json`` (sorted by name; empty outside shared mode)."""
        if not self.shared or self.models_dir is None:
            return {}
        return {p.name: p.resolve() for p in sorted(Path(self.models_dir).iterdir()) if p.is_dir() and _model_dir(p)}

    def model_names(self) -> list[str]:
        """What the shared-mode picker lists: the built-in models, then the directories under ``--models``."""
        from sap_core.models import BUILTIN_MODELS  # lazy: models imports torch; `sinkscope app` checks before it

        return list(BUILTIN_MODELS) + [n for n in self.model_dirs() if n not in BUILTIN_MODELS]

    def source_of(self, name: str) -> str:
        """The model source behind a picker name; a name the server does not offer is refused (never a path)."""
        from sap_core.models import BUILTIN_MODELS  # lazy: models imports torch; `sinkscope app` checks before it

        if name in BUILTIN_MODELS:
            return name
        dirs = self.model_dirs()
        if name not in dirs:
            raise ServerSettingsError("That model is not offered on this server; pick one from the list.")
        return str(dirs[name])

    def variant_sizes(self) -> dict[str, int]:
        """Bytes of one weight-changing variant (a copy of the block linears at the checkpoint's dtype) of each
        offered model: the least a budget must hold."""
        # lazy: memory and models import torch; `sinkscope app` checks the settings before it
        from sap_core.memory import block_linear_params, variant_bytes
        from sap_core.models import BUILTIN_MODELS

        sizes = {}
        for name in self.model_names():
            directory = BUILTIN_MODELS.get(name) or self.model_dirs()[name]
            try:
                config = json.loads((Path(directory) / "config.json").read_text(encoding="utf-8"))
                n = block_linear_params(config)
            except (OSError, ValueError, KeyError, TypeError):
                continue  # not a checkpoint SinkScope reads: the loader says so when it is picked
            element = 4 if str(config.get("torch_dtype") or config.get("dtype") or "float32") == "float32" else 2
            sizes[name] = variant_bytes(n, element, mask_only=False)
        return sizes or {"": 0}

    def saved_variant_dir(self, session: str, name: str) -> Path:
        """Where a variant of a session is saved in shared mode: under ``runs_dir``, named by the server
        (the session's short hash and the variant's name reduced to ``[A-Za-z0-9_.-]``)."""
        assert self.shared and self.runs_dir is not None
        slug = re.sub(r"[^\w.-]+", "_", name, flags=re.ASCII).strip("_.") or "variant"
        return Path(self.runs_dir).resolve() / "variants" / f"{_owner(session)}-{slug}"

    def saved_variant_dirs(self, session: str) -> list[Path]:
        """The directories this session saved in shared mode (:meth:`saved_variant_dir`): never another
        session's, whose names carry another owner."""
        assert self.shared and self.runs_dir is not None
        root = Path(self.runs_dir).resolve() / "variants"
        mine = f"{_owner(session)}-"
        return sorted(p for p in root.iterdir() if p.name.startswith(mine)) if root.is_dir() else []


def _owner(session: str) -> str:
    """The short hash of a session id that names its saves (the id itself is never written)."""
    return hashlib.sha256(session.encode()).hexdigest()[:10]


_ABSOLUTE = re.compile(r"""(?<![\w.])(?:~|[A-Za-z]:)?[/\\][^\s'"`),;]*""")


def without_paths(message: str) -> str:
    """``message`` with every absolute path replaced by ``<server path>``: what shared mode shows of an error."""
    return _ABSOLUTE.sub("<server path>", message)
