"""The app in a classroom (issue 18), in a real headless Chromium driven by Playwright: every URL lands in
the real app (not Streamlit's page-folder mode), a cold start says it is loading, form values survive a
page switch and an interrupted run says so, inputs are bounded by the model, and the guided start links
every page in the story's order. Screenshots: tests/screenshots/test_*-*.png (1440x900 and 1280x720)."""

from __future__ import annotations

from conftest import idle, needs_chromium, no_streamlit_exception, start_app, stop_app

pytestmark = needs_chromium

REAL_PAGES = ("Model", "Denoising explorer", "Sink stability", "AR vs DLM", "Prune", "Pick tau", "Compare")


def assert_real_app(page, header: str) -> None:
    """The page is the st.navigation app: the sidebar has the model picker, device and precision, the
    navigation lists the pages by their titles (folder mode lists file names: "app", "explorer"…), and the
    page's own header is shown with the active model."""
    from playwright.sync_api import expect

    side = page.locator("[data-testid='stSidebar']")
    expect(side.get_by_text("Built-in DLM (tiny-dlm)")).to_be_visible()
    expect(side.get_by_text("Precision")).to_be_visible()
    nav = page.locator("[data-testid='stSidebarNav']")
    for title in REAL_PAGES:
        expect(nav.get_by_role("link", name=title, exact=True)).to_be_visible()
    assert nav.get_by_role("link", name="app", exact=True).count() == 0, "Streamlit's page-folder mode"
    expect(page.locator("[data-testid='stMain']").get_by_role("heading", name=header)).to_be_visible()
    expect(page.get_by_text("Active model: tiny-dlm", exact=False)).to_be_visible()
    no_streamlit_exception(page)


def test_every_url_lands_in_the_app_on_a_fresh_server(chromium):
    """Item 1: a fresh server whose first visitor opens a shared /explorer?step= link before anyone opened /
    and clicks a page while the model loads, and a second visitor on the same link: both get the real app.
    The first paint says the model is loading."""
    from playwright.sync_api import expect

    proc, url = start_app()
    try:
        browser = chromium  # the session's browser (a second sync_playwright in one thread is refused)
        for size in ({"width": 1440, "height": 900}, {"width": 1280, "height": 720}):
            context = browser.new_context(viewport=size)
            page = context.new_page()
            page.set_default_timeout(120_000)
            expect.set_options(timeout=120_000)
            name = f"{size['width']}x{size['height']}"
            if size["width"] == 1440:
                page.goto(url + "/explorer?step=3")  # a shared link, the server's first visitor
                # a cold start: the main area says what it is waiting for, not a blank page, and the
                # navigation is the app's (titles, not file names); a click on it while the model loads
                # lands in the app too
                expect(page.get_by_text("Loading", exact=False).first).to_be_visible()
                page.screenshot(path=str(shot_path(f"cold-start-{name}")))
                nav(page, "Prune")
                assert_real_app(page, "Prune")
            else:
                page.goto(url + "/explorer?step=3")
                assert_real_app(page, "Denoising explorer")
                assert "step=3" in page.url
            idle(page)
            page.screenshot(path=str(shot_path(f"first-url-{name}")))
            context.close()
    finally:
        stop_app(proc)


def shot_path(name: str):
    from conftest import SCREENSHOTS

    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    return SCREENSHOTS / f"test_every_url_lands_in_the_app_on_a_fresh_server-{name}.png"


def nav(page, title: str) -> None:
    page.locator("[data-testid='stSidebarNav']").get_by_role("link", name=title, exact=True).click()


def test_form_values_survive_a_page_switch_and_an_interrupted_run_says_so(app_url, page):
    """Item 3 (across pages): a generation and a prune interrupted by leaving their page say so on return,
    keep their form values and keep nothing from the stopped run (the stored generation stays);
    Enter in AR vs DLM's "Prompts" box does not start the across-prompts run, its button does."""
    from playwright.sync_api import expect

    page.goto(app_url)
    expect(page.get_by_text("Active model: tiny-dlm", exact=False)).to_be_visible()
    nav(page, "Denoising explorer")
    page.get_by_role("spinbutton", name="Generation length").fill("16")
    page.get_by_role("spinbutton", name="Steps", exact=True).fill("16")
    page.get_by_role("spinbutton", name="Seed").fill("3")
    page.get_by_role("button", name="Generate").click()
    expect(page.get_by_text("16 steps in", exact=False)).to_be_visible()
    page.get_by_role("spinbutton", name="Generation length").fill("496")  # a long one, left while it runs
    page.get_by_role("spinbutton", name="Steps", exact=True).fill("496")
    page.get_by_role("button", name="Generate").click()
    expect(page.get_by_text("Generating:", exact=False)).to_be_visible()
    nav(page, "Sink stability")
    expect(page.locator("[data-testid='stMain']").get_by_role("heading", name="Sink stability")).to_be_visible()
    nav(page, "Denoising explorer")
    expect(page.get_by_text("Generation was interrupted by leaving the page", exact=False)).to_be_visible()
    expect(page.get_by_role("spinbutton", name="Generation length")).to_have_value("496")
    expect(page.get_by_role("spinbutton", name="Steps", exact=True)).to_have_value("496")
    expect(page.get_by_role("spinbutton", name="Seed")).to_have_value("3")
    expect(page.get_by_text("prompt “ROMEO.⏎” · 16 tokens", exact=False).first).to_be_visible()  # the stored run is kept

    nav(page, "Prune")
    page.get_by_role("spinbutton", name="Calibration samples").fill("512")
    page.get_by_role("spinbutton", name="Calibration seed").fill("7")
    page.get_by_role("button", name="Prune", exact=True).click()
    expect(page.get_by_text("Pruning sink_wanda", exact=False)).to_be_visible()  # running: leave the page now
    nav(page, "Compare")
    expect(page.locator("[data-testid='stMain']").get_by_role("heading", name="Compare")).to_be_visible()
    idle(page)
    nav(page, "Prune")
    expect(page.get_by_text("Pruning was interrupted by leaving the page", exact=False)).to_be_visible()
    expect(page.get_by_text("No variants yet", exact=False)).to_be_visible()
    expect(page.get_by_role("spinbutton", name="Calibration samples")).to_have_value("512")
    expect(page.get_by_role("spinbutton", name="Calibration seed")).to_have_value("7")
    expect(page.get_by_role("button", name="Cancel")).to_be_disabled()
    idle(page)
    page.shot("1-interrupted-1440x900")
    page.set_viewport_size({"width": 1280, "height": 720})
    page.wait_for_timeout(500)
    page.shot("1-interrupted-1280x720")
    page.set_viewport_size({"width": 1440, "height": 900})
    nav(page, "Compare")
    idle(page)
    nav(page, "Prune")
    idle(page)
    assert page.get_by_text("was interrupted", exact=False).count() == 0, "the notice is shown once"

    nav(page, "AR vs DLM")
    expect(page.get_by_text("Across prompts", exact=True)).to_be_visible()
    idle(page)
    box = page.get_by_role("spinbutton", name="Prompts", exact=True)
    box.fill("2")
    box.press("Enter")
    page.wait_for_timeout(1500)
    idle(page)
    assert page.get_by_text("prompts × 2 models", exact=False).count() == 0, "Enter started the across-prompts run"
    length = page.get_by_role("spinbutton", name="Prompt length (tokens)")
    length.fill("8")
    length.press("Enter")  # commits and reruns (no form here); a click sent during that rerun can be lost
    idle(page)
    page.get_by_role("button", name="Run across prompts").click()
    expect(page.get_by_text("2 prompts × 2 models", exact=False)).to_be_visible()
    no_streamlit_exception(page)


def help_text(page, label: str) -> str:
    """The tooltip of the widget labelled ``label`` (hover its help icon)."""
    page.get_by_role("button", name=f"Help for {label}").first.hover()
    tip = page.locator("[data-testid='stTooltipContent']").last
    tip.wait_for()
    return tip.inner_text()


def test_inputs_are_bounded_by_the_model(app_url, page):
    """Item 7 (outside the explorer): Prune never makes a "0%" variant (the slider starts at 0.05 and says
    why) and its calibration length stops at the model's context; Compare's lengths stop at the context
    less one prompt token, with a help text that says so."""
    from playwright.sync_api import expect

    page.goto(app_url)
    expect(page.get_by_text("Active model: tiny-dlm", exact=False)).to_be_visible()
    nav(page, "Prune")
    slider = page.get_by_role("slider", name="Sparsity")
    expect(slider).to_have_attribute("min", "0.05")
    slider.focus()
    slider.press("Home")
    expect(slider).to_have_value("0.05")
    assert "dense model itself" in help_text(page, "Sparsity")
    expect(page.get_by_role("spinbutton", name="Calibration length")).to_have_attribute("max", "512")
    assert "model's context (512 tokens)" in help_text(page, "Calibration length")
    page.get_by_role("combobox", name="Method").click()
    page.get_by_role("option", name="magnitude", exact=True).click()
    idle(page)
    page.get_by_role("button", name="Prune", exact=True).click()
    expect(page.get_by_text("Made magnitude 5%", exact=False)).to_be_visible()  # the least a variant prunes

    nav(page, "Compare")
    idle(page)  # the page's cost estimate reruns it
    length = page.get_by_role("spinbutton", name="Generation length")
    expect(length).to_have_attribute("max", "511")
    expect(page.get_by_role("spinbutton", name="Steps", exact=True)).to_have_attribute("max", "511")
    expect(page.get_by_text("share the model's context of 512 tokens", exact=False).first).to_be_visible()  # the reason, shown
    length.fill("100000")  # typed past the bound: the box says the range (the caption and its help say why)
    length.press("Tab")
    alert = page.locator("[data-testid='stNumberInput']").first.get_by_role("alert")
    expect(alert).to_contain_text("between 1 and 511")
    page.shot("1-compare-typed-too-long")
    no_streamlit_exception(page)


def test_guided_start_links_every_page_and_each_page_leads_to_the_next(app_url, page):
    """Item 10: the landing page links all seven pages in the story's order, and every page ends with a
    "next" link: generate → stability → AR vs DLM → prune → pick tau → compare → back to the start."""
    from playwright.sync_api import expect

    from app_common import STORY

    page.goto(app_url)
    expect(page.get_by_text("Work through the pages in order")).to_be_visible()
    main = page.locator("[data-testid='stMain']")
    links = main.locator("[data-testid='stPageLink'] a")
    expect(links).to_have_count(len(STORY) + 1)  # the pages, itself, "next"
    hrefs = [a.get_attribute("href").rsplit("/", 1)[-1] for a in links.all()]
    assert hrefs == [s[1] for s in STORY[1:]] + ["", "explorer"], hrefs
    nav_titles = page.locator("[data-testid='stSidebarNav'] a").all_inner_texts()
    assert len(nav_titles) == len(STORY) and all(t.strip().endswith(s[2]) for t, s in zip(nav_titles, STORY, strict=True)), (
        nav_titles  # the sidebar follows the story too (each entry: its icon's name, then its title)
    )
    for size in ({"width": 1440, "height": 900}, {"width": 1280, "height": 720}):
        page.set_viewport_size(size)
        page.wait_for_timeout(500)
        page.shot(f"1-landing-{size['width']}x{size['height']}")
    page.set_viewport_size({"width": 1440, "height": 900})

    main.get_by_role("link", name="Next · Denoising explorer", exact=False).click()
    page.get_by_role("spinbutton", name="Generation length").fill("16")
    page.get_by_role("spinbutton", name="Steps", exact=True).fill("16")
    page.get_by_role("button", name="Generate").click()
    expect(page.get_by_text("16 steps in", exact=False)).to_be_visible()
    for here, there in zip(STORY[1:], STORY[2:] + STORY[:1], strict=True):
        idle(page)
        link = main.get_by_role("link", name=f"· {there[2]}:", exact=False)
        expect(link).to_be_visible()
        link.scroll_into_view_if_needed()
        if here[1] == "compare":
            expect(link).to_contain_text("Back to the start")
            page.shot("2-compare-end-1440x900")
        if here[1] == "prune":
            page.set_viewport_size({"width": 1280, "height": 720})
            link.scroll_into_view_if_needed()
            page.wait_for_timeout(500)
            page.shot("3-prune-end-1280x720")
            page.set_viewport_size({"width": 1440, "height": 900})
        link.click()
        expect(main.get_by_role("heading", name="SinkScope" if there[1] == "" else there[2]).first).to_be_visible()
        no_streamlit_exception(page)
