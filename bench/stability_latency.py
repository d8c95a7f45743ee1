"""How long the Sink stability page takes to answer a tau change, measured in Debian's Chromium against
``streamlit run app.py`` (issue 18, item 7).

    python -m bench.stability_latency [--length 64] [--moves 8]   # from the repository root

Generates ``--length`` tokens in as many steps on the built-in tiny-dlm, opens Sink stability and moves
the tau slider one step with the keyboard, ``--moves`` times (right, then left, so tau stays small).
Each time is measured in the page: from the key press to the last change of the page (the last DOM
mutation in the page's main area and the last message from the server, whichever is later; the page counts as settled once
nothing changed for 1.5 s), so it covers the script run, the transfer and the redraw of every figure and
table; and to the moment the per-position figure draws its new "tau = ..." line (the answer a user waits
for). The baseline, measured in the same run and the same way, is a rerun of the same page with
nothing changed (the ``r`` key: Streamlit's "Rerun"), the cost any interaction on this page pays.
"""

from __future__ import annotations

import argparse
import statistics
import sys

from tests.conftest import generate_in_browser, launch_chromium, start_app, stop_app

# Every message from the server and every DOM change, with the time of the last key press.
RECORDER = """
window.__last = 0; window.__key = 0;
const Orig = window.WebSocket;
class Recording extends Orig {
  constructor(...args) { super(...args); this.addEventListener('message', () => { window.__last = performance.now(); }); }
}
window.WebSocket = Recording;
document.addEventListener('keydown', () => { window.__key = performance.now(); window.__last = window.__key; }, true);
window.__want = null; window.__shown = 0;
new MutationObserver((records) => {
  const main = document.querySelector('[data-testid="stMain"]');  // the page itself, not the running indicator
  if (main && records.some(r => main.contains(r.target))) window.__last = performance.now();
  if (window.__want && !window.__shown && main &&
      [...main.querySelectorAll('svg text')].some(t => t.textContent === window.__want)) window.__shown = performance.now();
}).observe(document, {childList: true, subtree: true, characterData: true, attributes: true});
"""
SETTLED = "() => window.__key > 0 && performance.now() - window.__last > 1500"


def note(text: str) -> None:
    print(f"... {text}", file=sys.stderr, flush=True)


def timed(page, press, want: str | None = None) -> tuple[float, float]:
    """Milliseconds from the key press that ``press()`` makes to the page's last change, and to the first
    moment the text ``want`` is drawn in a figure (NaN without ``want``)."""
    page.evaluate("(w) => { window.__key = 0; window.__want = w; window.__shown = 0; }", want)
    press()
    page.wait_for_function(SETTLED, polling=100)
    settled, shown = page.evaluate("() => [window.__last - window.__key, window.__shown ? window.__shown - window.__key : NaN]")
    return settled, shown


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--length", type=int, default=64, help="generation length = steps (default 64, the explorer's)")
    ap.add_argument("--moves", type=int, default=8, help="tau changes and baseline reruns to time (default 8)")
    args = ap.parse_args()
    from playwright.sync_api import expect, sync_playwright

    proc, url = start_app()
    try:
        with sync_playwright() as p:
            browser = launch_chromium(p)
            context = browser.new_context(viewport={"width": 1440, "height": 900})
            context.add_init_script(RECORDER)
            page = context.new_page()
            page.set_default_timeout(60_000)
            expect.set_options(timeout=60_000)
            generate_in_browser(page, url, args.length)
            page.locator("[data-testid='stSidebarNav']").get_by_role("link", name="Sink stability", exact=True).click()
            expect(page.get_by_text("Per-position sink stability", exact=False)).to_be_visible()
            page.wait_for_function(SETTLED.replace("window.__key > 0 && ", ""), polling=100)
            slider = page.get_by_role("slider", name="tau (variance threshold)")
            shown, changes, reruns = [], [], []
            for i in range(args.moves):
                slider.focus()
                tau = "tau = 0.005" if i % 2 == 0 else "tau = 0"  # the per-position figure's tau line
                settled, drawn = timed(page, lambda i=i: slider.press("ArrowRight" if i % 2 == 0 else "ArrowLeft"), tau)
                changes.append(settled)
                shown.append(drawn)
                page.get_by_role("heading", name="Sink stability").click()  # focus off the slider
                reruns.append(timed(page, lambda: page.keyboard.press("r"))[0])
                note(f"tau change: figure redrawn {drawn:.0f} ms, page settled {settled:.0f} ms; rerun {reruns[-1]:.0f} ms")
            browser.close()
    finally:
        stop_app(proc)
    change, drawn, rerun = statistics.median(changes), statistics.median(shown), statistics.median(reruns)
    print(f"tiny-dlm, {args.length} tokens x {args.length} steps, Sink stability in Chromium at 1440x900")
    print(f"tau change -> figure shows the new tau ({len(shown)} moves)  median {drawn:6.0f} ms, max {max(shown):6.0f} ms")
    print(
        f"tau change -> page settled                    median {change:6.0f} ms, max {max(changes):6.0f} ms   (target <= 200 ms)"
    )
    print(
        f"baseline: rerun with nothing changed          median {rerun:6.0f} ms, max {max(reruns):6.0f} ms   "
        f"-> tau change / rerun = {change / rerun:.2f}"
    )


if __name__ == "__main__":
    main()
