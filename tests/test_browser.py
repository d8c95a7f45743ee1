"""End to end in a real headless Chromium (Debian's), driven by Playwright: load the app on the
built-in DLM, run a generation, move the timestep slider, and check that the heatmap changes."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed (.ci/run installs it)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server():
    port = free_port()
    env = dict(os.environ, STREAMLIT_BROWSER_GATHER_USAGE_STATS="false")
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", str(ROOT / "app.py"), "--server.headless", "true",
                             "--server.port", str(port), "--server.address", "127.0.0.1"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url + "/_stcore/health", timeout=2)
            break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("streamlit did not start")
    yield url
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()


def heatmap_title(page) -> str:
    return page.locator("text=/Attention mass received per layer at step \\d+/").first.text_content()


def test_generate_and_step_through_in_a_browser(server, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--no-first-run"])
        page = browser.new_page(viewport={"width": 1400, "height": 1600})
        page.set_default_timeout(120_000)
        expect.set_options(timeout=120_000)
        page.goto(server)
        expect(page.get_by_text("Active model: tiny-dlm", exact=False)).to_be_visible()
        page.screenshot(path=str(tmp_path / "1-model.png"), full_page=True)
        page.get_by_role("link", name="Denoising explorer").click()
        page.get_by_role("spinbutton", name="Generation length").fill("16")
        page.get_by_role("spinbutton", name="Steps", exact=True).fill("16")
        page.get_by_role("button", name="Generate").click()
        expect(page.get_by_text("16 steps in", exact=False)).to_be_visible()
        expect(page.get_by_text("Attention mass received per layer at step 0")).to_be_visible()
        chart = page.locator("[data-testid='stPlotlyChart']").nth(1)
        before = chart.screenshot(path=str(tmp_path / "2-heatmap-step0.png"))
        page.screenshot(path=str(tmp_path / "3-explorer-step0.png"), full_page=True)
        slider = page.get_by_role("slider").nth(1)  # the first is the temperature, inside the form
        slider.focus()
        for _ in range(5):
            slider.press("ArrowRight")
        expect(page.get_by_text("Attention mass received per layer at step 5")).to_be_visible()
        time.sleep(1.0)  # let plotly finish drawing
        after = page.locator("[data-testid='stPlotlyChart']").nth(1).screenshot(path=str(tmp_path / "4-heatmap-step5.png"))
        page.screenshot(path=str(tmp_path / "5-explorer-step5.png"), full_page=True)
        assert before != after
        browser.close()
