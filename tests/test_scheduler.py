"""The scheduler (issue 28 item 1): a batch decodes each request as it runs alone (tokens identical, recorded mass
within 1e-6; on CPU it is in fact bit-identical), the queue's order, places and estimates, Cancel, a left page's
job taken out, one job per session, heavy jobs one at a time."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from sap_core.attention import AttentionRecorder
from sap_core.decoding import DecodeSpec
from sap_core.diffusion import Request, generate, generate_batch
from sap_core.errors import Cancelled, DecodeSpecError, SapError
from sap_core.scheduler import CANCELLED, DONE, Scheduler, scheduler_for

MASS_TOL = 1e-6  # float32 mass; tokens, decoded_at and confidences must be identical


def same_as_alone(handle, request, traj) -> None:
    alone = generate(handle, request.prompt, request.spec, AttentionRecorder() if request.recorder else None)
    np.testing.assert_array_equal(traj.tokens, alone.tokens)
    np.testing.assert_array_equal(traj.final_tokens, alone.final_tokens)
    np.testing.assert_array_equal(traj.decoded_at, alone.decoded_at)
    np.testing.assert_array_equal(traj.confidence, alone.confidence)
    if request.recorder is None:
        assert traj.mass is None and alone.mass is None
    else:
        np.testing.assert_allclose(traj.mass, alone.mass, rtol=0, atol=MASS_TOL)
    assert traj.spec == alone.spec


def test_a_batch_decodes_each_request_as_alone(tiny_dlm, tiny_ar, one_thread):
    """Mixed block lengths, remasking, temperatures, CFG and seeds share a batch (same total length and steps);
    a request of another length, one without capture and a bad one run on their own; a causal model alone."""
    prompt = [5, 6, 7, 8]
    requests = [
        Request(prompt, DecodeSpec(32, 16, 16, temperature=0.8, seed=1), AttentionRecorder()),
        Request([9, 10, 11, 12], DecodeSpec(32, 16, 8, remasking="entropy", temperature=0.5, seed=2), AttentionRecorder()),
        Request(prompt, DecodeSpec(32, 16, 32, cfg_scale=1.5, seed=3), AttentionRecorder()),
        Request(prompt, DecodeSpec(32, 16, 16, remasking="random", temperature=1.0, seed=4), AttentionRecorder()),
        Request([5, 6], DecodeSpec(32, 16, 16, temperature=0.8, seed=5), AttentionRecorder()),  # another length
        Request(prompt, DecodeSpec(32, 16, 16, temperature=0.8, seed=6)),  # no capture
        Request(prompt, DecodeSpec(32, 16, 5)),  # 32 is not divisible by 5
    ]
    out = generate_batch(tiny_dlm, requests)
    assert isinstance(out[-1], DecodeSpecError)
    for request, traj in zip(requests[:-1], out[:-1]):
        same_as_alone(tiny_dlm, request, traj)
    causal = Request(prompt, DecodeSpec(8, seed=7, temperature=0.8), AttentionRecorder())
    same_as_alone(tiny_ar, causal, generate_batch(tiny_ar, [causal])[0])


def test_a_cancelled_row_leaves_the_batch_and_the_others_run_on(tiny_dlm, one_thread):
    def stop_at_3(done, total, message):
        if done == 3:
            raise Cancelled("cancelled")

    keep = Request([5, 6, 7], DecodeSpec(16, 8, 8, temperature=0.7, seed=1), AttentionRecorder())
    out = generate_batch(tiny_dlm, [Request([5, 6, 8], DecodeSpec(16, 8, 8), AttentionRecorder(), stop_at_3), keep])
    assert isinstance(out[0], Cancelled)
    same_as_alone(tiny_dlm, keep, out[1])


class Gate:
    """A heavy job that holds a worker until released, counting how many run at once."""

    def __init__(self):
        self.go, self.started = threading.Event(), threading.Event()
        self.lock, self.now, self.most = threading.Lock(), 0, 0

    def __call__(self, progress):
        with self.lock:
            self.now += 1
            self.most = max(self.most, self.now)
        self.started.set()
        while not self.go.wait(0.01):
            progress(0, 1, "waiting")
        with self.lock:
            self.now -= 1
        return "done"


def test_queue_order_places_cancel_and_batches(tiny_dlm, one_thread):
    queue = Scheduler(tiny_dlm, workers=1)
    gate = Gate()
    blocker = queue.heavy(gate, owner="teacher", label="Pruning")
    assert gate.started.wait(10)
    spec = DecodeSpec(16, 8, 8, temperature=0.8)
    tickets = [
        queue.generate([5, 6, 7], DecodeSpec(16, 8, 8, temperature=0.8, seed=i), AttentionRecorder(), owner=f"s{i}")
        for i in range(4)
    ]
    assert [queue.position(t) for t in tickets] == [1, 2, 3, 4]
    assert queue.status(tickets[2]) == "3 runs ahead of you."  # nothing measured yet: no time
    queue.cancel(tickets[1])  # Cancel (and a page that is left: its finally cancels) takes it out at once
    assert tickets[1].state == CANCELLED and tickets[1].wait(0)
    with pytest.raises(Cancelled):
        tickets[1].outcome()
    assert [queue.position(t) for t in (tickets[0], tickets[2], tickets[3])] == [1, 2, 3]
    with pytest.raises(SapError, match="already have a job in the queue"):
        queue.generate([5, 6, 7], spec, owner="s0")  # one job per session
    with pytest.raises(DecodeSpecError):
        queue.generate([5, 6, 7], DecodeSpec(16, 8, 5), owner="s9")  # a bad spec fails at once, never queued
    gate.go.set()
    for t in (blocker, tickets[0], tickets[2], tickets[3]):
        assert t.wait(60)
    assert blocker.outcome() == "done" and blocker.state == DONE
    assert [t.rows for t in (tickets[0], tickets[2], tickets[3])] == [3, 3, 3]  # the waiting ones: one batch
    for t in (tickets[0], tickets[2], tickets[3]):
        same_as_alone(tiny_dlm, t.request, t.outcome())
    queue.generate([5, 6, 7], spec, owner="s0").wait(60)  # the owner's job ended: a new one is taken


def test_estimate_from_measured_durations(tiny_dlm, one_thread):
    queue = Scheduler(tiny_dlm, workers=1)
    queue.heavy(lambda progress: time.sleep(0.2)).wait(10)  # one heavy job measured
    gate = Gate()
    first = queue.heavy(gate)
    assert gate.started.wait(10)
    waiting = queue.heavy(lambda progress: None)
    seconds = queue.estimate(waiting)
    assert seconds is not None and 0 <= seconds <= 0.3
    assert queue.status(waiting) == "1 run ahead of you, about 1 s."
    gate.go.set()
    assert first.wait(10) and waiting.wait(10)


def test_heavy_jobs_run_one_at_a_time_and_a_cancelled_one_stops(tiny_dlm):
    queue = Scheduler(tiny_dlm, workers=2)
    gates = [Gate(), Gate()]
    counter = {"now": 0, "most": 0}
    lock = threading.Lock()

    def job(gate):
        def work(progress):
            with lock:
                counter["now"] += 1
                counter["most"] = max(counter["most"], counter["now"])
            try:
                return gate(progress)
            finally:
                with lock:
                    counter["now"] -= 1

        return work

    a, b = queue.heavy(job(gates[0])), queue.heavy(job(gates[1]))
    assert gates[0].started.wait(10)
    generation = queue.generate([5, 6, 7], DecodeSpec(16, 8, 8))  # the free worker takes the generation behind b
    assert generation.wait(60) and generation.state == DONE
    assert b.state == "queued" and queue.position(b) == 1
    queue.cancel(a)  # a running heavy job stops at its next progress report
    assert a.wait(10) and a.state == CANCELLED
    assert gates[1].started.wait(10)
    gates[1].go.set()
    assert b.wait(10) and b.outcome() == "done"
    assert counter["most"] == 1


def test_a_failing_job_keeps_the_queue_working(tiny_dlm):
    queue = scheduler_for(tiny_dlm)
    assert scheduler_for(tiny_dlm) is queue  # one per handle

    def broken(progress):
        raise SapError("no")

    t = queue.heavy(broken, owner="x")
    assert t.wait(10)
    with pytest.raises(SapError, match="no"):
        t.outcome()
    assert queue.heavy(lambda progress: 1, owner="x").wait(10)


def test_a_cancelled_job_winding_down_does_not_block_its_sessions_next_one(tiny_dlm, one_thread):
    queue = Scheduler(tiny_dlm, workers=1)
    go, started = threading.Event(), threading.Event()

    def slow(progress):  # reports progress only once released: until then a cancel cannot stop it
        started.set()
        go.wait(10)
        progress(0, 1, "late")
        return "not reached"

    first = queue.heavy(slow, owner="s")
    assert started.wait(10)
    queue.cancel(first)  # running: it stops at its next progress report
    second = queue.heavy(lambda progress: "again", owner="s")  # taken, and queued behind the one winding down
    assert queue.position(second) == 1
    go.set()
    assert first.wait(10) and second.wait(10)
    assert second.outcome() == "again"
    with pytest.raises(Cancelled):
        first.outcome()
