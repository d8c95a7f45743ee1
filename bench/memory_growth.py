"""Resident memory over repeated generations with attention capture, as the app runs them.

    python bench/memory_growth.py                 # SinkScope as shipped (allocator tuned on import)
    python bench/memory_growth.py --untuned       # glibc malloc defaults: the baseline

Loads tiny-dlm, runs ``--warmup`` generations with capture, then ``--runs`` more, each in a fresh
thread (Streamlit runs every rerun of a page in a new script thread), keeping only the latest
trajectory alive (as a page's session state does). Prints the resident set size (RSS, from
/proc/self/statm) after each run, the growth after warm-up, and the capture's own size from
``sap_core.memory.estimate``. Run the two forms one after the other to compare (the allocator is
configured at process start, so each needs its own process); ``--both`` does that in subprocesses and
prints the ratio.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(args) -> float:
    if args.untuned:
        os.environ["SINKSCOPE_MALLOC_DEFAULTS"] = "1"
    import torch

    torch.set_num_threads(1)
    from sap_core.attention import AttentionRecorder
    from sap_core.diffusion import DecodeSpec, generate
    from sap_core.memory import estimate, human
    from sap_core.models import load_model

    handle = load_model("tiny-dlm", device="cpu")
    spec = DecodeSpec(gen_length=args.gen_length, steps=args.steps, block_length=args.gen_length, temperature=0.8)
    prompt = "To be, or not to be, that is the question:"
    length = len(handle.encode(prompt)) + args.gen_length
    print(f"capture record: {human(estimate(handle, length, args.steps).capture_record)} per generation "
          f"(L = {length}, {args.steps} steps)")
    state = {}

    def one(seed: int) -> None:
        state["trajectory"] = generate(handle, prompt, DecodeSpec(**{**spec.__dict__, "seed": seed}),
                                       recorder=AttentionRecorder())

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
    p.add_argument("--untuned", action="store_true", help="glibc malloc defaults (the baseline)")
    p.add_argument("--both", action="store_true", help="run untuned then tuned, each in its own process, and compare")
    args = p.parse_args()
    if not args.both:
        measure(args)
        return
    growth = {}
    for label, extra in (("untuned (glibc defaults)", ["--untuned"]), ("tuned (SinkScope)", [])):
        cmd = [sys.executable, __file__, "--runs", str(args.runs), "--warmup", str(args.warmup),
               "--gen-length", str(args.gen_length), "--steps", str(args.steps), *extra]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        print(f"== {label}\n{out}")
        growth[label] = float(out.rsplit("GROWTH ", 1)[1].split()[0])
    a, b = growth.values()
    print(f"growth untuned {a:.0f} MiB, tuned {b:.0f} MiB; ratio untuned/tuned {a / max(b, 1):.1f}x")


if __name__ == "__main__":
    main()
