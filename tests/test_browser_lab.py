"""Issue 30 in the app, in Debian's Chromium: a variant made on the Prune page side by side with the dense run
(two runs, one slider moving both, differing sinks marked), and the explorer's Ablate sinks toggle. Screenshots:
tests/screenshots/test_side_by_side_and_ablation-*.png; look at them."""

from __future__ import annotations

import numpy as np
from conftest import generate_in_browser, needs_chromium, no_streamlit_exception
from test_browser_pages import choose, idle

from sap_core.animation import AnimationSpecError, SecondRun, explorer_data
from sap_core.decoding import DecodeSpec
from sap_core.sink_report import analyze
from sap_core.sinks import SinkSpec

N = 16


def test_second_run_shares_the_colour_scale_and_must_match():
    """The data side: the second run's mass on the first's scale, its differing positions carried per step;
    a run of other settings is refused with one line."""
    from sap_core.attention import AttentionRecorder
    from sap_core.diffusion import generate
    from sap_core.models import load_model

    handle = load_model("tiny-dlm")
    a = generate(handle, "ROMEO.\n", DecodeSpec(gen_length=8, steps=8, block_length=8), recorder=AttentionRecorder())
    b = generate(handle, "ROMEO.\n", DecodeSpec(gen_length=8, steps=8, block_length=8, seed=1), recorder=AttentionRecorder())
    ra, rb = analyze(a, SinkSpec()), analyze(b, SinkSpec())
    differs = ra.is_sink ^ rb.is_sink
    data = explorer_data(ra, other=SecondRun(rb, None, "other seed", differs))
    assert data["other"]["label"] == "other seed"
    assert data["other"]["differs"] == [np.flatnonzero(d).tolist() for d in differs]
    alone = explorer_data(ra)
    assert alone["other"] is None and data["qmax"] >= alone["qmax"]
    c = generate(handle, "ROMEO.\n", DecodeSpec(gen_length=4, steps=4, block_length=4), recorder=AttentionRecorder())
    rc = analyze(c, SinkSpec())
    try:
        explorer_data(ra, other=SecondRun(rc, None, "short", np.zeros((rc.n_steps, rc.length), bool)))
    except AnimationSpecError as exc:
        assert "compare runs of the same settings" in str(exc)
    else:
        raise AssertionError("a second run of other settings must be refused")


def nav(page, name: str) -> None:
    page.locator("[data-testid='stSidebarNav']").get_by_role("link", name=name, exact=True).click()
    idle(page)


@needs_chromium
def test_side_by_side_and_ablation(app_url, page):
    from playwright.sync_api import expect

    generate_in_browser(page, app_url, N)
    nav(page, "Prune")
    choose(page, "Method", "magnitude")
    page.get_by_role("button", name="Prune", exact=True).click()
    expect(page.get_by_text("Made magnitude", exact=False)).to_be_visible()

    nav(page, "Denoising explorer")
    expect(page.get_by_text(f"{N} steps in", exact=False)).to_be_visible()
    idle(page)
    page.wait_for_timeout(1000)  # the view has committed its first step (which closes an open dropdown)
    box = page.get_by_role("combobox", name="Variant")
    box.click()
    box.press_sequentially("magnitude")
    box.press("Enter")
    idle(page)
    view = page.frame_locator("iframe").first
    label, other = view.locator("#steplabel"), view.locator("#otherlabel")
    expect(other).to_be_visible()
    expect(other).to_contain_text("magnitude")
    view.locator("#step").focus()
    view.locator("#step").press("Home")
    expect(label).to_have_text(f"Step 0 of {N - 1}")
    expect(other).to_contain_text("step 0")
    for _ in range(5):
        view.locator("#step").press("ArrowRight")  # the slider's next-step key: both runs move, no rerun
    expect(label).to_have_text(f"Step 5 of {N - 1}")
    expect(other).to_have_text("magnitude 50% (replayed): step 5")
    differs = view.locator("body").evaluate(
        "() => Array.from({length: window.sinkscope.nSteps}, (_, i) => window.sinkscope.differsAt(i).length)"
    )
    assert len(differs) == N and sum(differs) > 0, differs  # magnitude at 50 % moves some sinks somewhere
    first = differs.index(max(differs))
    view.locator("body").evaluate(f"() => window.sinkscope.draw({first})")
    expect(other).to_have_text(f"magnitude 50% (replayed): step {first}")
    expect(view.locator("#legend")).to_contain_text("a sink in one run and not the other")
    page.shot("1-side-by-side-replayed")

    page.get_by_text("Free-running (each decodes itself)").click()
    idle(page)
    expect(other).to_contain_text("magnitude 50% (free-running)")
    page.shot("2-side-by-side-free-running")
    no_streamlit_exception(page)

    # the ablation toggle: generates with the sinks removed and says so in the run's caption
    choose(page, "Variant", "none (the dense run)")
    idle(page)
    page.get_by_text("Ablate sinks", exact=True).click()
    page.get_by_role("button", name="Generate").click()
    expect(page.get_by_text("sinks ablated (all layers", exact=False).first).to_be_visible()
    expect(page.get_by_text(f"{N} steps in", exact=False)).to_be_visible()
    idle(page)
    expect(view.locator("#otherlabel")).to_be_hidden()
    page.shot("3-ablated")
    no_streamlit_exception(page)
