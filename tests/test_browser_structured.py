"""Structured pruning in the app (issue 23), in a real headless Chromium against the session's app server
(``app_url``): the Prune page's heads control for structured methods, a sink_flap variant's summary (channels
removed, fewer parameters, "removed parameters" heatmap), and Compare's tokens/s beside dense's. Screenshots at
1280x720 go to tests/screenshots/test_*-*.png: look at them after changing these pages."""

from __future__ import annotations

import re

from conftest import needs_chromium, no_streamlit_exception
from test_browser_pages import choose, idle

pytestmark = needs_chromium


def shot(page, name: str) -> None:
    """The whole page at a projector's 1280x720 (stretched to the content's height, as Streamlit scrolls inside
    its own container)."""
    page.set_viewport_size({"width": 1280, "height": 720})
    idle(page)
    tall = page.evaluate("() => document.querySelector('[data-testid=stMain]').scrollHeight")
    page.set_viewport_size({"width": 1280, "height": max(720, int(tall) + 40)})
    page.wait_for_timeout(800)
    page.shot(name)


def test_sink_flap_variant_is_smaller_and_compare_shows_its_speed(app_url, page):
    from playwright.sync_api import expect

    page.goto(app_url)
    expect(page.get_by_text("Active model: tiny-dlm", exact=False).first).to_be_visible()
    page.locator("[data-testid='stSidebarNav']").get_by_role("link", name="Prune", exact=True).click()
    choose(page, "Method", "wanda")
    expect(page.get_by_role("spinbutton", name="Heads removed")).to_have_count(0)  # masking methods: no heads
    choose(page, "Method", "sink_flap")
    expect(page.get_by_role("spinbutton", name="Heads removed")).to_be_visible()
    expect(page.get_by_text("Bias compensation", exact=True)).to_be_visible()
    slider = page.get_by_role("slider", name="Sparsity")
    slider.focus()
    for _ in range(4):  # 0.5 → 0.3 in steps of 0.05
        slider.press("ArrowLeft")
    expect(slider).to_have_value("0.3")
    page.get_by_role("spinbutton", name="Calibration samples").fill("2")
    page.get_by_role("spinbutton", name="Calibration length").fill("32")
    page.get_by_role("button", name="Prune", exact=True).click()
    made = page.get_by_text("Made sink_flap 30%", exact=False)
    expect(made).to_be_visible()
    text = made.text_content()
    assert "removed 154 of 512 MLP channels per block" in text, text
    small, dense = (int(x.replace(",", "")) for x in re.search(r"([\d,]+) parameters \(dense ([\d,]+)", text).groups())
    assert 0 < small < dense
    expect(page.get_by_text("Share of removed parameters per block and module")).to_be_visible()
    expect(page.get_by_text("removed parameters (pruned layers)")).to_be_visible()
    shot(page, "prune")
    no_streamlit_exception(page)

    page.locator("[data-testid='stSidebarNav']").get_by_role("link", name="Compare", exact=True).click()
    page.get_by_role("spinbutton", name="Generation length").fill("32")
    page.get_by_role("spinbutton", name="Steps", exact=True).fill("32")
    page.get_by_role("button", name="Compare", exact=True).click()
    expect(page.get_by_text("Final tokens compared with the dense model's")).to_be_visible()
    idle(page)
    expect(page.locator("[data-testid='sinkscope-generation']")).to_have_count(2)
    speeds = page.get_by_text(re.compile(r"[\d.]+ tokens/s"))
    expect(speeds).to_have_count(2)
    heads = [speeds.nth(i).text_content() for i in range(2)]
    assert any("dense" in h for h in heads) and any("sink_flap 30%" in h for h in heads), heads
    shot(page, "compare")
    no_streamlit_exception(page)
