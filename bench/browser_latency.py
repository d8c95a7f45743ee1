"""What a user waits for, measured in Debian's Chromium against ``streamlit run app.py`` (issue 11).

    python -m bench.browser_latency [--length 64] [--moves 16] [--payload-steps 256]   # from the repository root

Prints, on the built-in tiny-dlm, with the view's layer x head grid shown (issue 18): cold load of the
first page; Generate -> first drawn view against the generation itself (the seconds the app reports for
it, same click; the view is timed in the page: from the click event to the end of the view's first draw, both
stamped by the browser, as Playwright's polling sees it up to a second late); the explorer's step-change latency (key press on the view's slider -> redrawn canvas,
measured in the page: from the keydown event to the next animation frame after the redraw) against a
Streamlit rerun of the same page (changing the colour range reruns the script and rebuilds the view from
the stored run, no model: what a step cost when stepping was server-side); Play frames per second against
the rate it is set to (1000 / frame_ms); the view's payload for a long run; and a one-point sparsity sweep
on the Compare page end to end.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import time

from tests.conftest import launch_chromium, start_app, stop_app

# In the view's frame: time from a key press on the slider to the first animation frame after the redraw.
STEP_TIMER = """() => ({done: new Promise(resolve => {
  let t0 = null;
  document.addEventListener('keydown', () => { t0 = performance.now(); }, {capture: true, once: true});
  document.addEventListener('sinkscope:drawn', () => requestAnimationFrame(() => resolve(performance.now() - t0)), {once: true});
})})"""
# In the app's page: the epoch time of the next click (the view's page stamps its first draw in the same clock).
CLICK_TIMER = """() => document.addEventListener('click', () => { window.clickedAt = performance.timeOrigin + performance.now(); },
  {capture: true, once: true})"""
PLAY_TIMER = """(ms) => ({done: new Promise(resolve => {
  const times = [];
  const on = () => times.push(performance.now());
  document.addEventListener('sinkscope:drawn', on);
  setTimeout(() => { document.removeEventListener('sinkscope:drawn', on); resolve(times); }, ms);
})})"""


def idle(page) -> None:
    """Wait until the app's script run has ended (Streamlit's running indicator is gone)."""
    page.wait_for_timeout(300)
    page.locator("[data-testid='stStatusWidget']").wait_for(state="hidden")


def set_number(page, label: str, value: str) -> None:
    """Type into a number input outside a form, wait for the rerun it causes, and type again if a late
    rerun put the old value back (as tests/test_browser_pages.py does)."""
    box = page.get_by_role("spinbutton", name=label)
    for _ in range(4):
        box.fill(value)
        box.press("Tab")
        idle(page)
        page.wait_for_timeout(500)
        idle(page)
        if box.input_value() == value:
            return
    raise RuntimeError(f"{label!r} did not keep the value {value!r}")


def note(text: str) -> None:
    print(f"... {text}", file=sys.stderr, flush=True)


def payload(steps: int) -> tuple[int, int]:
    """(bytes of the view's page, head grid included, bytes of the float32 mass it is drawn from) for a ``steps``-step run."""
    import torch

    from sap_core import animation
    from sap_core.attention import AttentionRecorder
    from sap_core.decoding import DecodeSpec
    from sap_core.diffusion import generate
    from sap_core.models import load_model
    from sap_core.sink_report import analyze
    from sap_core.sinks import SinkSpec

    torch.set_num_threads(1)
    handle = load_model("tiny-dlm", device="cpu")
    traj = generate(handle, "ROMEO.\n", DecodeSpec(steps, steps, 32, "low_confidence", 0.8, 0.0, 0), recorder=AttentionRecorder())
    report = analyze(traj, SinkSpec(tau=0.05))
    page = animation.explorer_html(report, animation.readable_tokens(handle.decode, traj.final_tokens), head_mass=traj.mass)
    return len(page.encode()), int(traj.mass.astype("float32").nbytes)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--length", type=int, default=64, help="generation length = steps of the explorer run (default 64)")
    ap.add_argument("--moves", type=int, default=16, help="slider moves to time (default 16, at least 8)")
    ap.add_argument("--payload-steps", type=int, default=256, help="steps of the run whose payload is reported (default 256)")
    ap.add_argument("--no-sweep", action="store_true", help="skip the Compare-page sweep")
    args = ap.parse_args()
    from playwright.sync_api import expect, sync_playwright

    proc, url = start_app()
    try:
        with sync_playwright() as p:
            browser = launch_chromium(p)
            page = browser.new_page(viewport={"width": 1440, "height": 900})
            page.set_default_timeout(300_000)
            expect.set_options(timeout=300_000)

            t = time.perf_counter()
            page.goto(url)
            expect(page.get_by_text("Active model: tiny-dlm", exact=False)).to_be_visible()
            cold = time.perf_counter() - t
            note(f"cold load {cold:.1f} s")

            page.get_by_test_id("stSidebarNavItems").get_by_role("link", name="Denoising explorer").click()
            page.get_by_role("spinbutton", name="Generation length").fill(str(args.length))
            page.get_by_role("spinbutton", name="Steps", exact=True).fill(str(args.length))
            page.get_by_role("spinbutton", name="Block length").fill(str(args.length))
            page.evaluate(CLICK_TIMER)
            t = time.perf_counter()
            page.get_by_role("button", name="Generate").click()
            view = page.frame_locator("iframe").first
            expect(view.locator("#steplabel")).to_have_text(f"Step 0 of {args.length - 1}")
            seen = time.perf_counter() - t  # when Playwright's polling saw it (up to a second late on a long wait)
            frame = next(f for f in page.frames if f != page.main_frame and f.evaluate("() => !!window.sinkscope"))
            first_view = (frame.evaluate("() => window.sinkscope.timing.drawn") - page.evaluate("() => window.clickedAt")) / 1000
            done = page.get_by_text(f"{args.length} steps in", exact=False).first.text_content()
            generation = float(re.search(r"steps in ([\d.]+) s", done).group(1))  # what the app measured around generate()
            note(f"first view {first_view:.2f} s (Playwright saw it at {seen:.2f} s), generation {generation:.2f} s")
            page.locator("iframe").first.scroll_into_view_if_needed()
            time.sleep(1.0)

            grid = frame.evaluate("() => [window.sinkscope.geometry.grid, window.sinkscope.layers, window.sinkscope.heads]")
            assert grid[0], "the head grid is not shown"
            slider = view.locator("#step")
            slider.focus()
            steps = []
            for i in range(max(args.moves, 8)):
                timer = frame.evaluate_handle(STEP_TIMER)
                slider.press("ArrowRight" if i % 4 != 3 else "ArrowLeft")
                steps.append(frame.evaluate("t => t.done", timer))
            note(f"step changes {steps}")
            slider.press("Home")
            timer = frame.evaluate_handle(PLAY_TIMER, 2000)
            view.locator("#play").click()
            times = frame.evaluate("t => t.done", timer)
            view.locator("#play").click()
            fps = (len(times) - 1) / ((times[-1] - times[0]) / 1000) if len(times) > 1 else 0.0
            nominal = 1000 / frame.evaluate("() => window.sinkscope.frameMs")

            note(f"play {fps:.1f} frames/s")
            reruns = []  # the baseline: a server round trip (Streamlit rerun) to redraw the view
            for option in ["per step (not comparable across steps)", "fixed: 99th percentile of all steps"] * 2:
                t = time.perf_counter()
                page.get_by_text(option).click()
                page.wait_for_function("() => !document.querySelector('[data-testid=\"stStatusWidget\"]')")
                expect(page.frame_locator("iframe").first.locator("#legend")).to_contain_text(option.split(" (")[0])
                expect(page.frame_locator("iframe").first.locator("#steplabel")).to_contain_text(f"of {args.length - 1}")
                reruns.append(1000 * (time.perf_counter() - t))

            note(f"reruns {reruns}")
            sweep = None
            if not args.no_sweep:
                page.get_by_test_id("stSidebarNavItems").get_by_role("link", name="Compare", exact=True).click()
                idle(page)
                set_number(page, "Windows", "1")  # outside the form: each reruns the page
                set_number(page, "Monte Carlo draws", "2")
                page.get_by_role("button", name="Remove wanda").click()  # magnitude at 0.5 only
                page.get_by_role("button", name="Remove 0.3").click()
                t = time.perf_counter()
                page.get_by_role("button", name="Run sweep").click()
                expect(page.get_by_role("button", name="Download sweep (CSV)")).to_be_visible()
                sweep = time.perf_counter() - t
            browser.close()
    finally:
        stop_app(proc)

    view_bytes, mass_bytes = payload(args.payload_steps)
    med, worst = statistics.median(steps), max(steps)
    rerun = statistics.median(reruns)
    print(
        f"tiny-dlm, {args.length} tokens x {args.length} steps, Chromium at 1440x900, "
        f"head grid shown ({grid[1]} layers x {grid[2]} heads)"
    )
    print(f"cold load (first page, model loaded)        {cold:8.2f} s")
    print(
        f"Generate -> first drawn view                {first_view:8.2f} s   = {first_view / generation:.2f}x the generation "
        f"itself ({generation:.2f} s, as the app reports it; Playwright's polling saw the view at {seen:.2f} s)   (target <= 1.5x)"
    )
    print(
        f"step change -> redrawn view ({len(steps)} moves)     median {med:6.1f} ms, max {worst:6.1f} ms   (target <= 50 ms median)"
    )
    print(f"baseline: Streamlit rerun -> redrawn view   median {rerun:6.1f} ms   -> stepping is {rerun / med:.0f}x faster")
    print(
        f"Play                                        {fps:8.1f} frames/s = {fps / nominal:.2f}x its set rate {nominal:.1f}   (target >= 10)"
    )
    print(
        f"view payload, {args.payload_steps} steps                  {view_bytes / 1e6:8.2f} MB   "
        f"(float32 mass of the run: {mass_bytes / 1e6:.1f} MB, {mass_bytes / view_bytes:.0f}x more)"
    )
    if sweep is not None:
        print(f"one-point sweep (Compare page) end to end   {sweep:8.2f} s")


if __name__ == "__main__":
    main()
