"""The model's queue beside other Python work in the same process (issue 28): what the interpreter lock costs it.

    python -m bench.queue_gil [--students 8] [--load 2] [--duty 0.5]     # from the repository root

A server's queue workers share the process with Streamlit's script runs, whose Python holds the interpreter lock
in bursts; a worker needs the lock back after every torch call, and waits up to the switch interval
(``sys.getswitchinterval()``, 5 ms by default) each time another thread holds it. Measured here without browsers:
``--students`` generations of tiny-dlm (64 tokens in 64 steps, capture) submitted 0.2 s apart to a fresh
:class:`~sap_core.scheduler.Scheduler`, (a) alone, (b) beside ``--load`` threads that run pure Python for ``--duty``
of every 10 ms, at each switch interval of ``--intervals``. Prints the last student's wait, submission to
trajectory, and the ratios against (a) measured in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time

from sap_core.attention import AttentionRecorder
from sap_core.decoding import DecodeSpec
from sap_core.models import load_model
from sap_core.scheduler import Scheduler


def crowd(handle, n: int) -> list[float]:
    """``n`` generations submitted 0.2 s apart; seconds from each submission to its trajectory."""
    queue = Scheduler(handle)
    tickets = []
    for i in range(n):
        tickets.append(
            queue.generate("ROMEO.\n", DecodeSpec(64, 64, 64, temperature=0.8, seed=i), AttentionRecorder(), owner=str(i))
        )
        time.sleep(0.2)
    for t in tickets:
        t.wait()
    return [t.finished - t.submitted for t in tickets]


def python_load(threads: int, duty: float, stop: threading.Event) -> list[threading.Thread]:
    """``threads`` threads, each busy in pure Python for ``duty`` of every 10 ms until ``stop``."""

    def work() -> None:
        while not stop.is_set():
            end = time.perf_counter() + 0.01 * duty
            x = 0
            while time.perf_counter() < end:
                x += 1
            time.sleep(0.01 * (1 - duty))

    started = [threading.Thread(target=work, daemon=True) for _ in range(threads)]
    for t in started:
        t.start()
    return started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--students", type=int, default=8)
    ap.add_argument("--load", type=int, default=2, help="threads of pure-Python load (default 2)")
    ap.add_argument("--duty", type=float, default=0.5, help="share of each 10 ms a load thread is busy (default 0.5)")
    ap.add_argument("--intervals", default="5,1,0.5,0.2", help="switch intervals to try beside the load, in ms")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    handle = load_model("tiny-dlm", device="cpu")
    crowd(handle, 2)  # warm-up
    default = sys.getswitchinterval()
    rows: dict[str, list[float]] = {}
    for _ in range(args.repeats):  # interleaved, so a change of load hits every case alike
        cases = [("queue alone", default, 0)] + [
            (f"beside the load, switch interval {ms:g} ms", ms / 1e3, args.load) for ms in map(float, args.intervals.split(","))
        ]
        for label, interval, load in cases:
            sys.setswitchinterval(interval)
            stop = threading.Event()
            workers = python_load(load, args.duty, stop)
            rows.setdefault(label, []).append(max(crowd(handle, args.students)))
            stop.set()
            for w in workers:
                w.join()
            sys.setswitchinterval(default)
    base = statistics.median(rows["queue alone"])
    print(f"{args.students} generations 0.2 s apart; load: {args.load} threads busy {args.duty:.0%} of every 10 ms")
    for label, values in rows.items():
        last = statistics.median(values)
        print(f"{label:48s} last student {last:6.2f} s  ({last / base:.2f}x the queue alone)")


if __name__ == "__main__":
    main()
