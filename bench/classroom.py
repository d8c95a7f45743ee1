"""A class on one server (issue 28 item 5): N students click Generate within a second, in Debian's Chromium.

    python -m bench.classroom [--students 8] [--length 64]     # from the repository root

Starts ``streamlit run app.py`` (tiny-dlm), opens one Chromium session per student on the explorer with its
default settings, and measures: one student alone (after a warm-up run by another session), then the N students
clicking Generate one after another as fast as Playwright can (the spread is printed), then a late arrival who
opens the explorer during the rush. Per student: the app's own generation time ("N steps in X s after Y s in the
queue": from the click's run to the trajectory, X + Y) and click -> drawn view (stamped in the page: the click event and the
view's first draw), and whether the page told the student their place while waiting ("... ahead of you" or "Your
run is next"). The browsers share this machine's cores with the server, so the crowd's figures include the
clients' own work. Targets (tiny-dlm, 8 students): every student served with no exception box, median click ->
view <= 4x alone, last <= 5x, the late arrival's first paint <= 3 s, every waiting student told their place.

Where the crowd's time goes, from the same run: the CPU seconds the server and the Chromium clients used from the
first click to the last drawn view (against 2 x that wall time, what two cores can give), and the floor the model
work sets, with no browser and no Streamlit at all: the same N generations submitted to the model's queue
(:class:`sap_core.scheduler.Scheduler`) in this process at the clicks' spacing, against one alone.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import time

from tests.conftest import launch_chromium, start_app, stop_app

WAIT_MS = 600_000  # every wait of a page, in ms: a crowd on two cores is slow
CLICK_TIMER = """() => document.addEventListener('click', () => { window.clickedAt = performance.timeOrigin + performance.now(); },
  {capture: true, once: true})"""
# Whether the page ever said the student's place while waiting (checked every 50 ms until the run is drawn).
PLACE_WATCH = """() => { window.toldPlace = false; window.placeWatch = setInterval(() => {
  if (/ahead of you|Your run is next/.test(document.body.innerText)) { window.toldPlace = true; } }, 50); }"""


def cpu_seconds() -> dict[str, float]:
    """CPU seconds used so far by the Streamlit server and by the Chromium processes (from /proc)."""
    used = {"server": 0.0, "chromium": 0.0}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read(400)
            fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        except OSError:  # ended meanwhile
            continue
        who = "server" if b"streamlit" in cmd else "chromium" if b"chrom" in cmd else None
        if who:
            used[who] += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return used


def queue_floor(n: int, gap: float, length: int) -> tuple[float, list[float]]:
    """One generation alone, then ``n`` submitted ``gap`` s apart, through a fresh queue of tiny-dlm in this
    process (no browser, no Streamlit): seconds from submission to the trajectory, alone and for each."""
    from sap_core.attention import AttentionRecorder
    from sap_core.decoding import DecodeSpec
    from sap_core.models import load_model
    from sap_core.scheduler import Scheduler

    handle = load_model("tiny-dlm", device="cpu")
    queue = Scheduler(handle)  # holds the handle weakly: ``handle`` keeps it

    def submit(i: int):
        return queue.generate(
            "ROMEO.\n", DecodeSpec(length, length, length, temperature=0.8, seed=i), AttentionRecorder(), owner=str(i)
        )

    for ticket in (submit(0), submit(1)):  # warm-up
        ticket.wait()
    alone = submit(0)
    alone.wait()
    tickets = []
    for i in range(n):
        tickets.append(submit(i))
        time.sleep(gap)
    for t in tickets:
        t.wait()
    return alone.finished - alone.submitted, [t.finished - t.submitted for t in tickets]


def note(text: str) -> None:
    print(f"... {text}", file=sys.stderr, flush=True)


def open_explorer(browser, url: str, length: int):
    from playwright.sync_api import expect

    page = browser.new_context(viewport={"width": 1280, "height": 800}).new_page()
    page.set_default_timeout(WAIT_MS)
    page.goto(url)
    expect(page.get_by_text("Active model:", exact=False).first).to_be_visible(timeout=WAIT_MS)
    page.get_by_test_id("stSidebarNavItems").get_by_role("link", name="Denoising explorer").click()
    expect(page.get_by_role("button", name="Generate")).to_be_visible(timeout=WAIT_MS)
    if length != 64:
        page.get_by_role("spinbutton", name="Generation length").fill(str(length))
        page.get_by_role("spinbutton", name="Steps", exact=True).fill(str(length))
    return page


def click(page) -> None:
    page.evaluate(CLICK_TIMER)
    page.evaluate(PLACE_WATCH)
    page.get_by_role("button", name="Generate").click(no_wait_after=True)


def result(page, length: int) -> dict:
    """The app's generation time, click -> drawn view, told place, exception box: once the run is drawn."""
    from playwright.sync_api import expect

    expect(page.frame_locator("iframe").first.locator("#steplabel")).to_have_text(f"Step 0 of {length - 1}", timeout=WAIT_MS)
    done = page.get_by_text(f"{length} steps in", exact=False).first.text_content()
    frame = next(f for f in page.frames if f != page.main_frame and f.evaluate("() => !!window.sinkscope"))
    view = (frame.evaluate("() => window.sinkscope.timing.drawn") - page.evaluate("() => window.clickedAt")) / 1000
    return {
        "generation": sum(float(x) for x in re.findall(r"(?:steps in|after) ([\d.]+) s", done)),  # queue wait included
        "view": view,
        "told": page.evaluate("() => { clearInterval(window.placeWatch); return window.toldPlace; }"),
        "exception": page.locator("[data-testid='stException']").count() > 0,
    }


def main() -> None:
    from playwright.sync_api import expect, sync_playwright

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--students", type=int, default=8, help="students clicking at once (default 8)")
    ap.add_argument("--length", type=int, default=64, help="generation length = steps (default 64, the explorer's)")
    args = ap.parse_args()

    proc, url = start_app()
    try:
        with sync_playwright() as p:
            browser = launch_chromium(p)
            note("warm-up run (loads the model)")
            warm = open_explorer(browser, url, args.length)
            click(warm)
            result(warm, args.length)
            alone_page = open_explorer(browser, url, args.length)
            note(f"opening {args.students} students")
            students = []
            for i in range(args.students):
                students.append(open_explorer(browser, url, args.length))
                note(f"student {i + 1} has the explorer open")
            click(alone_page)
            alone = result(alone_page, args.length)
            note(f"alone: generation {alone['generation']:.2f} s, click -> view {alone['view']:.2f} s")

            cpu0 = cpu_seconds()
            t0 = time.perf_counter()
            for page in students:
                click(page)
            spread = time.perf_counter() - t0
            late = browser.new_context(viewport={"width": 1280, "height": 800}).new_page()
            t = time.perf_counter()
            late.goto(url + "/explorer")
            expect(late.get_by_role("heading", name="Denoising explorer")).to_be_visible(timeout=WAIT_MS)
            late_paint = time.perf_counter() - t
            crowd = [result(page, args.length) for page in students]
            wall, cpu1 = time.perf_counter() - t0, cpu_seconds()
            late_exception = late.locator("[data-testid='stException']").count() > 0
            browser.close()
    finally:
        stop_app(proc)
    note("the queue alone: the same generations in this process, no browser")
    floor_alone, floor = queue_floor(args.students, spread / max(1, args.students - 1), args.length)

    views = sorted(r["view"] for r in crowd)
    gens = sorted(r["generation"] for r in crowd)
    print(f"{args.students} students, tiny-dlm, {args.length} tokens in {args.length} steps; clicks spread over {spread:.2f} s")
    print("(the Chromium clients share this machine's cores with the server)")
    print(f"alone: the app's generation {alone['generation']:.2f} s, click -> drawn view {alone['view']:.2f} s")
    for i, r in enumerate(crowd):
        print(
            f"student {i + 1:2d}: generation {r['generation']:6.2f} s  view {r['view']:6.2f} s  "
            f"told place: {'yes' if r['told'] else 'no '}  exception: {'YES' if r['exception'] else 'no'}"
        )
    median, last = statistics.median(views), views[-1]
    print(
        f"crowd: generation median {statistics.median(gens):.2f} s / last {gens[-1]:.2f} s; click -> view median "
        f"{median:.2f} s ({median / alone['view']:.1f}x alone) / last {last:.2f} s ({last / alone['view']:.1f}x alone)"
    )
    print(f"late arrival's first paint: {late_paint:.2f} s (exception: {'YES' if late_exception else 'no'})")
    print(f"told their place: {sum(r['told'] for r in crowd)} of {len(crowd)}; served: {len(crowd)} of {args.students}")
    used = {k: cpu1[k] - cpu0[k] for k in cpu0}
    print(
        f"first click -> last view {wall:.1f} s: the server used {used['server']:.1f} CPU-s, the Chromium clients "
        f"{used['chromium']:.1f} CPU-s, of the {2 * wall:.1f} two cores give ({os.cpu_count()} here)"
    )
    print(
        f"the queue alone (no browser, no Streamlit, same spacing): one alone {floor_alone:.2f} s; the {args.students}: "
        f"median {statistics.median(floor):.2f} s ({statistics.median(floor) / floor_alone:.1f}x) / last {max(floor):.2f} s "
        f"({max(floor) / floor_alone:.1f}x)"
    )


if __name__ == "__main__":
    main()
