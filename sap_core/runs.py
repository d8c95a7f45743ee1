"""What a server keeps between a browser's visits: runs under a link (:class:`RunStore`) and each session's
work (:class:`SessionStore`), both in memory with a stated lifetime and budget.

* A **run** (a generation's :class:`~sap_core.diffusion.Trajectory` and how to label it) gets an id; the
  explorer opens ``/explorer?run=ID&step=N`` in any browser that reaches the server. Only its author may
  replace it; everyone may view it. In shared mode it is also written under ``--runs`` as ``run-ID.npz``
  (``Trajectory.save``: atomic, no pickle) and found there after a restart.
* A **session** (``?sid=`` in the URL) holds its trajectory and variants, so a reload or a new tab of the
  same session finds them again. Its variants count against one :class:`~sap_core.memory.MemoryBudget`:
  to make room, the oldest idle sessions' variants are released first, each told when it comes back.
"""

from __future__ import annotations

import json
import re
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from sap_core.decoding import Trajectory
from sap_core.errors import SapError
from sap_core.files import atomic_write_text
from sap_core.memory import BudgetError, MemoryBudget, human

RUN_LIFETIME_S = 24 * 3600  # a run stays openable this long after it was made
SESSION_IDLE_S = 2 * 3600  # a session untouched this long is forgotten
IDLE_RELEASE_S = 10 * 60  # a session idle this long may lose its variants to another's prune
ID = re.compile(r"[A-Za-z0-9_-]{8,64}")


class RunError(SapError):
    """A run id that names no stored run, or a write to another session's run."""


def new_id() -> str:
    """A fresh unguessable id (96 random bits, URL-safe): for a run or a session."""
    return secrets.token_urlsafe(12)


@dataclass(frozen=True)
class StoredRun:
    """A generation under an id: ``trajectory`` (a :class:`~sap_core.diffusion.Trajectory`), the model
    ``source`` it came from, ``label`` (its settings, for people), ``author`` (the session that made it),
    ``created`` (clock seconds), ``nbytes`` (its arrays' memory)."""

    id: str
    trajectory: object
    source: str
    label: str
    author: str
    created: float
    nbytes: int


def trajectory_bytes(traj) -> int:
    arrays = (traj.tokens, traj.final_tokens, traj.decoded_at, traj.confidence, traj.valid_length, traj.step_seconds, traj.mass)
    return sum(a.nbytes for a in arrays if a is not None)


class RunStore:
    """Runs by id, in memory up to ``budget`` bytes (the oldest dropped first) for ``lifetime_s`` seconds, and
    under ``directory`` when given (shared mode). Thread-safe: every browser session of the server uses it."""

    def __init__(
        self,
        budget: int = 1 << 30,
        lifetime_s: float = RUN_LIFETIME_S,
        directory: Path | None = None,
        clock: Callable[[], float] = time.time,
    ):
        self.budget, self.lifetime_s, self.directory, self.clock = budget, lifetime_s, directory, clock
        self._runs: dict[str, StoredRun] = {}
        self._lock = threading.Lock()

    def put(self, trajectory, source: str, label: str, author: str) -> str:
        """Store a new run of session ``author``; returns its id."""
        run = StoredRun(new_id(), trajectory, source, label, author, self.clock(), trajectory_bytes(trajectory))
        if run.nbytes > self.budget:
            raise RunError(f"This run ({human(run.nbytes)}) is larger than the server's store for runs; it has no link.")
        with self._lock:
            self._expire()
            while sum(r.nbytes for r in self._runs.values()) + run.nbytes > self.budget:
                self._runs.pop(next(iter(self._runs)))  # insertion order: the oldest first
            self._runs[run.id] = run
        if self.directory is not None:
            self._write(run)
        return run.id

    def get(self, run_id: str) -> StoredRun:
        """The run under ``run_id`` (from memory, else from ``directory``); a malformed, unknown or expired id
        is refused with a :class:`RunError` that never repeats it."""
        if not isinstance(run_id, str) or not ID.fullmatch(run_id):
            raise RunError("That run link is not valid; ask for the link again.")
        with self._lock:
            self._expire()
            run = self._runs.get(run_id)
        if run is None and self.directory is not None:
            run = self._read(run_id)
        if run is None:
            raise RunError("That run is no longer stored on this server (runs are kept for 24 h); generate it again.")
        return run

    def replace(self, run_id: str, trajectory, label: str, session: str) -> None:
        """Overwrite a run: only its author may (anyone else is refused: a shared run is read-only to them)."""
        run = self.get(run_id)
        if run.author != session:
            raise RunError("This run was shared by another session: you can view it but not change it.")
        new = StoredRun(run.id, trajectory, run.source, label, session, self.clock(), trajectory_bytes(trajectory))
        with self._lock:
            self._runs[run.id] = new
        if self.directory is not None:
            self._write(new)

    def _expire(self) -> None:
        now = self.clock()
        for run_id in [i for i, r in self._runs.items() if now - r.created > self.lifetime_s]:
            del self._runs[run_id]

    def _paths(self, run_id: str) -> tuple[Path, Path]:
        return self.directory / f"run-{run_id}.npz", self.directory / f"run-{run_id}.json"

    def _write(self, run: StoredRun) -> None:
        npz, meta = self._paths(run.id)
        run.trajectory.save(npz)
        about = {"source": run.source, "label": run.label, "author": run.author, "created": run.created}
        atomic_write_text(meta, json.dumps(about))

    def _read(self, run_id: str) -> StoredRun | None:
        npz, meta = self._paths(run_id)
        if not (npz.is_file() and meta.is_file()):
            return None
        try:
            about = json.loads(meta.read_text(encoding="utf-8"))
            traj = Trajectory.load(npz)
        except (OSError, ValueError, SapError):
            return None
        if self.clock() - float(about["created"]) > self.lifetime_s:
            return None
        run = StoredRun(
            run_id, traj, about["source"], about["label"], about["author"], float(about["created"]), trajectory_bytes(traj)
        )
        with self._lock:
            self._runs[run_id] = run
        return run


@dataclass
class Session:
    """One browser session's work on the server: ``state`` (the app's kept session-state values: its
    trajectory and labels), ``variants`` (the Prune page's entries: dicts with ``name``, ``variant``,
    ``model`` and ``bytes``), ``notices`` (messages for its next visit) and ``seen`` (clock seconds)."""

    id: str
    seen: float
    state: dict = field(default_factory=dict)
    variants: list = field(default_factory=list)
    notices: list = field(default_factory=list)


class SessionStore:
    """Sessions by id, forgotten after ``idle_s`` untouched; their variants held within one ``budget``."""

    def __init__(
        self,
        budget: MemoryBudget,
        idle_s: float = SESSION_IDLE_S,
        release_after_s: float = IDLE_RELEASE_S,
        clock: Callable[[], float] = time.time,
    ):
        self.budget, self.idle_s, self.release_after_s, self.clock = budget, idle_s, release_after_s, clock
        self._sessions: dict[str, Session] = {}
        self._held: dict[str, int] = {}  # bytes reserved for a variant being made, by session (one job each)
        self._lock = threading.RLock()

    def session(self, sid: str | None) -> Session:
        """The session ``sid`` (touched), or a new one under a new id when ``sid`` is missing, malformed or expired."""
        with self._lock:
            now = self.clock()
            for old in [s for s in self._sessions.values() if now - s.seen > self.idle_s]:
                del self._sessions[old.id]
            if not (isinstance(sid, str) and ID.fullmatch(sid) and sid in self._sessions):
                sid = new_id()
                self._sessions[sid] = Session(sid, now)
            found = self._sessions[sid]
            found.seen = now
            return found

    def used(self) -> int:
        """Bytes all sessions' variants hold, and those reserved for the variants being made."""
        with self._lock:
            return sum(v["bytes"] for s in self._sessions.values() for v in s.variants) + sum(self._held.values())

    def reserve(self, sid: str, need: int) -> list[str]:
        """Make room for a new variant of ``need`` bytes for session ``sid``, before it is made, and hold it until
        :meth:`add_variant` keeps the variant or :meth:`release` gives the room back (so two prunes that start
        together cannot both pass the budget): release the variants of sessions idle for ``release_after_s`` or
        more, the longest idle first, until it fits; if it still does not, raise
        :class:`~sap_core.memory.BudgetError` (nothing released or held then). Returns the names of the variants
        released (their sessions get a notice)."""
        with self._lock:
            self._held.pop(sid, None)  # a session makes one variant at a time: an earlier hold is this one's
            now = self.clock()
            idle = sorted(
                (s for s in self._sessions.values() if s.id != sid and s.variants and now - s.seen >= self.release_after_s),
                key=lambda s: s.seen,
            )
            used, plan = self.used(), []
            for s in idle:
                if used + need <= self.budget.limit:
                    break
                plan.append(s)
                used -= sum(v["bytes"] for v in s.variants)
            own = [v["name"] for v in self._sessions[sid].variants] if sid in self._sessions else []
            fix = (
                f"Drop or save one of your variants ({', '.join(own)}) on the Prune page, then prune again."
                if own
                else "Other sessions' variants fill it; try again later or ask the host to raise --memory-budget."
            )
            self.budget.check(need, used, fix)
            released = []
            for s in plan:
                names = [v["name"] for v in s.variants]
                s.variants.clear()
                s.notices.append(
                    f"Your variants ({', '.join(names)}) were released while you were away, to make room for "
                    "another session's; prune again to get them back."
                )
                released += names
            self._held[sid] = need
            return released

    def release(self, sid: str) -> None:
        """Give back the room :meth:`reserve` holds for session ``sid`` (its job failed or was cancelled)."""
        with self._lock:
            self._held.pop(sid, None)

    def add_variant(self, sid: str, entry: dict) -> None:
        """Keep a variant (``entry`` with its ``bytes``) in session ``sid``, in the room reserved for it; refused
        past the budget."""
        with self._lock:
            session = self.session(sid)
            self._held.pop(sid, None)
            self.budget.check(entry["bytes"], self.used())
            session.variants.append(entry)


__all__ = ["BudgetError", "RunError", "RunStore", "Session", "SessionStore", "StoredRun", "new_id"]
