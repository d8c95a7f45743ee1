"""End to end in a real headless Chromium (Debian's), driven by Playwright: load the app on the
built-in DLM, run a generation, move the timestep slider, and check that the heatmap changes."""
from __future__ import annotations

import time

from conftest import needs_chromium, no_streamlit_exception

pytestmark = needs_chromium


def test_generate_and_step_through_in_a_browser(app_url, page):
    from playwright.sync_api import expect

    page.goto(app_url)
    expect(page.get_by_text("Active model: tiny-dlm", exact=False)).to_be_visible()
    page.shot("1-model")
    page.get_by_role("link", name="Denoising explorer").click()
    page.get_by_role("spinbutton", name="Generation length").fill("16")
    page.get_by_role("spinbutton", name="Steps", exact=True).fill("16")
    page.get_by_role("button", name="Generate").click()
    expect(page.get_by_text("16 steps in", exact=False)).to_be_visible()
    expect(page.get_by_text("Attention mass received per layer at step 0")).to_be_visible()
    before = page.locator("[data-testid='stPlotlyChart']").nth(1).screenshot()
    page.shot("2-explorer-step0")
    slider = page.get_by_role("slider").nth(1)  # the first is the temperature, inside the form
    slider.focus()
    for _ in range(5):
        slider.press("ArrowRight")
    expect(page.get_by_text("Attention mass received per layer at step 5")).to_be_visible()
    time.sleep(1.0)  # let plotly finish drawing
    after = page.locator("[data-testid='stPlotlyChart']").nth(1).screenshot()
    page.shot("3-explorer-step5")
    assert before != after
    no_streamlit_exception(page)
