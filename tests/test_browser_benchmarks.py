"""The Compare page's Benchmarks section in a real headless Chromium: prune a variant, score the built-in
task for dense + variant (paired table, CSV), then start a long run and Cancel it. Screenshots go to
tests/screenshots/test_benchmarks_section_in_the_browser-*.png."""

from __future__ import annotations

from conftest import needs_chromium, no_streamlit_exception
from test_browser_pages import choose, idle, set_number, tall_shot

pytestmark = needs_chromium


def test_benchmarks_section_in_the_browser(app_url, page):
    from playwright.sync_api import expect

    page.goto(app_url)
    expect(page.get_by_text("Work through the pages in order")).to_be_visible()
    idle(page)
    page.locator("[data-testid='stSidebarNav']").get_by_role("link", name="Prune", exact=True).click()
    choose(page, "Method", "magnitude")
    page.get_by_role("button", name="Prune", exact=True).click()
    expect(page.get_by_text("Made magnitude 50%", exact=False)).to_be_visible()
    page.locator("[data-testid='stSidebarNav']").get_by_role("link", name="Compare", exact=True).click()
    expect(page.get_by_text("Benchmarks", exact=True)).to_be_visible()
    idle(page)
    set_number(page, "Documents", "2")
    set_number(page, "mc_num", "4")
    expect(page.get_by_text("= 16 forward passes", exact=False)).to_be_visible()
    page.get_by_role("button", name="Score benchmarks").click()
    expect(page.get_by_text("From the last run: sinkscope_nextline, 2 documents, mc_num 4", exact=False)).to_be_visible()
    expect(page.get_by_role("button", name="Download benchmarks (CSV)")).to_be_visible()
    expect(page.get_by_role("button", name="Cancel").last).to_be_disabled()
    tall_shot(page, "1-scored")
    no_streamlit_exception(page)

    set_number(page, "Documents", "400")
    set_number(page, "mc_num", "256")
    expect(page.get_by_role("button", name="Score benchmarks")).to_be_disabled()  # needs the confirmation first
    page.get_by_text("Run it anyway", exact=False).click()
    idle(page)
    page.get_by_role("button", name="Score benchmarks").click()
    expect(page.get_by_text("Scoring: dense", exact=False)).to_be_visible()
    page.get_by_role("button", name="Cancel").last.click()
    expect(page.get_by_text("Benchmark run cancelled", exact=False)).to_be_visible()
    expect(page.get_by_text("From the last run: sinkscope_nextline, 2 documents", exact=False)).to_be_visible()
    tall_shot(page, "2-cancelled")
    no_streamlit_exception(page)
