"""The Prune page's Save block in a real headless Chromium: save a variant, refuse to replace it
unconfirmed, replace it when confirmed (issue 12)."""

from __future__ import annotations

import json

from conftest import needs_chromium, no_streamlit_exception

pytestmark = needs_chromium


def test_prune_save_and_overwrite_confirmation_in_a_browser(app_url, page, tmp_path):
    from playwright.sync_api import expect

    target = tmp_path / "variant"
    page.goto(app_url)
    expect(page.get_by_text("Active model: tiny-dlm", exact=False)).to_be_visible()
    page.locator("[data-testid='stSidebarNav']").get_by_role("link", name="Prune", exact=True).click()
    expect(page.get_by_text("No variants yet", exact=False)).to_be_visible()
    page.locator("[data-testid='stMain'] [data-testid='stSelectbox']").first.click()
    page.get_by_role("option", name="magnitude").click()
    page.get_by_role("button", name="Prune", exact=True).click()
    expect(page.get_by_text("Made magnitude", exact=False)).to_be_visible()
    field = page.get_by_role("textbox", name="Save to directory")
    field.fill(str(target))
    field.press("Enter")
    expect(page.get_by_text(f"Writes to {target}", exact=False)).to_be_visible()
    page.get_by_role("button", name="Save", exact=True).click()
    expect(page.get_by_text("Saved to", exact=False)).to_be_visible()
    assert json.loads((target / "pruning.json").read_text())["method"] == "magnitude"
    page.get_by_role("button", name="Save", exact=True).click()
    expect(page.get_by_text("holds a pruned variant already", exact=False)).to_be_visible()
    page.shot("1-refused")
    page.get_by_text("Replace the variant already saved there").click()
    page.get_by_role("button", name="Save", exact=True).click()
    expect(page.get_by_text("Saved to", exact=False)).to_be_visible()
    page.shot("2-replaced")
    no_streamlit_exception(page)
