"""Progress reporting and cancellation for long jobs.

Every long job takes ``progress(done, total, message)``. The app maps it to ``st.progress``,
the CLI to tqdm. To cancel, the callback raises :class:`sap_core.errors.Cancelled`; the job
undoes any in-place work before the exception leaves it.
"""

from __future__ import annotations

from collections.abc import Callable

Progress = Callable[[int, int, str], None]


def report(progress: Progress | None, done: int, total: int, message: str = "") -> None:
    """Call ``progress`` if one was given."""
    if progress is not None:
        progress(done, total, message)
