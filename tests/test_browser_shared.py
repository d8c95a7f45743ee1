"""A class on one server (``sinkscope app --shared``), in Chromium: a run's link, a reload, shared mode's roots,
and sessions that never see each other's variants."""

from __future__ import annotations

import re
import shutil

import pytest

from tests.conftest import generate_in_browser, needs_chromium, no_streamlit_exception, start_app, stop_app

pytestmark = needs_chromium


@pytest.fixture(scope="module")
def shared_url(tmp_path_factory, tiny_dlm_dir):
    from sap_core.serving import ServerSettings

    root = tmp_path_factory.mktemp("class")
    shutil.copytree(tiny_dlm_dir, root / "models" / "class-dlm")
    (root / "runs").mkdir()
    settings = ServerSettings(shared=True, models_dir=root / "models", runs_dir=root / "runs", memory_budget_gb=1)
    proc, url = start_app(settings.to_env())
    yield url
    stop_app(proc)


@pytest.fixture
def second(chromium):
    context = chromium.new_context(viewport={"width": 1440, "height": 900})
    yield context.new_page()
    context.close()


def output_text(page) -> str:
    return page.locator("[data-testid='stCode']").filter(has_text="ROMEO.").first.inner_text()


def test_a_runs_link_opens_the_same_run_in_another_browser_and_a_reload_keeps_it(page, second, shared_url):
    from playwright.sync_api import expect

    generate_in_browser(page, shared_url, 16)
    assert re.search(r"[?&]sid=[\w-]{16}", page.url) and "run=" in page.url
    mine = output_text(page)
    page.get_by_role("button", name="Copy link").click()
    link = page.locator("[data-testid='stCode']").filter(has_text="/explorer?run=").first.inner_text().strip()
    assert "sid=" not in link and link.startswith(shared_url)
    page.shot("link")
    second.set_default_timeout(120_000)
    second.goto(link.replace("step=0", "step=5"))
    expect(second.get_by_text("Shared run by another session", exact=False)).to_be_visible()
    assert output_text(second) == mine
    no_streamlit_exception(second)
    second.screenshot(path=str(page_shot_dir() / "shared-second-browser.png"), full_page=True)

    page.reload()  # the same session: its ?sid= finds the run again, as its author (no "another session")
    expect(page.get_by_text("16 steps in", exact=False)).to_be_visible()
    assert output_text(page) == mine
    assert page.get_by_text("Shared run by another session", exact=False).count() == 0
    no_streamlit_exception(page)


def test_shared_mode_names_no_path_and_refuses_a_crafted_run(page, shared_url):
    from playwright.sync_api import expect

    page.goto(shared_url + "/explorer?run=..%2F..%2Fetc%2Fpasswd&step=3")
    expect(page.get_by_text("That run link is not valid", exact=False)).to_be_visible()
    assert "passwd" not in page.locator("[data-testid='stAlert']").first.inner_text()
    assert page.get_by_role("textbox", name="Model directory").count() == 0
    page.locator("[data-testid='stSidebar'] [data-testid='stSelectbox']").first.click()
    expect(page.get_by_role("option", name="class-dlm")).to_be_visible()  # offered by name, never a path
    page.keyboard.press("Escape")
    page.locator("[data-testid='stSidebarNav']").get_by_role("link", name="Prune", exact=True).click()
    expect(page.get_by_role("button", name="Prune")).to_be_visible()
    assert page.get_by_role("textbox", name="Save to directory").count() == 0
    no_streamlit_exception(page)


def test_two_sessions_never_see_each_others_variants(page, second, shared_url):
    from playwright.sync_api import expect

    page.goto(shared_url)
    expect(page.get_by_text("Active model:", exact=False).first).to_be_visible()
    page.locator("[data-testid='stSidebarNav']").get_by_role("link", name="Prune", exact=True).click()
    page.get_by_role("combobox", name="Method").first.click()
    page.get_by_role("option", name="magnitude", exact=True).click()
    page.get_by_role("button", name="Prune", exact=True).click()
    expect(page.get_by_text("Made **", exact=False).or_(page.get_by_text("Made magnitude", exact=False))).to_be_visible()
    page.get_by_role("button", name="Save on the server").click()
    expect(page.get_by_role("button", name="Download (zip)")).to_be_visible()
    page.shot("variant")
    assert "/" not in page.get_by_text("Saved on the server as", exact=False).first.inner_text().split(" as ")[1].split(" (")[0]

    second.set_default_timeout(120_000)
    second.goto(shared_url)
    expect(second.get_by_text("Active model:", exact=False).first).to_be_visible()
    second.locator("[data-testid='stSidebarNav']").get_by_role("link", name="Prune", exact=True).click()
    expect(second.get_by_text("No variants yet in this session", exact=False)).to_be_visible()
    page.reload()  # its own session finds its variant again
    expect(page.get_by_text("Variants of", exact=False)).to_be_visible()
    no_streamlit_exception(second)


def page_shot_dir():
    from tests.conftest import SCREENSHOTS

    return SCREENSHOTS
