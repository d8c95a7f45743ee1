"""The explorer's decoding controls follow the family (issue 29), in a real headless Chromium against an app
started on a tiny random Dream checkpoint (``SINKSCOPE_MODEL``): Dream's own sampler and its options (alg,
alg_temp, eps, top_p, top_k) by default, no block length, remasking or guidance; a maskgit_plus generation runs;
the LLaDA sampler brings LLaDA's options back and says it is not Dream's own. Screenshots go to
tests/screenshots/test_*-*.png: look at them after changing the controls."""

from __future__ import annotations

import pytest
from conftest import needs_chromium, no_streamlit_exception, start_app, stop_app
from test_browser_pages import choose, idle
from test_families import make_dream_dir

pytestmark = needs_chromium


@pytest.fixture(scope="module")
def dream_app(tmp_path_factory):
    proc, url = start_app({"SINKSCOPE_MODEL": str(make_dream_dir(tmp_path_factory.mktemp("dream_app")))})
    yield url
    stop_app(proc)


def test_dream_model_shows_dreams_controls_and_generates_with_maskgit_plus(dream_app, page):
    from playwright.sync_api import expect

    page.goto(dream_app)
    expect(page.get_by_text("Active model:", exact=False).first).to_be_visible()
    page.locator("[data-testid='stSidebarNav']").get_by_role("link", name="Denoising explorer", exact=True).click()
    expect(page.get_by_role("radio", name="Dream's own", exact=True)).to_be_checked()
    for name in ("Alg", "top_p", "top_k", "eps", "Alg temperature"):
        expect(page.get_by_label(name, exact=True)).to_be_visible()
    for name in ("Block length", "CFG scale"):
        expect(page.get_by_role("spinbutton", name=name, exact=True)).to_have_count(0)
    expect(page.get_by_role("combobox", name="Remasking")).to_have_count(0)
    choose(page, "Alg", "maskgit_plus")
    page.get_by_role("spinbutton", name="Generation length").fill("12")
    page.get_by_role("spinbutton", name="Steps", exact=True).fill("7")  # Dream's steps need not divide the length
    page.get_by_role("button", name="Generate").click()
    expect(page.get_by_text("7 steps in", exact=False)).to_be_visible()
    expect(page.get_by_text("Dream's sampler, alg maskgit_plus", exact=False).first).to_be_visible()
    idle(page)
    no_streamlit_exception(page)
    page.shot("dream")

    page.get_by_text("LLaDA's (not Dream's own)").click()  # the LLaDA sampler: LLaDA's options, said not Dream's
    idle(page)
    expect(page.get_by_role("spinbutton", name="Block length")).to_be_visible()
    expect(page.get_by_role("combobox", name="Remasking")).to_be_visible()
    expect(page.get_by_text("not Dream's own decoding", exact=False)).to_be_visible()
    for name in ("top_k", "top_p", "eps"):
        expect(page.get_by_role("spinbutton", name=name, exact=True)).to_have_count(0)
    expect(page.get_by_role("combobox", name="Alg")).to_have_count(0)
    expect(page.get_by_role("spinbutton", name="Seed")).to_have_count(1)
    no_streamlit_exception(page)
    page.shot("llada-sampler")
