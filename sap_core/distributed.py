"""Sweeps over Ray: the jobs of :func:`sap_core.sweep.run_sweep` spread over workers on one machine or a cluster.

``run_sweep(handle, spec, executor=RayExecutor(workers=2))`` (CLI: ``sweep --executor ray``; a
:class:`sap_core.sweep.Executor`) gives the rows the serial sweep gives, bit for bit on CPU, in the same order:

* each worker is a Ray actor with its CPU (and GPU) share that loads the model once, from the same
  source as ``handle`` (a built-in name, or the model directory's absolute path, which must be readable
  on every node: checked up front by a probe task per node), with the same dtype, and checks that its
  weights are the driver's (:func:`sap_core.pruning.variant.fingerprint`);
* the sparsity-independent calibration statistics (:class:`~sap_core.pruning.scores.CalibrationCache`)
  are computed once per distinct calibration by one worker (:func:`sap_core.pruning.engine.calibrate`)
  and shared through Ray's object store; the jobs that read them wait for it, the others run meanwhile;
* every job is :func:`sap_core.sweep.run_job`, the serial sweep's own code, with the same seeds;
* a worker that dies (killed, out of memory) has its job run again on another worker (up to
  ``retries`` times; a replacement worker is started); a job that raises fails alone: its row holds
  the message in an ``error`` column and the sweep goes on;
* results are handed to ``run_sweep``'s ``on_row``/``on_result`` as they arrive (the CLI streams them to
  ``<out>.partial.csv``); Ctrl-C or :class:`~sap_core.errors.Cancelled` from ``progress`` kills the
  workers and leaves Ray as it was found.

Without an address Ray starts on this machine (``num_cpus`` = workers × CPUs per worker, no dashboard)
and stops afterwards; with one (``ray start --head`` on one node, ``ray start --address HEAD:6379`` on
the others) the sweep joins that cluster. A Ray already initialised in this process is used as it is.
"""

from __future__ import annotations

import contextlib
import functools
import heapq
import math
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import sap_core
from sap_core.errors import SapError
from sap_core.evaluate import DENSE
from sap_core.model_probe import probe_model
from sap_core.models import ModelHandle, load_model, portable_source
from sap_core.progress import Progress
from sap_core.pruning import engine
from sap_core.pruning.scores import CalibrationCache
from sap_core.pruning.variant import fingerprint, same_weights
from sap_core.sweep import Finished, SweepJob, SweepSpec, run_job

_CONNECT = threading.Lock()  # one ray.init per process, also when two app sessions start sweeps at once
# Ray starts its workers at niceness 15 (to keep its own daemons responsive); on a machine shared with other work
# that starves the sweep, which is the work the user asked for: a local Ray runs them at the driver's priority.
LOCAL_CONFIG = {"worker_niceness": 0}
ADDRESS_ENV = "SINKSCOPE_RAY_ADDRESS"  # the app's sweeps run on this Ray cluster when it is set


def executor_from_env(env: dict | None = None) -> RayExecutor | None:
    """The app's executor: a :class:`RayExecutor` joining ``$SINKSCOPE_RAY_ADDRESS`` (``auto``: the cluster
    started on this machine with ``ray start --head``) with ``$SINKSCOPE_RAY_WORKERS`` workers (default 2) of
    ``$SINKSCOPE_RAY_GPUS_PER_WORKER`` GPUs (default 0), staying connected; None when the address is unset."""
    env = os.environ if env is None else env
    address = env.get(ADDRESS_ENV, "").strip()
    if not address:
        return None
    try:
        workers, gpus = int(env.get("SINKSCOPE_RAY_WORKERS", "2")), float(env.get("SINKSCOPE_RAY_GPUS_PER_WORKER", "0"))
    except ValueError:
        raise ClusterError("SINKSCOPE_RAY_WORKERS must be a whole number and SINKSCOPE_RAY_GPUS_PER_WORKER a number.") from None
    return RayExecutor(workers=workers, address=address, gpus_per_worker=gpus, stay_connected=True)


class ClusterError(SapError):
    """The Ray cluster cannot run the sweep (too few resources, model not readable on a node, ...)."""


@contextlib.contextmanager
def workers_import_this_checkout(local: bool = True):
    """While a local Ray starts (``local``): the checkout whose ``sap_core`` this process runs is first on
    ``PYTHONPATH`` (a checkout may not be the installed copy), so Ray's processes started now, and the workers
    they start, import it. Inherited rather than given as a
    ``runtime_env``: with one, Ray starts fresh worker processes for the actors instead of handing them the
    ones it prestarted (0.8 s more to a ready worker here, and two idle processes)."""
    if not local:
        yield
        return
    before = os.environ.get("PYTHONPATH")
    here = str(Path(sap_core.__file__).resolve().parent.parent)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (here, before) if p)
    try:
        yield
    finally:
        if before is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = before


class SweepWorker:
    """The body of a Ray actor: one model, loaded once, running sweep jobs (see the module docstring)."""

    def __init__(self, source: str, device: str, dtype: Any, threads: int, dense: dict):
        torch.set_num_threads(threads)
        self.error = None
        self.handle = load_model(source, device=device, dtype=dtype)
        if not same_weights(fingerprint(self.handle.module), dense):
            self.error = f"the model at '{source}' on {socket.gethostname()} has other weights than the driver's"
        self.cache = CalibrationCache()
        self.adopted: set = set()

    def ready(self) -> dict:
        return dict(pid=os.getpid(), host=socket.gethostname(), error=self.error)

    def calibrate(self, key: tuple, prune_specs: list) -> dict:
        engine.calibrate(self.handle, prune_specs, self.cache)
        self.adopted.add(key)
        return {k: v for k, v in self.cache.export(self.handle).items() if k == key}

    def run(self, spec, job, calibration: list) -> tuple[dict, Any]:
        """``calibration``: ``[(key, ObjectRef)]`` of the shared statistics the job reads (fetched once per key)."""
        import ray  # lazy: Ray takes ~1 s to import and only a sweep on Ray needs it

        for key, ref in calibration:
            if key not in self.adopted:
                self.cache.adopt(self.handle, ray.get(ref))
                self.adopted.add(key)
        return run_job(self.handle, spec, job, self.cache)


@dataclass(frozen=True)
class RayExecutor:
    """Run a sweep's jobs on ``workers`` Ray actors of ``cpus_per_worker`` CPUs (and torch threads) and
    ``gpus_per_worker`` GPUs each (> 0: the workers load the model on CUDA). ``address``: a running
    cluster (``ray start --head``; ``"auto"`` finds a local one); None starts Ray here for the sweep.
    ``retries``: how often a job whose worker died is run again before its row records the failure."""

    workers: int = 2
    address: str | None = None
    gpus_per_worker: float = 0.0
    cpus_per_worker: int = 1
    retries: int = 2
    stay_connected: bool = False  # leave a Ray this executor started running (the app: one connection for every sweep)
    status: dict = field(default_factory=dict, compare=False, repr=False)  # worker name -> {pid, host, job}
    stats: dict = field(default_factory=dict, compare=False, repr=False)  # counts and seconds of the last run

    def __post_init__(self) -> None:
        for name in ("workers", "cpus_per_worker", "retries"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "retries" else 1):
                raise ClusterError(f"{name} must be a whole number >= {0 if name == 'retries' else 1} (got {value!r}).")
        g = self.gpus_per_worker
        if isinstance(g, bool) or not isinstance(g, (int, float)) or not math.isfinite(g) or g < 0:
            raise ClusterError(f"gpus_per_worker must be a number >= 0 (got {g!r}).")
        if self.address is not None and not str(self.address).strip():
            raise ClusterError("The Ray address is empty: give HOST:PORT of the head node, 'auto', or no address.")

    # --- cluster ---------------------------------------------------------------------------------

    def _connect(self) -> bool:
        """Initialise Ray unless it is; True when this call started it (and so must shut it down)."""
        import ray  # lazy: Ray takes ~1 s to import and only a sweep on Ray needs it

        with _CONNECT:
            if ray.is_initialized():
                return False
            return self._init(ray) and not self.stay_connected

    def _init(self, ray) -> bool:
        kwargs: dict[str, Any] = dict(include_dashboard=False, log_to_driver=False, configure_logging=False)
        address = self.address or os.environ.get("RAY_ADDRESS", "").strip() or None  # Ray's own variable names a cluster too
        if address is None:
            kwargs.update(num_cpus=self.workers * self.cpus_per_worker, _system_config=LOCAL_CONFIG)
            if self.gpus_per_worker:
                kwargs.update(num_gpus=math.ceil(self.workers * self.gpus_per_worker))
        else:
            kwargs.update(address=address)
        try:
            with workers_import_this_checkout(address is None):
                ray.init(**kwargs)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise ClusterError(f"Cannot start or join Ray at {address or 'this machine'}: {exc}") from None
        return True

    def _check_cluster(self, source: str, probe: bool = True) -> None:
        import ray  # lazy: Ray takes ~1 s to import and only a sweep on Ray needs it
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy  # lazy: as ray

        have = ray.cluster_resources()
        need_cpu, need_gpu = self.workers * self.cpus_per_worker, self.workers * self.gpus_per_worker
        if have.get("CPU", 0) < need_cpu or have.get("GPU", 0) < need_gpu:
            raise ClusterError(
                f"{self.workers} workers need {need_cpu} CPUs and {need_gpu:g} GPUs, but the cluster has "
                f"{have.get('CPU', 0):g} CPUs and {have.get('GPU', 0):g} GPUs: ask for fewer workers or a smaller share."
            )
        if not probe:
            return
        probe = ray.remote(num_cpus=0)(probe_model)
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        refs = [
            probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(source)
            for n in nodes
        ]
        for node, ref in zip(nodes, refs):
            try:
                problem = ray.get(ref, timeout=120)
            except Exception as exc:  # e.g. sap_core not importable there
                problem = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
            if problem:
                raise ClusterError(
                    f"The model '{source}' cannot be read on node {node.get('NodeManagerAddress')} ({problem}). Every node "
                    "needs SinkScope installed and the model directory at the same path (a shared filesystem, or a copy)."
                )

    def _start(self, name: str, handle, source: str, dense: dict):
        """Create worker ``name``'s actor (``dense``: the driver's weights' fingerprint, which it checks its own against)."""
        import ray  # lazy: Ray takes ~1 s to import and only a sweep on Ray needs it

        actor = ray.remote(SweepWorker).options(
            num_cpus=self.cpus_per_worker, num_gpus=self.gpus_per_worker, max_restarts=0, max_task_retries=0, name=None
        )
        device = "cuda" if self.gpus_per_worker > 0 else "cpu"
        worker = actor.remote(source, device, handle.dtype, self.cpus_per_worker, dense)
        self.status[name] = dict(pid=None, host=None, job="starting")
        return worker

    # --- the sweep -------------------------------------------------------------------------------

    def run(
        self, handle: ModelHandle, spec: SweepSpec, jobs: list[SweepJob], progress: Progress | None, finished: Finished
    ) -> None:
        """The :class:`sap_core.sweep.Executor` method: run ``jobs`` on the workers and call ``finished(row, estimates)``
        for each as it arrives."""
        if not jobs:
            return
        source = portable_source(handle.source)
        if progress is not None:
            progress(0, len(jobs), f"starting Ray and {self.workers} worker(s)")
        t_start = time.perf_counter()
        self.stats.clear()
        with handle.lock:
            dense = fingerprint(handle.module)
        workers: dict[str, Any] = {}  # name -> actor; the schedule replaces dead ones here, so all are killed below
        started = False
        try:
            started = self._connect()
            self.stats["init_seconds"] = time.perf_counter() - t_start
            self._check_cluster(source, probe=not started)  # a Ray started here has one node: this one
            for i in range(self.workers):
                workers[f"w{i}"] = self._start(f"w{i}", handle, source, dense)
            self._await_ready(workers)
            start = functools.partial(self._start, handle=handle, source=source, dense=dense)
            _Schedule(self, start, spec, jobs, workers, progress, finished, t_start).run()
        finally:
            self._stop(workers, started)

    def _stop(self, workers: dict, started: bool) -> None:
        """Kill the workers and leave Ray as it was found (shut down only when this run started it)."""
        import ray  # lazy: Ray takes ~1 s to import and only a sweep on Ray needs it

        for worker in workers.values():
            ray.kill(worker, no_restart=True)
        self.status.clear()
        if started:
            t0 = time.perf_counter()
            _stop_autoscaler_monitor()
            ray.shutdown()
            self.stats["shutdown_seconds"] = time.perf_counter() - t0

    def _await_ready(self, workers: dict) -> None:
        import ray  # lazy: Ray takes ~1 s to import and only a sweep on Ray needs it

        for name, worker in workers.items():
            try:
                info = ray.get(worker.ready.remote())
            except ray.exceptions.RayActorError as exc:
                cause = getattr(exc, "cause", None) or exc
                message = str(cause).strip().splitlines()
                raise ClusterError(
                    f"A Ray worker could not load the model: {message[-1] if message else type(cause).__name__}"
                ) from None
            if info["error"]:
                raise ClusterError(f"Ray worker {name}: {info['error']}; every node needs the same model.")
            self.status[name] = dict(pid=info["pid"], host=info["host"], job="idle")


def _stop_autoscaler_monitor() -> None:
    """Kill the autoscaler monitor of the Ray started here before ``ray.shutdown``. Ray 2.60 stops its GCS first;
    the monitor's SIGTERM handler then tries to report to the dead GCS until Ray's 1-s timeout kills it, so every
    shutdown took 1 s longer (measured: 1.1-1.4 s, 0.1 s with this). A local Ray has nothing to autoscale. Ray's
    own process table is private: if it is not where 2.60 keeps it, the shutdown is left as Ray does it."""
    import ray  # lazy: Ray takes ~1 s to import and only a sweep on Ray needs it

    try:
        from ray._private import ray_constants  # lazy: as ray

        processes = ray._private.worker._global_node.all_processes.get(ray_constants.PROCESS_TYPE_MONITOR, [])
        for info in processes:
            info.process.kill()
            info.process.wait(timeout=5)
    except Exception:  # another Ray version: its own shutdown
        return


def _calibration_groups(jobs: list) -> dict[tuple, list]:
    """The jobs that read a shared calibration, by calibration key, keys in job order (the first key is the first job's)."""
    groups: dict[tuple, list] = {}
    for job in jobs:
        if job.prune is not None and engine.shares_calibration(job.prune):
            groups.setdefault(engine.calibration_key(job.prune), []).append(job)
    return groups


def _error_row(spec, job, message: str) -> dict:
    """The row of a job that failed: its identity and ``error``, no measurements."""
    return dict(
        method=DENSE if job.setting is None else job.setting.name,
        sparsity=job.sparsity,
        pattern=job.pattern,
        label=job.label,
        tau=math.nan if job.setting is None else spec.tau_of(job.setting),
        error=message,
    )


def _first_line(exc) -> str:
    """``ExceptionType: message`` of a task's own error (the cause Ray wraps), first line only."""
    cause = exc.cause if getattr(exc, "cause", None) is not None else exc
    return f"{type(cause).__name__}: {cause}".splitlines()[0]


class _Schedule:
    """One :meth:`RayExecutor.run`'s scheduling loop over ready workers: calibrations first (one per key, in job
    order), then jobs in job order as their calibration is in; each finished task is settled as a job done, a
    calibration done, a worker death (retry on a replacement worker) or a task's own error (its jobs fail alone)."""

    def __init__(self, executor: RayExecutor, start_worker, spec, jobs: list, workers: dict, progress, finished, t_start):
        """``start_worker(name)`` creates a replacement worker's actor."""
        self.executor, self.start_worker, self.spec = executor, start_worker, spec
        self.jobs, self.workers, self.progress, self.finished = jobs, workers, progress, finished
        self.groups = _calibration_groups(jobs)
        self.needs = {job.index: engine.calibration_key(job.prune) for js in self.groups.values() for job in js}
        self.ready = [(j.index, j) for j in jobs if j.index not in self.needs]  # a heap: the lowest job index first
        heapq.heapify(self.ready)
        self.to_calibrate = list(self.groups)
        self.calibrated: dict[tuple, Any] = {}  # key -> ObjectRef of the exported statistics
        self.attempts: dict[Any, int] = {}  # job index or calibration key -> worker deaths while running it
        self.inflight: dict[Any, tuple[str, str, Any]] = {}  # ref -> (worker, "job"|"calibrate", job or key)
        self.idle = list(workers)
        self.n_done, self.replacements = 0, 0
        self.stats = executor.stats
        self.stats.update(calibrations=0, retries=0, workers=len(workers), startup_seconds=time.perf_counter() - t_start)
        self.stats["round_trips"] = self.round_trips = {}  # label -> seconds from dispatch to result (bench/sweep_parallel.py)
        self.sent: dict[Any, float] = {}

    def run(self) -> None:
        self.show()
        while self.ready or self.to_calibrate or self.inflight:
            self.dispatch()
            if not self.inflight:
                break
            self.settle(self.next_finished())

    # --- dispatch ------------------------------------------------------------------------------

    def dispatch(self) -> None:
        """Give every idle worker a task: a calibration while one is pending, else the lowest ready job."""
        while self.idle and (self.to_calibrate or self.ready):
            name = self.idle.pop(0)
            if self.to_calibrate:
                self.send_calibration(name, self.to_calibrate.pop(0))
            else:
                self.send_job(name, heapq.heappop(self.ready)[1])
            self.show()

    def send_calibration(self, name: str, key: tuple) -> None:
        group = self.groups[key]
        ref = self.workers[name].calibrate.remote(key, [j.prune for j in group])
        self.stats["calibrations"] += 1
        self.inflight[ref] = (name, "calibrate", key)
        self.executor.status[name]["job"] = f"calibrating for {group[0].label}"

    def send_job(self, name: str, job) -> None:
        deps = [(self.needs[job.index], self.calibrated[self.needs[job.index]])] if job.index in self.needs else []
        ref = self.workers[name].run.remote(self.spec, job, deps)
        self.sent[ref] = time.perf_counter()
        self.inflight[ref] = (name, "job", job)
        self.executor.status[name]["job"] = job.label

    # --- results -------------------------------------------------------------------------------

    def next_finished(self):
        import ray  # lazy: Ray takes ~1 s to import and only a sweep on Ray needs it

        (ref,), _ = ray.wait(list(self.inflight), num_returns=1)
        return ref

    def settle(self, ref) -> None:
        """Handle one finished task; its worker goes back to idle unless it died."""
        import ray  # lazy: Ray takes ~1 s to import and only a sweep on Ray needs it

        name, kind, what = self.inflight.pop(ref)
        try:
            value = ray.get(ref)  # raises the worker's death or the job's own error
        except ray.exceptions.RayActorError as exc:  # the worker died: run its work elsewhere
            self.worker_died(name, kind, what, exc)
            self.show()
            return
        except ray.exceptions.RayTaskError as exc:  # the task raised on its own input: its jobs fail alone
            self.task_failed(kind, what, exc)
        else:
            if kind == "calibrate":
                self.calibration_done(what, ref)
            else:
                self.job_done(ref, what, value)
        self.executor.status[name]["job"] = "idle"
        self.idle.append(name)
        self.show()

    def job_done(self, ref, job, value) -> None:
        row, estimates = value
        self.round_trips[job.label] = time.perf_counter() - self.sent.pop(ref)
        self.n_done += 1
        self.finished(row, estimates)

    def calibration_done(self, key: tuple, ref) -> None:
        self.calibrated[key] = ref  # stays in the object store while referenced; workers fetch it once
        for job in self.groups[key]:
            heapq.heappush(self.ready, (job.index, job))

    def task_failed(self, kind: str, what, exc) -> None:
        message = _first_line(exc)
        self.fail(self.jobs_of(kind, what), message if kind == "job" else f"calibration failed: {message}")
        if kind == "calibrate":
            self.groups.pop(what)

    def worker_died(self, name: str, kind: str, what, exc) -> None:
        """Forget the dead worker, queue its task again (or fail its jobs after ``retries``) and start a replacement."""
        del self.workers[name]
        self.executor.status.pop(name, None)
        self.retry(kind, what, exc)
        self.replace_worker()

    def retry(self, kind: str, what, exc) -> None:
        tag = what if kind == "calibrate" else what.index
        self.attempts[tag] = tries = self.attempts.get(tag, 0) + 1
        if tries > self.executor.retries:
            self.fail(
                self.jobs_of(kind, what), f"WorkerDied: a worker died {tries} times running this job ({type(exc).__name__})"
            )
            return
        self.stats["retries"] += 1
        if kind == "calibrate":
            self.to_calibrate.insert(0, what)
        else:
            heapq.heappush(self.ready, (what.index, what))

    def replace_worker(self) -> None:
        """Start a new worker while replacements are left (workers × (retries + 1) in all); none left and none alive: stop."""
        executor = self.executor
        if self.replacements < executor.workers * (executor.retries + 1):
            self.replacements += 1
            new = f"w{executor.workers + self.replacements - 1}"
            self.workers[new] = self.start_worker(new)
            self.stats["workers"] += 1
            executor._await_ready({new: self.workers[new]})
            self.idle.append(new)
        elif not self.workers:
            raise ClusterError("Every Ray worker died; the finished rows are kept, resume when the cluster is back.")

    # --- rows and progress ---------------------------------------------------------------------

    def jobs_of(self, kind: str, what) -> list:
        """The jobs a task stands for: its calibration key's group, or the job itself."""
        return self.groups[what] if kind == "calibrate" else [what]

    def fail(self, jobs: list, message: str) -> None:
        for job in jobs:
            self.finished(_error_row(self.spec, job, message), None)
            self.n_done += 1

    def show(self) -> None:
        """Report the rows done and each live worker's status to ``progress``."""
        if self.progress is None:
            return
        total = len(self.jobs)
        parts = [f"{w} {s['job']}" for w, s in sorted(self.executor.status.items()) if w in self.workers]
        self.progress(self.n_done, total, f"{self.n_done}/{total} rows · " + " | ".join(parts))
