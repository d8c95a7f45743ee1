"""lm-eval tasks for SinkScope: the built-in task folder, offline loading, one-line errors.

The built-in task ``sinkscope_nextline`` (YAML + local data under ``sap_core/assets/tasks/``) is found
through lm-eval's ``include_path``. Tasks load with the hub switched off (``HF_HUB_OFFLINE``,
``HF_DATASETS_OFFLINE``), so a task whose data is neither shipped nor cached fails at once with one line
naming the task and how to make its data available, and an unknown task name gets one line too.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Iterator, Sequence

from sap_core import ASSETS
from sap_core.errors import SapError

TASKS_DIR = ASSETS / "tasks"
BUILTIN_TASK = "sinkscope_nextline"
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


class TaskError(SapError):
    """An unknown lm-eval task, or one whose data cannot be loaded here."""


@contextlib.contextmanager
def offline() -> Iterator[None]:
    """The hub switched off for the block (environment variables and the libraries' own flags)."""
    saved = {k: os.environ.get(k) for k in OFFLINE_VARIABLES}
    os.environ.update({k: "1" for k in OFFLINE_VARIABLES})
    flags = []
    with contextlib.suppress(ImportError):
        import datasets.config as dc  # lazy: optional (lm-eval's own dependency); the variables alone do without it

        flags.append((dc, "HF_HUB_OFFLINE", dc.HF_HUB_OFFLINE))
        dc.HF_HUB_OFFLINE = True
        if hasattr(dc, "HF_DATASETS_OFFLINE"):
            flags.append((dc, "HF_DATASETS_OFFLINE", dc.HF_DATASETS_OFFLINE))
            dc.HF_DATASETS_OFFLINE = True
    try:
        yield
    finally:
        for obj, name, value in flags:
            setattr(obj, name, value)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@functools.lru_cache(maxsize=4)
def task_manager(include_path: str | None = None, defaults: bool = True):
    """lm-eval's ``TaskManager`` with the built-in tasks (and ``include_path``, when given) included, and
    lm-eval's own tasks when ``defaults`` (indexing those takes some seconds; cached)."""
    from lm_eval.tasks import TaskManager  # lazy: lm-eval's task index is heavy; this module's names are not

    paths = [str(TASKS_DIR)] + ([str(include_path)] if include_path else [])
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    return TaskManager(include_path=paths, include_defaults=defaults)


def manager_for(names: Sequence[str], include_path: str | None = None):
    """The cheapest ``TaskManager`` that knows ``names``: lm-eval's own tasks are indexed only when needed."""
    small = task_manager(include_path, defaults=False)
    return small if all(n in set(small.all_tasks) for n in names) else task_manager(include_path, defaults=True)


def load_tasks(names: Sequence[str], manager=None) -> dict:
    """lm-eval's task dictionary for ``names``, loaded offline; :class:`TaskError` (one line) for an unknown
    name or a task whose data is missing, before any model work."""
    from lm_eval.tasks import get_task_dict  # lazy: as task_manager's

    names = [n.strip() for n in names if n and n.strip()]
    if not names:
        raise TaskError(f"Name at least one task (the built-in one is {BUILTIN_TASK}).")
    manager = manager or manager_for(names)
    known = set(manager.all_tasks)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise TaskError(
            f"Unknown lm-eval task '{unknown[0]}'; the built-in task is {BUILTIN_TASK}, and 'lm_eval ls tasks' lists "
            "lm-eval's own (or give --include-path to a folder of task YAML files)."
        )
    loaded = {}
    for name in names:
        try:
            with offline():
                loaded.update(get_task_dict([name], manager))
        except SapError:
            raise
        except Exception as exc:  # datasets / hub raise many kinds when the data is not here
            reason = " ".join(str(exc).split())[:160]
            raise TaskError(
                f"The data of task '{name}' is not available offline ({type(exc).__name__}: {reason}); run it once where "
                "the Hugging Face hub is reachable so 'datasets' caches it (HF_HOME), or copy that cache here."
            ) from None
    return loaded
