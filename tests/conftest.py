"""Shared fixtures: tiny random models written to disk in LLaDA's own format."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from sap_core.models import load_model
from sap_core.models.llada import LLaDAConfig, LLaDAModelLM

SPECIALS = ["[PAD]", "[BOS]", "[EOS]", "[MASK]"]
TEXT = [
    "To be, or not to be, that is the question.",
    "Whether 'tis nobler in the mind to suffer the slings and arrows of outrageous fortune,",
    "Or to take arms against a sea of troubles, and by opposing end them.",
    "All the world's a stage, and all the men and women merely players.",
]


def make_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXT, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", bos_token="[BOS]", eos_token="[EOS]", mask_token="[MASK]"
    )


def make_model_dir(path: Path, *, causal: bool = False, seed: int = 0, **overrides) -> Path:
    """Write a tiny random LLaDA-format model (config, model.safetensors, tokenizer) to ``path``."""
    tokenizer = make_tokenizer()
    torch.manual_seed(seed)
    kwargs = dict(
        d_model=32,
        n_heads=4,
        n_kv_heads=4,
        n_layers=2,
        mlp_hidden_size=64,
        vocab_size=len(tokenizer),
        max_sequence_length=256,
        rope_theta=10000.0,
        mask_token_id=tokenizer.mask_token_id,
        causal=causal,
    )
    kwargs.update(overrides)
    model = LLaDAModelLM(LLaDAConfig(**kwargs))
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path


def _one_torch_thread():
    """Torch on one thread, as a sweep's Ray worker runs it (a serial reference then reduces in the same order);
    on tiny tensors more threads only add synchronisation and spin against other jobs on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def one_thread():
    yield from _one_torch_thread()


@pytest.fixture(scope="module")
def one_thread_module():
    yield from _one_torch_thread()


@pytest.fixture(scope="session")
def tiny_dlm_dir(tmp_path_factory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("tiny-dlm"))


@pytest.fixture(scope="session")
def tiny_ar_dir(tmp_path_factory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("tiny-ar"), causal=True)


@pytest.fixture(scope="session")
def tiny_dlm(tiny_dlm_dir):
    return load_model(tiny_dlm_dir, device="cpu")


@pytest.fixture(scope="session")
def tiny_ar(tiny_ar_dir):
    return load_model(tiny_ar_dir, device="cpu")


# --- the real browser: one Streamlit server and one Debian Chromium for every browser test ------------

CHROMIUM = "/usr/bin/chromium"
ROOT = Path(__file__).resolve().parents[1]
SCREENSHOTS = ROOT / "tests" / "screenshots"  # git-ignored; look at them after a change to a page
needs_chromium = pytest.mark.skipif(
    not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed (.ci/run installs it)"
)


def pytest_collection_modifyitems(items):
    """Markers (registered in pyproject.toml) for the slow end-to-end tests, so that a quick local run can
    select them out (``-m "not browser and not slow"``); CI (``.ci/run``) runs them all. ``browser``: the
    test drives the real app in Chromium (marked here, by its fixtures); ``slow``: it runs the app's pages end
    to end through AppTest (marked in its file)."""
    for item in items:
        if {"page", "app_url", "chromium"} & set(item.fixturenames):
            item.add_marker(pytest.mark.browser)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(env: dict | None = None) -> tuple[subprocess.Popen, str]:
    """``streamlit run app.py`` on a free local port; returns the process and its URL once healthy."""
    port = free_port()
    env = dict(os.environ, STREAMLIT_BROWSER_GATHER_USAGE_STATS="false", **(env or {}))
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "streamlit",
            "run",
            str(ROOT / "app.py"),
            "--server.headless",
            "true",
            "--server.port",
            str(port),
            "--server.address",
            "127.0.0.1",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url + "/_stcore/health", timeout=2)
            return proc, url
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("streamlit did not start within 120 s")


def stop_app(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="session")
def app_url():
    """One app server for the whole session (each browser page is its own Streamlit session)."""
    proc, url = start_app()
    yield url
    stop_app(proc)


def launch_chromium(playwright):
    return playwright.chromium.launch(
        executable_path=CHROMIUM,
        args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--no-first-run"],
    )


@pytest.fixture(scope="session")
def chromium():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = launch_chromium(p)
        yield browser
        browser.close()


@pytest.fixture
def page(chromium, request):
    """A fresh page (its own Streamlit session) at 1440x900 with 120 s timeouts; screenshots go to
    ``tests/screenshots/<test name>-*.png``."""
    from playwright.sync_api import expect

    context = chromium.new_context(viewport={"width": 1440, "height": 900})
    pg = context.new_page()
    pg.set_default_timeout(120_000)
    expect.set_options(timeout=120_000)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    pg.shot = lambda name: pg.screenshot(path=str(SCREENSHOTS / f"{request.node.name}-{name}.png"), full_page=True)
    yield pg
    context.close()


def no_streamlit_exception(page) -> None:
    """Fail if the page shows a Streamlit exception element."""
    shown = page.locator("[data-testid='stException']")
    assert shown.count() == 0, shown.first.text_content()


def generate_in_browser(page, app_url: str, tokens: int) -> None:
    """Open the app, wait until it has run (a nav click before that lands in Streamlit's old page-folder
    mode, where app.py never runs), and generate ``tokens`` tokens in as many steps on the explorer."""
    from playwright.sync_api import expect

    page.goto(app_url)
    expect(page.get_by_text("Active model:", exact=False).first).to_be_visible()
    page.locator("[data-testid='stSidebarNav']").get_by_role("link", name="Denoising explorer", exact=True).click()
    page.get_by_role("spinbutton", name="Generation length").fill(str(tokens))
    page.get_by_role("spinbutton", name="Steps", exact=True).fill(str(tokens))
    page.get_by_role("button", name="Generate").click()
    expect(page.get_by_text(f"{tokens} steps in", exact=False)).to_be_visible()
