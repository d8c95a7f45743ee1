"""Issue 31 in Debian's Chromium: the step the person is on wins whichever way they come back to the explorer
(Back, the sidebar, a reload), Sink stability's downloads are named after the run and carry it, and its metric
labels are not cut at a projector's 1280x720."""

from __future__ import annotations

import json
import time

from conftest import generate_in_browser, needs_chromium, no_streamlit_exception

pytestmark = needs_chromium
N = 64


def settle(page) -> None:
    page.wait_for_function("() => !document.querySelector('[data-testid=\"stStatusWidget\"]')")
    time.sleep(0.7)


def nav(page, name: str) -> None:
    page.locator("[data-testid='stSidebarNav']").get_by_role("link", name=name, exact=True).click()


def test_the_browsers_step_wins_after_back_the_sidebar_and_a_reload(app_url, page):
    """Item 1: step 20, Sink stability, Back: the view shows 20; step 45, then a colour change and Recompute map
    use 45 (not the 20 of the URL Back restored); the sidebar and a reload come back at 45, not 0."""
    from playwright.sync_api import expect

    generate_in_browser(page, app_url, N)
    settle(page)
    view = page.frame_locator("iframe").first
    label = view.locator("#steplabel")

    def go(step: int) -> None:
        view.locator("body").evaluate(f"() => window.sinkscope.draw({step})")
        expect(label).to_have_text(f"Step {step} of {N - 1}")

    go(20)
    nav(page, "Sink stability")
    expect(page.get_by_text("Dominant-sink variance", exact=True)).to_be_visible()
    settle(page)
    page.go_back()
    expect(label).to_have_text(f"Step 20 of {N - 1}")
    settle(page)
    go(45)
    page.get_by_text("per step (not comparable across steps)").click()
    settle(page)
    expect(view.locator("#legend")).to_contain_text("per step")
    expect(label).to_have_text(f"Step 45 of {N - 1}")
    expect(page.locator(".st-key-map_step input")).to_have_value("45")
    page.get_by_role("button", name="Recompute map").click()
    expect(page.get_by_text("Attention map: step 45, layer 0, head 0")).to_be_visible()
    expect(label).to_have_text(f"Step 45 of {N - 1}")
    assert "step=45" in page.url
    page.shot("after-back-1440x900")
    nav(page, "Sink stability")
    expect(page.get_by_text("Dominant-sink variance", exact=True)).to_be_visible()
    nav(page, "Denoising explorer")
    expect(label).to_have_text(f"Step 45 of {N - 1}")
    settle(page)
    page.reload()
    expect(label).to_have_text(f"Step 45 of {N - 1}")
    no_streamlit_exception(page)


def test_stability_downloads_name_the_run_and_labels_fit_1280x720(app_url, page):
    """Items 5 and 8: the positions CSV and the report JSON are named after the run and carry model, prompt and
    settings; at 1280x720 no metric label or value is cut (scrollWidth <= clientWidth)."""
    from playwright.sync_api import expect

    page.set_viewport_size({"width": 1280, "height": 720})
    generate_in_browser(page, app_url, 16)
    settle(page)
    nav(page, "Sink stability")
    expect(page.get_by_text("Dominant-sink variance", exact=True)).to_be_visible()
    settle(page)
    cut = page.evaluate(
        """() => Array.from(document.querySelectorAll('[data-testid="stMetricLabel"] p, [data-testid="stMetricValue"] div'))
                 .filter(e => e.scrollWidth > e.clientWidth + 1).map(e => e.textContent)"""
    )
    assert not cut, cut
    page.shot("stability-1280x720")
    settings = "16tok-16steps-b16-low-confidence-t0.8-cfg0-seed0"
    for button, kind, ext in (
        ("Download positions (CSV)", "sink-positions", "csv"),
        ("Download full report (JSON)", "sink-report", "json"),
    ):
        with page.expect_download() as download:
            page.get_by_role("button", name=button).click()
        assert download.value.suggested_filename == f"{kind}_tiny-dlm_romeo_{settings}.{ext}"
        text = open(download.value.path(), encoding="utf-8").read()
        if ext == "json":
            run = json.loads(text)["run"]
            assert run["model"].startswith("tiny-dlm") and run["prompt"] == "ROMEO.\n" and "16 steps" in run["decoding"]
        else:
            assert text.splitlines()[0].endswith("model,prompt,decoding,sinks") and "tiny-dlm" in text
    page.set_viewport_size({"width": 1440, "height": 900})
    page.shot("stability-1440x900")
    no_streamlit_exception(page)
