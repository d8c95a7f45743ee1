"""Resident memory over repeated generations with attention capture, as the app runs them.

    python bench/memory_growth.py                 # SinkScope as shipped (allocator tuned on import)
    python bench/memory_growth.py --before        # as before the fix: glibc defaults, per-step record kept
    python bench/memory_growth.py --both          # both, each in its own process, and the ratio

Loads tiny-dlm, runs ``--warmup`` generations with capture, then ``--runs`` more, each in a fresh
thread (Streamlit runs every rerun of a page in a new script thread), keeping only the latest
trajectory alive (as a page's session state does). Prints the resident set size (RSS, from
/proc/self/statm) after each run, the growth after warm-up, and the capture's own size from
``sap_core.memory.estimate``.

``--before`` reproduces the memory pattern SinkScope had before the fix: glibc's malloc defaults
(``SINKSCOPE_MALLOC_DEFAULTS=1``) and one small array per step kept alive until the generation ends (the
recorder used to keep every pass and the sampler stacked a list of per-step arrays at the end), interleaved
with the large short-lived attention-score buffers. ``--untuned`` keeps only the malloc defaults. The
allocator is configured at process start, so each form needs its own process; ``--both`` runs
``--before`` and the shipped form in subprocesses and prints the ratio.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(args) -> float:
    if args.untuned or args.before:
        os.environ["SINKSCOPE_MALLOC_DEFAULTS"] = "1"
    import torch

    torch.set_num_threads(1)
    from sap_core.attention import AttentionRecorder
    from sap_core.decoding import DecodeSpec
    from sap_core.diffusion import generate
    from sap_core.memory import estimate, human
    from sap_core.models import load_model

    handle = load_model("tiny-dlm", device="cpu")
    spec = DecodeSpec(gen_length=args.gen_length, steps=args.steps, block_length=args.gen_length, temperature=0.8)
    prompt = "To be, or not to be, that is the question:"
    length = len(handle.encode(prompt)) + args.gen_length
    print(
        f"capture record: {human(estimate(handle, length, args.steps).capture_record)} per generation "
        f"(L = {length}, {args.steps} steps)"
    )
    state = {}

    class KeepingRecorder(AttentionRecorder):
        """The pre-fix pattern: every pass's mass stays allocated until the generation ends."""

        def __init__(self):
            super().__init__()
            self.kept = []

        def end_pass(self):
            out = super().end_pass()
            self.kept.append(out.numpy().copy())
            return out

    def one(seed: int) -> None:
        recorder = KeepingRecorder() if args.before else AttentionRecorder()
        state["trajectory"] = generate(handle, prompt, DecodeSpec(**{**spec.__dict__, "seed": seed}), recorder=recorder)

    def run(seed: int) -> None:
        t = threading.Thread(target=one, args=(seed,))
        t.start()
        t.join()

    for i in range(args.warmup):
        run(i)
    base = rss()
    print(f"after {args.warmup} warm-up generations: RSS {base / 2**20:.0f} MiB")
    peak = base
    for i in range(args.runs):
        run(1000 + i)
        now = rss()
        peak = max(peak, now)
        print(f"  run {i + 1:2d}: RSS {now / 2**20:7.0f} MiB  (growth {(now - base) / 2**20:+6.0f} MiB)", flush=True)
    growth = (rss() - base) / 2**20
    print(f"GROWTH {growth:.0f} MiB over {args.runs} generations (peak {(peak - base) / 2**20:.0f} MiB above warm-up)")
    return growth


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--gen-length", type=int, default=256)
    p.add_argument("--steps", type=int, default=256)
    p.add_argument("--untuned", action="store_true", help="glibc malloc defaults")
    p.add_argument("--before", action="store_true", help="as before the fix: malloc defaults and a per-step record")
    p.add_argument("--both", action="store_true", help="run --before then the shipped form, each in its own process, and compare")
    args = p.parse_args()
    if not args.both:
        measure(args)
        return
    growth = {}
    for label, extra in (("before the fix (--before)", ["--before"]), ("as shipped", [])):
        cmd = [
            sys.executable,
            __file__,
            "--runs",
            str(args.runs),
            "--warmup",
            str(args.warmup),
            "--gen-length",
            str(args.gen_length),
            "--steps",
            str(args.steps),
            *extra,
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        print(f"== {label}\n{out}")
        tail = out.rsplit("GROWTH ", 1)[1]
        growth[label] = (float(tail.split()[0]), float(tail.split("(peak ")[1].split()[0]))
    (a, pa), (b, pb) = growth.values()
    print(
        f"growth after 20 runs: before the fix {a:+.0f} MiB, as shipped {b:+.0f} MiB; peak above warm-up: "
        f"{pa:.0f} MiB vs {pb:.0f} MiB (ratio {pa / max(pb, 1):.1f}x)"
    )


if __name__ == "__main__":
    main()
