"""One queue per loaded model and device: every model job of every session goes through its :class:`Scheduler`.

:func:`scheduler_for` gives the one scheduler of a :class:`~sap_core.models.ModelHandle` (made on first use, gone
with the handle). A job is a :class:`Ticket`:

* a **generation** (:meth:`Scheduler.generate`): generations waiting together are decoded together as one batch,
  step by step (:func:`sap_core.diffusion.generate_batch`), each with its own prompt, settings, seed and recorded
  trajectory. Only requests with the same :func:`~sap_core.diffusion.batch_key` share a batch (the LLaDA sampler,
  the same total length and steps, capture alike); the others run alone.
* a **heavy job** (:meth:`Scheduler.heavy`: prune, sweep, evaluation, benchmark): any ``work(progress)``; at most
  one runs at a time on the device.

As many batches run at once as the device has useful workers: one per CPU core (a thread each, the torch
threads split between them), one on a GPU. The queue is first come, first served; a worker takes the first job
it may run (a heavy job waits while another heavy job runs) and, for a generation, the compatible generations
waiting behind it (on a CPU an even share of them per worker, so every core works). One owner (a browser
session) has at most one job waiting or running. :meth:`Scheduler.position` and :meth:`Scheduler.estimate` say
where a waiting job stands (from the measured durations of earlier jobs); :meth:`Scheduler.cancel` takes a job
out of the queue, or out of its batch at the next step (a heavy job stops through its progress callback, which
raises :class:`~sap_core.errors.Cancelled`).
"""

from __future__ import annotations

import math
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from sap_core.attention import AttentionRecorder
from sap_core.decoding import DecodeSpec
from sap_core.diffusion import Request, batch_key, generate_batch, prepare
from sap_core.errors import Cancelled, SapError
from sap_core.models import ModelHandle
from sap_core.progress import Progress

GENERATION, HEAVY = "generation", "heavy"
QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
MEASURED = 8  # the estimate averages the last this many durations of each kind


@dataclass(eq=False)
class Ticket:
    """One job in a :class:`Scheduler`'s queue. ``state``: queued, running, done, failed or cancelled;
    ``progress``: the job's last ``(done, total, message)``; :meth:`outcome` its result (or its error, raised)."""

    kind: str
    label: str
    owner: str | None
    request: Request | None = None
    work: Callable[[Progress], Any] | None = None
    key: tuple | None = None  # generations with equal keys may share a batch (None: alone)
    rows: int = 0  # the jobs it ran with (its batch's rows), once it runs
    state: str = QUEUED
    progress: tuple[int, int, str] = (0, 0, "")
    result: Any = None
    error: BaseException | None = None
    submitted: float = field(default_factory=time.monotonic)
    started: float | None = None
    finished: float | None = None
    _done: threading.Event = field(default_factory=threading.Event, repr=False)

    @property
    def pending(self) -> bool:
        return self.state in (QUEUED, RUNNING)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait up to ``timeout`` seconds for the job to end; whether it has."""
        return self._done.wait(timeout)

    def outcome(self) -> Any:
        """The job's result; its error raised (a cancelled job raises :class:`~sap_core.errors.Cancelled`)."""
        assert not self.pending, "the job has not ended"
        if self.state == CANCELLED:
            raise Cancelled(f"{self.label} was cancelled.")
        if self.error is not None:
            raise self.error
        return self.result

    def _report(self, done: int, total: int, message: str) -> None:
        self.progress = (done, total, message)
        if self.state == CANCELLED:
            raise Cancelled(f"{self.label} was cancelled.")


def cpu_cores() -> int:
    """The CPU cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class Scheduler:
    """The queue of one model on its device (see the module's text). ``workers``: batches in flight at once
    (default: one per CPU core, one on a GPU); ``max_batch``: rows in one batch at most."""

    def __init__(self, handle: ModelHandle, workers: int | None = None, max_batch: int = 32):
        on_cpu = handle.device.type == "cpu"
        self.workers = workers or (cpu_cores() if on_cpu else 1)
        assert self.workers >= 1 and max_batch >= 1, (self.workers, max_batch)
        self.max_batch = max_batch
        self.threads = max(1, torch.get_num_threads() // self.workers) if on_cpu else None
        self._handle = weakref.ref(handle)  # the handle owns the scheduler, never the other way round
        self._lock = threading.Lock()
        self._queue: list[Ticket] = []
        self._running: list[list[Ticket]] = []  # the jobs each busy worker runs (a batch, or one job)
        self._busy = 0
        self._seconds = {GENERATION: deque(maxlen=MEASURED), HEAVY: deque(maxlen=MEASURED)}  # per row / per job

    # submitting
    def generate(
        self,
        prompt: str | list[int],
        spec: DecodeSpec = DecodeSpec(),
        recorder: AttentionRecorder | None = None,
        *,
        owner: str | None = None,
        label: str = "Generation",
    ) -> Ticket:
        """Queue a generation (its checks run here, so a bad spec fails at once); the ticket's outcome is the
        :class:`~sap_core.decoding.Trajectory`."""
        handle = self._handle()
        prompt_ids, resolved = prepare(handle, prompt, spec, recorder)
        ticket = Ticket(GENERATION, label, owner, key=batch_key(handle, prompt_ids, resolved, recorder))
        ticket.request = Request(prompt, spec, recorder, ticket._report)
        return self._submit(ticket)

    def heavy(self, work: Callable[[Progress], Any], *, owner: str | None = None, label: str = "The job") -> Ticket:
        """Queue a heavy job, ``work(progress) -> result``: one at a time on this device. Its progress callback
        raises :class:`~sap_core.errors.Cancelled` once the ticket is cancelled (the job undoes its work)."""
        return self._submit(Ticket(HEAVY, label, owner, work=work))

    def _submit(self, ticket: Ticket) -> Ticket:
        with self._lock:
            if ticket.owner is not None:
                # a cancelled job still winding down (until its next progress report) does not count: the new one
                # waits behind it in the queue instead of being refused
                everything = self._queue + [t for batch in self._running for t in batch]
                mine = [t for t in everything if t.owner == ticket.owner and t.state != CANCELLED]
                if mine:
                    raise SapError(
                        f"You already have a job in the queue ({mine[0].label}, {mine[0].state}); wait for it to end "
                        "or cancel it before starting another."
                    )
            self._queue.append(ticket)
            if self._busy < self.workers:
                self._busy += 1
                threading.Thread(target=self._work, name="sinkscope-scheduler", daemon=True).start()
        return ticket

    # leaving
    def cancel(self, ticket: Ticket) -> None:
        """Take the job out: a waiting one leaves the queue at once; a running one stops at its next progress
        report (a generation leaves its batch at the next step, the other rows run on). Nothing for an ended job."""
        with self._lock:
            if ticket.state == QUEUED:
                self._queue.remove(ticket)
                ticket.state, ticket.finished = CANCELLED, time.monotonic()
                ticket._done.set()
            elif ticket.state == RUNNING:
                ticket.state = CANCELLED  # its progress callback raises Cancelled; the worker ends it

    # where a job stands
    def position(self, ticket: Ticket) -> int:
        """Jobs ahead of this one: those running and those waiting before it (0 once it runs or has ended)."""
        with self._lock:
            if ticket.state != QUEUED:
                return 0
            return sum(len(b) for b in self._running) + self._queue.index(ticket)

    def estimate(self, ticket: Ticket) -> float | None:
        """Seconds until this job starts, from the measured durations: what the running jobs have left and the
        waiting jobs ahead cost, shared over the workers; None before a job of each kind ahead was measured."""
        with self._lock:
            if ticket.state != QUEUED:
                return 0.0
            now = time.monotonic()
            mean = {k: sum(v) / len(v) if v else None for k, v in self._seconds.items()}
            ahead = [(t, now - (t.started or now)) for b in self._running for t in b]
            ahead += [(t, 0.0) for t in self._queue[: self._queue.index(ticket)]]
            if any(mean[t.kind] is None for t, _ in ahead):
                return None
            left = sum(max(0.0, mean[t.kind] - elapsed) for t, elapsed in ahead)
            return left / self.workers

    def status(self, ticket: Ticket) -> str:
        """What a waiting person is told: "2 runs ahead of you, about 3 s"; "running" once it runs."""
        n, seconds = self.position(ticket), self.estimate(ticket)
        if ticket.state != QUEUED:
            return f"{ticket.label} is running."
        if n == 0:
            return "Your run is next."
        wait = "" if seconds is None else f", about {max(1, math.ceil(seconds))} s"
        return f"{n} run{'s' if n > 1 else ''} ahead of you{wait}."

    # the workers
    def _take(self) -> list[Ticket] | None:
        """Under the lock: the jobs this worker runs next, or None (it ends)."""
        heavy_running = any(b[0].kind == HEAVY for b in self._running)
        for i, first in enumerate(self._queue):
            if first.kind == HEAVY:
                if heavy_running:
                    continue
                batch = [first]
            elif first.key is None:
                batch = [first]
            else:
                same = [t for t in self._queue[i:] if t.kind == GENERATION and t.key == first.key]
                batch = same[: min(self.max_batch, math.ceil(len(same) / self.workers))]  # a share for every worker
            for t in batch:
                self._queue.remove(t)
                t.state, t.started, t.rows = RUNNING, time.monotonic(), len(batch)
            self._running.append(batch)
            return batch
        return None

    def _work(self) -> None:
        if self.threads is not None:
            torch.set_num_threads(self.threads)  # this thread's share of the cores
        while True:
            with self._lock:
                batch = self._take()
                if batch is None:
                    self._busy -= 1
                    return
            t0 = time.perf_counter()
            self._run(batch)
            seconds = time.perf_counter() - t0
            with self._lock:
                self._running.remove(batch)
                if not (batch[0].kind == GENERATION and all(t.state == CANCELLED for t in batch)):
                    self._seconds[batch[0].kind].append(seconds / len(batch))
                for t in batch:
                    if t.state == RUNNING:
                        t.state = FAILED if t.error is not None else DONE
                    t.finished = time.monotonic()
                    t._done.set()

    def _run(self, batch: list[Ticket]) -> None:
        handle = self._handle()
        try:
            if handle is None:
                raise SapError("The model was unloaded before this job ran; run it again.")
            if batch[0].kind == HEAVY:
                batch[0].result = batch[0].work(batch[0]._report)
            else:
                for t, out in zip(batch, generate_batch(handle, [t.request for t in batch])):
                    if isinstance(out, Exception):
                        t.error = out
                    else:
                        t.result = out
        except Cancelled:
            pass  # the ticket says cancelled
        except Exception as exc:  # the job's own error, for its ticket: the worker lives on
            for t in batch:
                t.error = exc


_SCHEDULERS: dict[int, Scheduler] = {}
_REGISTRY_LOCK = threading.Lock()


def scheduler_for(handle: ModelHandle) -> Scheduler:
    """The one :class:`Scheduler` of ``handle`` (made on first use; dropped when the handle is collected)."""
    with _REGISTRY_LOCK:
        found = _SCHEDULERS.get(id(handle))
        if found is None or found._handle() is not handle:
            found = _SCHEDULERS[id(handle)] = Scheduler(handle)
            weakref.finalize(handle, _SCHEDULERS.pop, id(handle), None)
        return found
