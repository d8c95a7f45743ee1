"""The landing, Sink stability, Prune and Compare pages in a real headless Chromium (Debian's), driven
by Playwright: one browser session walks the whole workflow (generate, re-score, prune, compare,
perplexity, a one-point sweep) and fails on any Streamlit exception. Screenshots go to
tests/screenshots/test_workflow_through_every_page-*.png: look at them after changing a page."""

from __future__ import annotations

from conftest import idle, needs_chromium, no_streamlit_exception

pytestmark = needs_chromium


def set_number(page, label: str, value: str) -> None:
    """Type into a number input outside a form and wait for the rerun it causes. Under load the rerun
    started by the previous input can end after this one was typed and redraw it with its old value (seen
    in CI: "2 windows x 8 draws" after typing 2 draws), so the value is checked after the app is idle and
    typed again if it was lost."""
    box = page.get_by_role("spinbutton", name=label)
    for _ in range(4):
        box.fill(value)
        box.press("Tab")
        idle(page)
        page.wait_for_timeout(500)  # a rerun that had not started within idle()'s wait has now
        idle(page)
        if box.input_value() == value:
            return
    raise AssertionError(f"{label!r} did not keep the value {value!r}: it shows {box.input_value()!r}")


def tall_shot(page, name: str) -> None:
    """A screenshot of the whole page: Streamlit scrolls inside its own container, so the viewport is
    stretched to the content's height for the shot and put back afterwards. Waits for the script run to end."""
    idle(page)
    height = page.evaluate("() => document.querySelector('[data-testid=stMain]').scrollHeight")
    page.set_viewport_size({"width": 1440, "height": max(900, int(height) + 40)})
    page.wait_for_timeout(800)
    page.shot(name)
    page.set_viewport_size({"width": 1440, "height": 900})


def choose(page, label: str, option: str) -> None:
    """Pick ``option`` in the selectbox labelled ``label``."""
    page.get_by_role("combobox", name=label).click()
    page.get_by_role("option", name=option, exact=True).click()
    idle(page)


def test_workflow_through_every_page(app_url, page):
    from playwright.sync_api import expect

    page.goto(app_url)
    expect(page.get_by_text("Work through the pages in order")).to_be_visible()
    expect(page.get_by_text("Active model: tiny-dlm", exact=False)).to_be_visible()
    tall_shot(page, "1-landing")
    no_streamlit_exception(page)

    # the landing page's first link leads to the explorer; generate there
    page.get_by_role("link", name="1 · Generate a text", exact=False).click()
    page.get_by_role("spinbutton", name="Generation length").fill("16")
    page.get_by_role("spinbutton", name="Steps", exact=True).fill("16")
    page.get_by_role("button", name="Generate").click()
    expect(page.get_by_text("16 steps in", exact=False)).to_be_visible()

    page.locator("[data-testid='stSidebarNav']").get_by_role("link", name="Sink stability", exact=True).click()
    expect(page.get_by_text("Re-scoring the run", exact=False)).to_be_visible()
    expect(page.get_by_text("Per-position sink stability", exact=False)).to_be_visible()
    choose(page, "Rule", "leave_one_out")
    expect(page.get_by_role("slider", name="ε (leave-one-out margin)")).to_be_enabled()
    expect(page.get_by_role("slider", name="alpha (sharpness)")).to_be_disabled()
    choose(page, "Rule", "official")
    expect(page.get_by_role("slider", name="ε (leave-one-out margin)")).to_be_disabled()
    page.get_by_text("Per-position table", exact=False).click()
    expect(page.get_by_role("button", name="Download positions (CSV)")).to_be_visible()
    tall_shot(page, "2-stability")
    no_streamlit_exception(page)

    page.locator("[data-testid='stSidebarNav']").get_by_role("link", name="Prune", exact=True).click()
    expect(page.get_by_role("button", name="Cancel")).to_be_disabled()  # nothing runs
    choose(page, "Method", "sparsegpt")  # a long job (128 windows of 256 tokens), cancelled at once
    page.get_by_role("spinbutton", name="Calibration samples").fill("128")
    page.get_by_role("spinbutton", name="Calibration length").fill("256")
    page.get_by_role("spinbutton", name="Calibration length").press("Tab")
    page.get_by_role("button", name="Prune", exact=True).click()
    expect(page.get_by_text("Pruning sparsegpt", exact=False)).to_be_visible()
    page.get_by_role("button", name="Cancel").click()  # waits until it is enabled, i.e. the job runs
    expect(page.get_by_text("Pruning cancelled", exact=False)).to_be_visible()
    expect(page.get_by_text("No variants yet", exact=False)).to_be_visible()
    expect(page.get_by_role("button", name="Cancel")).to_be_disabled()
    choose(page, "Method", "magnitude")
    expect(page.get_by_text("|W|, no data")).to_be_visible()
    page.get_by_role("button", name="Prune", exact=True).click()
    expect(page.get_by_text("Made magnitude 50%", exact=False)).to_be_visible()
    expect(page.get_by_text("Share of zero weights per block and module")).to_be_visible()
    expect(page.get_by_role("button", name="Cancel")).to_be_disabled()
    expect(page.get_by_role("button", name="Save", exact=True)).to_be_visible()
    tall_shot(page, "3-prune")
    no_streamlit_exception(page)

    page.locator("[data-testid='stSidebarNav']").get_by_role("link", name="Compare", exact=True).click()
    page.get_by_role("spinbutton", name="Generation length").fill("16")
    page.get_by_role("spinbutton", name="Steps", exact=True).fill("16")
    page.get_by_role("button", name="Compare", exact=True).click()
    expect(page.get_by_text("Final tokens compared with the dense model's")).to_be_visible()
    idle(page)
    set_number(page, "Windows", "2")
    set_number(page, "Monte Carlo draws", "2")
    page.get_by_role("button", name="Compute perplexity").click()
    expect(page.get_by_text("From the last run: 2 windows × 2 draws", exact=False)).to_be_visible()
    expect(page.get_by_text("noise", exact=False).last).to_be_visible()
    idle(page)
    page.get_by_role("button", name="Remove wanda").click()  # one method at one sparsity (inside a form: no rerun)
    page.get_by_role("button", name="Remove 0.3").click()
    page.get_by_role("button", name="Run sweep").click()
    expect(page.get_by_text("Perplexity after pruning", exact=False)).to_be_visible()
    expect(page.get_by_role("button", name="Download sweep (CSV)")).to_be_visible()
    tall_shot(page, "4-compare")
    no_streamlit_exception(page)


def test_cancel_stops_a_running_tau_sweep(app_url, page):
    """Pick tau's "Which tau?": Cancel is enabled only while a tau sweep runs; clicking it while the first
    pruned variant is being scored (256 evaluation windows a row) stops the sweep, says so, keeps no result,
    and the page checks that the model's weights are exactly those before the sweep (a fingerprint taken
    at the start)."""
    from playwright.sync_api import expect

    page.goto(app_url)
    expect(page.get_by_text("Active model:", exact=False).first).to_be_visible()
    page.locator("[data-testid='stSidebarNav']").get_by_role("link", name="Pick tau", exact=True).click()
    expect(page.get_by_role("button", name="Run the tau sweep")).to_be_visible()
    expect(page.get_by_role("button", name="Cancel")).to_be_disabled()  # nothing runs
    page.get_by_role("spinbutton", name="Evaluation windows").fill("256")  # inside the form: no rerun
    page.get_by_role("button", name="Run the tau sweep").click()
    # the progress bar's text once wanda is pruned and being scored: its variant is swapped into the model
    expect(page.get_by_text("Tau sweep: wanda 50%: evaluate", exact=False)).to_be_visible()
    page.get_by_role("button", name="Cancel").click()
    expect(page.get_by_text("Tau sweep cancelled", exact=False)).to_be_visible()
    expect(page.get_by_text("weights match those before it ran (dense, unchanged)", exact=False)).to_be_visible()
    expect(page.get_by_role("button", name="Cancel")).to_be_disabled()
    expect(page.get_by_text("Tau sweep: ", exact=False)).to_have_count(0)  # the bar is gone
    expect(page.get_by_text("best tau =", exact=False)).to_have_count(0)  # no result
    expect(page.get_by_role("button", name="Download tau sweep (CSV)")).to_have_count(0)
    tall_shot(page, "cancelled")
    no_streamlit_exception(page)


def test_the_first_model_load_is_announced(chromium):
    """A fresh server has no model in memory: the first page says it is loading instead of showing
    grey placeholders without a word, then the model page appears."""
    from conftest import start_app, stop_app
    from playwright.sync_api import expect

    proc, url = start_app()
    try:
        context = chromium.new_context(viewport={"width": 1440, "height": 900})
        # the built-in model loads in well under a second: record the message whenever it appears
        context.add_init_script("""
            window.__loading = [];
            new MutationObserver(() => {
                const t = document.body ? document.body.innerText : "";
                const i = t.indexOf("Loading the model");
                if (i >= 0) window.__loading.push(t.slice(i, i + 60));
            }).observe(document, {childList: true, subtree: true, characterData: true});
        """)
        page = context.new_page()
        page.goto(url)
        expect(page.get_by_text("Active model: tiny-dlm", exact=False)).to_be_visible(timeout=120_000)
        seen = page.evaluate("() => window.__loading")
        assert seen and seen[0].startswith("Loading the model tiny-dlm into memory"), seen
        expect(page.get_by_text("Loading the model", exact=False)).to_have_count(0)  # gone once loaded
        no_streamlit_exception(page)
        context.close()
    finally:
        stop_app(proc)


def test_a_server_started_on_a_model_directory_names_it_in_the_sidebar(chromium, tiny_dlm_dir):
    """SINKSCOPE_MODEL set by the host: the sidebar's first choice names that model, not "Built-in DLM"."""
    from conftest import start_app, stop_app
    from playwright.sync_api import expect

    proc, url = start_app(env={"SINKSCOPE_MODEL": str(tiny_dlm_dir)})
    try:
        page = chromium.new_context(viewport={"width": 1280, "height": 800}).new_page()
        page.goto(url)
        expect(page.get_by_text(f"Active model: {tiny_dlm_dir.name}", exact=False)).to_be_visible(timeout=120_000)
        side = page.get_by_test_id("stSidebar")
        expect(side.get_by_text(f"This server's model ({tiny_dlm_dir.name})")).to_be_visible()
        expect(side.get_by_text("Built-in DLM (tiny-dlm)")).to_have_count(0)
        no_streamlit_exception(page)
    finally:
        stop_app(proc)
