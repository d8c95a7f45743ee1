"""AR vs DLM's "What if the sinks are removed?" (issue 30) in Debian's Chromium: the explorer's prompt decoded by the
DLM and its AR twin, plain and ablated (four texts), and the paired change of perplexity, its settings and cost
said before the run. Screenshot: tests/screenshots/test_ablation_section-*.png; look at it."""

from __future__ import annotations

from conftest import generate_in_browser, needs_chromium, no_streamlit_exception
from test_browser_pages import idle

N = 16


@needs_chromium
def test_ablation_section(app_url, page):
    from playwright.sync_api import expect

    generate_in_browser(page, app_url, N)
    page.locator("[data-testid='stSidebarNav']").get_by_role("link", name="AR vs DLM", exact=True).click()
    idle(page)
    expect(page.get_by_text("What if the sinks are removed?")).to_be_visible()
    expect(page.get_by_text("perplexity on 4 windows of", exact=False)).to_be_visible()  # the settings, before the run
    expect(page.get_by_text("Cost: 4 generations", exact=False)).to_be_visible()
    page.get_by_role("button", name="Run the other model on this prompt").click()  # loads the AR twin: the cost is timed
    expect(page.get_by_text("forward passes; about", exact=False).last).to_be_visible()
    page.get_by_role("button", name="Run with and without the sinks").click()
    for model in ("DLM", "AR"):
        for shown in ("plain", "sinks ablated"):
            expect(page.get_by_text(f"{model}, {shown}", exact=False).first).to_be_visible()
    table = page.locator("[data-testid='stDataFrame']").last
    expect(table).to_be_visible()
    expect(page.get_by_text("windows, both models, plain and ablated", exact=False)).to_be_visible()
    assert page.locator("[data-testid='stCode']").count() >= 4
    idle(page)
    no_streamlit_exception(page)
    page.get_by_text("What if the sinks are removed?").scroll_into_view_if_needed()
    page.shot("four-outputs")
    table.scroll_into_view_if_needed()
    page.shot("delta-table")
