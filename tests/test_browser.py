"""End to end in a real headless Chromium (Debian's), driven by Playwright: the Denoising explorer on the
built-in DLM. Generate, step through the run with the view's own slider and Play/Pause (no Streamlit
rerun: nothing is sent to the server), read the colour bars the browser actually draws, recompute
the full attention map, download the GIF."""

from __future__ import annotations

import io
import time

import numpy as np
from conftest import SCREENSHOTS, needs_chromium, no_streamlit_exception
from PIL import Image

pytestmark = needs_chromium


def luminance(rgb: np.ndarray) -> np.ndarray:
    return rgb[..., :3].astype(float) @ np.array([0.2126, 0.7152, 0.0722])


def assert_rises(column: np.ndarray, what: str) -> None:
    """``column`` [n, 3] from the top of a colour bar to its bottom: luminance must fall (rise bottom to top)."""
    lum = luminance(column)
    assert lum[0] - lum[-1] > 100, f"{what}: the colour bar spans too little luminance ({lum[0]:.0f} to {lum[-1]:.0f})"
    assert np.all(np.diff(lum) <= 3.0), f"{what}: luminance is not monotonic: {np.round(lum).tolist()}"


def test_explorer_steps_in_the_browser_without_a_rerun(app_url, page):
    from playwright.sync_api import expect

    sent = []  # every message the browser sends to the Streamlit server (a rerun is one)
    page.on("websocket", lambda ws: ws.on("framesent", lambda payload: sent.append(time.time())))
    page.goto(app_url)
    expect(page.get_by_text("Active model: tiny-dlm", exact=False)).to_be_visible()
    page.locator("[data-testid='stSidebarNav']").get_by_role("link", name="Denoising explorer", exact=True).click()
    page.get_by_role("spinbutton", name="Generation length").fill("16")
    page.get_by_role("spinbutton", name="Steps", exact=True).fill("16")
    page.get_by_role("button", name="Generate").click()
    expect(page.get_by_text("16 steps in", exact=False)).to_be_visible()
    expect(page.get_by_text("prompt “ROMEO.⏎” · 16 tokens · 16 steps", exact=False)).to_be_visible()

    frame_el = page.locator("iframe").first
    frame_el.scroll_into_view_if_needed()
    view = page.frame_locator("iframe").first
    label, canvas = view.locator("#steplabel"), view.locator("#view")
    expect(label).to_have_text("Step 0 of 15")
    time.sleep(1.0)  # the app settles (no script running) before counting messages
    no_streamlit_exception(page)
    before = canvas.screenshot()
    frame_el.screenshot(path=str(SCREENSHOTS / "explorer-step0.png"))
    n_sent = len(sent)

    view.locator("#step").focus()
    for _ in range(5):
        view.locator("#step").press("ArrowRight")
    expect(label).to_have_text("Step 5 of 15")
    expect(view.locator("#caption")).to_contain_text("at this step")
    after = canvas.screenshot()
    assert after != before
    frame_el.screenshot(path=str(SCREENSHOTS / "explorer-step5.png"))
    # the hover names token text, position and state
    box = canvas.bounding_box()
    geometry = view.locator("body").evaluate("() => window.sinkscope.geometry")
    page.mouse.move(box["x"] + geometry["left"] + 2.5 * geometry["cw"], box["y"] + geometry["layerY"] + 3)
    expect(view.locator("#tip")).to_contain_text("position 2 '")
    expect(view.locator("#tip")).to_contain_text("at step 5:")

    # Play runs on, Pause stops it
    view.locator("#play").click()
    expect(view.locator("#play")).to_have_text("❚❚ Pause")
    time.sleep(0.5)
    view.locator("#play").click()
    stopped = int(view.locator("body").evaluate("() => window.sinkscope.step"))
    assert stopped > 5
    time.sleep(0.4)
    assert int(view.locator("body").evaluate("() => window.sinkscope.step")) == stopped
    time.sleep(0.5)
    assert len(sent) == n_sent, "stepping the view sent messages to the Streamlit server (a rerun)"

    # the colour bars as drawn: luminance rises from the bottom to the top of each
    shot = np.asarray(Image.open(io.BytesIO(canvas.screenshot())).convert("RGB"))
    scale = shot.shape[1] / box["width"]
    x = int((geometry["W"] - geometry["right"] + 19) * scale)
    for y, h, what in ((geometry["layerY"], geometry["layerH"], "layer map"), (geometry["stepY"], geometry["stepH"], "step map")):
        top, bottom = int((y + 2) * scale), int((y + h - 2) * scale)
        assert_rises(shot[top:bottom, x], what)

    # the full attention map of the view's step, square, tokens on both axes; its colour bar as drawn
    view.locator("#step").focus()
    view.locator("#step").press("Home")
    for _ in range(5):
        view.locator("#step").press("ArrowRight")
    expect(label).to_have_text("Step 5 of 15")
    page.get_by_role("button", name="Recompute map").click()  # follows the view's step by default
    expect(page.get_by_text("Attention map: step 5, layer 0, head 0")).to_be_visible()
    chart = page.locator("[data-testid='stPlotlyChart']").last
    chart.scroll_into_view_if_needed()
    time.sleep(1.0)
    chart.screenshot(path=str(SCREENSHOTS / "explorer-attention-map.png"))
    plot = chart.locator(".nsewdrag").first.bounding_box()
    assert abs(plot["width"] - plot["height"]) <= 2, plot  # drawn square
    assert chart.locator(".xtick").count() == chart.locator(".ytick").count() > 16  # a token per position
    bar = chart.locator("rect.cbfill").first.bounding_box()
    pixels = np.asarray(Image.open(io.BytesIO(page.screenshot(clip=bar))).convert("RGB"))
    assert_rises(pixels[2:-2, pixels.shape[1] // 2], "attention map")

    # the GIF download: one frame per step
    with page.expect_download() as download:
        page.get_by_role("button", name="Animated GIF").click()
    gif = Image.open(download.value.path())
    assert gif.format == "GIF" and gif.n_frames == 16
    no_streamlit_exception(page)


def test_a_run_too_large_for_the_view_is_shown_at_every_kth_step(tiny_dlm, page):
    """A run over the view's budget travels at every k-th step (and the last); the slider, labels, hover and
    legend show the real step numbers. The page alone, in Chromium, without the app."""
    from playwright.sync_api import expect

    from sap_core import animation
    from sap_core.attention import AttentionRecorder
    from sap_core.decoding import DecodeSpec
    from sap_core.diffusion import generate
    from sap_core.sink_report import analyze
    from sap_core.sinks import SinkSpec

    traj = generate(tiny_dlm, "ROMEO.\n", DecodeSpec(48, 48, 48, "low_confidence", 0.0, 0.0, 0), recorder=AttentionRecorder())
    report = analyze(traj, SinkSpec())
    tokens = animation.readable_tokens(tiny_dlm.decode, traj.final_tokens)
    budget = (len(report.layers) + 1) * report.length * 8  # room for 8 steps: every 6th of 48
    page.set_content(animation.explorer_html(report, tokens, max_values=budget))
    label = page.locator("#steplabel")
    expect(label).to_have_text("Step 0 of 47")
    expect(page.locator("#legend")).to_contain_text("every 6th of 48 steps shown")
    page.locator("#step").focus()
    page.locator("#step").press("ArrowRight")
    expect(label).to_have_text("Step 6 of 47")
    page.locator("#step").press("End")
    expect(label).to_have_text("Step 47 of 47")
    page.locator("#step").press("ArrowLeft")
    expect(label).to_have_text("Step 42 of 47")
    assert page.locator("#view").get_attribute("data-step") == "42"
    geometry = page.evaluate("() => window.sinkscope.geometry")
    box = page.locator("#view").bounding_box()
    page.mouse.move(box["x"] + geometry["left"] + 2.5 * geometry["cw"], box["y"] + geometry["stepY"] + 2)
    expect(page.locator("#tip")).to_contain_text("at step 0:")
    page.shot("thinned")
