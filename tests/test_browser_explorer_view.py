"""Issue 31 in Debian's Chromium, the explorer's view without fullscreen: at a projector's 1280x720 a long run's
head rows stay readable (item 8), the head grid's hover names a still-masked position "masked" (item 6), and the
view's own Save HTML writes the export at the step on screen (item 5)."""

from __future__ import annotations

import json
import re
import time

from conftest import SCREENSHOTS, generate_in_browser, needs_chromium, no_streamlit_exception

pytestmark = needs_chromium
N = 208  # positions generated, a multiple of the block length (16); the prompt adds a few: a long run


def settle(page) -> None:
    page.wait_for_function("() => !document.querySelector('[data-testid=\"stStatusWidget\"]')")
    time.sleep(0.7)


def test_head_rows_readable_masked_hover_and_save_html_at_the_step_on_screen(app_url, page, tmp_path):
    from playwright.sync_api import expect

    page.set_viewport_size({"width": 1280, "height": 720})
    generate_in_browser(page, app_url, N)
    settle(page)
    view = page.frame_locator("iframe").first
    body = view.locator("body")
    expect(view.locator("#steplabel")).to_have_text(f"Step 0 of {N - 1}")

    # item 8: every head row at least 14 px tall in the drawn canvas, the grid whole on the canvas (the frame scrolls)
    g = body.evaluate(
        "() => { const s = window.sinkscope, G = s.geometry, c = document.getElementById('view');"
        " return {thumbH: G.thumbH, rows: s.layers, heads: s.heads, length: s.length, gridEnd: G.gridY + G.gridH,"
        " canvasH: parseFloat(c.style.height), grid: G.grid}; }"
    )
    assert g["grid"] and g["rows"] >= 6 and g["length"] > N and g["thumbH"] >= 14, g
    assert g["gridEnd"] <= g["canvasH"] + 0.5, g
    page.shot("start-1280x720")
    view.locator("#view").scroll_into_view_if_needed()
    body.evaluate("() => window.scrollTo(0, document.body.scrollHeight)")
    page.shot("grid-1280x720")

    # item 6: at step 0 every generated position is masked: the head grid's hover says so, not its final token
    tip = body.evaluate(
        "() => { const s = window.sinkscope, G = s.geometry, c = document.getElementById('view'), r = c.getBoundingClientRect();"
        " s.draw(0); const j = s.length - 1, x = G.left + (j + 0.5) / s.length * G.thumbW,"
        " y = G.gridY + G.gridTop + G.thumbH / 2;"  # the top row (the last layer), head 0, the last position
        " c.dispatchEvent(new MouseEvent('mousemove', {clientX: r.left + x, clientY: r.top + y, bubbles: true}));"
        " const t = document.getElementById('tip'); return {text: t.textContent, shown: t.style.display, state: s.stateAt(0, j)}; }"
    )
    assert tip["shown"] == "block" and tip["state"] == "masked", tip
    named = re.search(r"head 0 at step 0: position (\d+) (masked|'.*') receives", tip["text"])
    assert named and named.group(2) == "masked", tip  # (the hover's position is the one under the pointer, near the end)
    assert body.evaluate(f"() => window.sinkscope.stateAt(0, {named.group(1)})") == "masked"

    # item 5: the view's Save HTML writes the page at the step on screen; the file opens there, standalone
    body.evaluate("() => window.sinkscope.draw(137)")
    expect(view.locator("#steplabel")).to_have_text(f"Step 137 of {N - 1}")
    with page.expect_download() as info:
        view.locator("#save").click()
    download = info.value
    assert download.suggested_filename.startswith("sinks") and download.suggested_filename.endswith(".html")
    path = tmp_path / download.suggested_filename
    download.save_as(path)
    text = path.read_text(encoding="utf-8")
    line = next(li for li in text.splitlines() if li.startswith("const D = "))
    data = json.loads(line[len("const D = ") : -1])
    assert data["start"] == 137 and data["save"] is None and data["step_box"] is None and data["step_key"] is None
    assert any(k == "View" and "opens at step 137" in v for k, v in data["about"])
    assert any(k == "Model" for k, _ in data["about"]), data["about"]
    saved = page.context.new_page()
    saved.goto(path.as_uri())
    expect(saved.locator("#steplabel")).to_have_text(f"Step 137 of {N - 1}")
    expect(saved.locator("#about")).to_contain_text("opens at step 137")
    assert saved.locator("#view").get_attribute("data-step") == "137" and not saved.locator("#save").is_visible()
    saved.set_viewport_size({"width": 1280, "height": 720})
    saved.screenshot(
        path=str(SCREENSHOTS / "test_head_rows_readable_masked_hover_and_save_html-saved-1280x720.png"), full_page=True
    )
    saved.close()

    page.set_viewport_size({"width": 1440, "height": 900})
    settle(page)
    assert body.evaluate("() => window.sinkscope.geometry.thumbH") >= 14
    page.shot("1440x900")
    no_streamlit_exception(page)
