"""Issue 31 items 2, 3, 4, 7 and 9 in a real headless Chromium: every long job has its own Cancel (a sweep
cancelled with the dense weights checked), Enter in a box never starts a job, a spec made twice says so,
structured methods show no pattern, AR vs DLM says its settings and cost first, and the words fixed.
Screenshots go to tests/screenshots/test_jobs_cancel_enter_duplicates_and_words-*.png: look at them."""

from __future__ import annotations

from conftest import generate_in_browser, needs_chromium, no_streamlit_exception
from test_browser_pages import choose, idle, set_number, tall_shot

pytestmark = needs_chromium


def nav(page, name: str) -> None:
    page.locator("[data-testid='stSidebarNav']").get_by_role("link", name=name, exact=True).click()
    idle(page)


def test_jobs_cancel_enter_duplicates_and_words(app_url, page):
    from playwright.sync_api import expect

    generate_in_browser(page, app_url, 16)
    expect(page.get_by_text("at most 511: the prompt", exact=False).first).to_be_attached()

    # Sink stability at tau = 0: the spot says which tau shows the stable sinks, and a button sets it
    nav(page, "Sink stability")
    expect(page.get_by_text("“ROMEO.⏎”", exact=False)).to_be_visible()
    stable = page.get_by_role("button", name="See the stable sinks", exact=False)
    expect(stable).to_be_visible()
    tall_shot(page, "1-stability-tau0")
    stable.click()
    idle(page)
    expect(page.get_by_text("Why every sink is unstable here")).to_have_count(0)
    tall_shot(page, "2-stability-split")

    # AR vs DLM: the settings and the estimated time before the run
    nav(page, "AR vs DLM")
    expect(page.get_by_text("Decoding settings", exact=True)).to_be_visible()
    expect(page.get_by_role("spinbutton", name="Prompt length (tokens)")).to_be_visible()
    page.get_by_role("button", name="Run the other model on this prompt").click()  # loads tiny-ar: the estimate follows
    expect(page.get_by_text("AR: Var(dominant position)", exact=True)).to_be_visible()  # ran: not interrupted by the next input
    set_number(page, "Prompts", "3")
    expect(page.get_by_text("forward passes with the attention recorded; about", exact=False)).to_be_visible()
    tall_shot(page, "3-ar-vs-dlm-estimate")
    no_streamlit_exception(page)

    # Prune: a structured method shows no pattern; Enter in "Heads removed" prunes nothing
    nav(page, "Prune")
    choose(page, "Method", "struct_wanda")
    expect(page.get_by_role("combobox", name="Pattern")).to_have_count(0)
    expect(page.get_by_text("structured: whole MLP channels", exact=False)).to_be_visible()
    page.get_by_role("spinbutton", name="Calibration samples").fill("2")
    page.get_by_role("spinbutton", name="Calibration length").fill("32")
    heads = page.get_by_role("spinbutton", name="Heads removed")
    heads.fill("0.25")
    heads.press("Enter")
    idle(page)
    page.wait_for_timeout(1500)
    expect(page.get_by_text("No variants yet", exact=False)).to_be_visible()
    expect(page.get_by_text("Made ", exact=False)).to_have_count(0)
    page.get_by_role("button", name="Prune", exact=True).click()
    expect(page.get_by_text("Made struct_wanda", exact=False)).to_be_visible()
    expect(page.get_by_role("cell", name="structured: MLP channels and attention heads")).to_be_visible()
    # the same spec again: it exists, and the page offers to show it
    page.get_by_role("button", name="Prune", exact=True).click()
    expect(page.get_by_text("has exactly these settings already", exact=False)).to_be_visible()
    show = page.get_by_role("button", name="Show struct_wanda", exact=False)
    expect(show).to_be_visible()
    tall_shot(page, "4-prune-duplicate")
    show.click()
    idle(page)
    expect(page.get_by_text("#2", exact=False)).to_have_count(0)
    choose(page, "Method", "wanda")
    page.get_by_role("button", name="Prune", exact=True).click()
    expect(page.get_by_text("Made wanda", exact=False)).to_be_visible()
    expect(page.get_by_text("down-weighted: wanda weighs every calibration token alike", exact=False)).to_be_visible()
    no_streamlit_exception(page)

    # Compare: the sweep has its own Cancel; cancelled, it keeps nothing and the dense weights are checked
    nav(page, "Compare")
    expect(page.get_by_role("button", name="Cancel", disabled=False)).to_have_count(0)  # nothing runs
    set_number(page, "Windows", "512")
    page.get_by_role("button", name="Run sweep").click()
    expect(page.get_by_text("Sweep: ", exact=False)).to_be_visible()
    page.get_by_role("button", name="Cancel", disabled=False).click()
    expect(page.get_by_text("The sweep cancelled; no result was kept", exact=False)).to_be_visible()
    expect(page.get_by_text("weights match those before it ran (dense, unchanged)", exact=False)).to_be_visible()
    expect(page.get_by_role("button", name="Download sweep (CSV)")).to_have_count(0)
    expect(page.get_by_role("button", name="Cancel", disabled=False)).to_have_count(0)
    tall_shot(page, "5-compare-sweep-cancelled")
    no_streamlit_exception(page)

    # the sidebar: "Local directory" with no path typed does not claim a load
    page.locator("[data-testid='stSidebar']").get_by_text("Local directory").click()
    idle(page)
    expect(page.get_by_text("No directory given yet", exact=False)).to_be_visible()
    expect(page.locator("[data-testid='stSidebar']").get_by_text("Loaded tiny-dlm", exact=False)).to_have_count(0)
    page.shot("6-local-empty")
