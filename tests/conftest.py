"""Shared fixtures: tiny random models written to disk in LLaDA's own format."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from sap_core.models import load_model
from sap_core.models.dream import DreamConfig, DreamModel
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


def tiny_llada(tokenizer: PreTrainedTokenizerFast, *, seed: int = 0, **overrides) -> LLaDAModelLM:
    """A tiny random LLaDA model over ``tokenizer``'s vocabulary (2 blocks, d_model 32, 4 heads), seeded."""
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
    )
    kwargs.update(overrides)
    return LLaDAModelLM(LLaDAConfig(**kwargs))


def make_model_dir(path: Path, *, causal: bool = False, seed: int = 0, **overrides) -> Path:
    """Write a tiny random LLaDA-format model (config, model.safetensors, tokenizer) to ``path``."""
    tokenizer = make_tokenizer()
    model = tiny_llada(tokenizer, seed=seed, causal=causal, **overrides)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path


@contextmanager
def one_torch_thread():
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
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def one_thread_module():
    """For a whole test module: ``pytestmark = pytest.mark.usefixtures("one_thread_module")``."""
    with one_torch_thread():
        yield


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


DECOY = "raise RuntimeError('remote code from the checkpoint directory was executed')\n"
DREAM_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|beginoftext|>", "<|mask|>"]


def write_decoys(path: Path, names: list[str]) -> None:
    for name in names:
        (path / name).write_text(DECOY)


# --- checkpoints in the other families' formats (test_families.py) --------------------------------------------------------


def write_dream_tokenizer(path: Path) -> dict[str, int]:
    """Dream's tokenizer files: vocab.json + merges.txt (byte-level BPE), special tokens added after
    the vocabulary in tokenizer_config.json, tokenizer_class DreamTokenizer behind auto_map, no
    tokenizer.json. Returns the special tokens' ids."""
    base = make_tokenizer()
    base.backend_tokenizer.model.save(str(path))
    n = len(json.loads((path / "vocab.json").read_text()))
    ids = {tok: n + i for i, tok in enumerate(DREAM_SPECIALS)}
    added = {
        str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
        for t, i in ids.items()
    }
    config = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "auto_map": {"AutoTokenizer": ["tokenization_dream.DreamTokenizer", None]},
        "bos_token": "<|beginoftext|>",
        "chat_template": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|endoftext|>",
        "errors": "replace",
        "mask_token": "<|mask|>",
        "model_max_length": 131072,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "DreamTokenizer",
        "unk_token": None,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (path / "special_tokens_map.json").write_text(
        json.dumps(
            {
                "bos_token": "<|beginoftext|>",
                "eos_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>",
                "mask_token": "<|mask|>",
                "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
            }
        )
    )
    return ids


def make_dream_dir(path: Path, seed: int = 0, config_edit=None) -> Path:
    """A tiny random Dream-v0 checkpoint as released: Qwen2 names, q/k/v biases, bf16 shards."""
    path.mkdir(parents=True, exist_ok=True)
    ids = write_dream_tokenizer(path)
    vocab = 320  # padded past the tokenizer, as the 7B's 152064 > 151667 tokens
    dims = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab,
        max_position_embeddings=256,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
    )
    torch.manual_seed(seed)
    model = DreamModel(DreamConfig(**dims, mask_token_id=ids["<|mask|>"], pad_token_id=ids["<|endoftext|>"]))
    with torch.no_grad():  # non-zero biases and sharper attention, so both matter in every comparison
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.5)
            elif name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(20.0)
    model.to(torch.bfloat16).save_pretrained(str(path), max_shard_size="40KB")
    config = {  # the key set of Dream-v0-Instruct-7B's config.json, scaled down
        "architectures": ["DreamModel"],
        "attention_dropout": 0.0,
        "auto_map": {"AutoConfig": "configuration_dream.DreamConfig", "AutoModel": "modeling_dream.DreamModel"},
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|endoftext|>"],
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "mask_token_id": ids["<|mask|>"],
        "max_window_layers": 2,
        "model_type": "Dream",
        "pad_token_id": ids["<|endoftext|>"],
        "rope_scaling": None,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.46.2",
        "use_cache": False,
        "use_sliding_window": False,
        **dims,
    }
    if config_edit is not None:
        config_edit(config)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    (path / "generation_config.json").write_text(
        json.dumps(
            {
                "alg": "entropy",
                "alg_temp": 0.0,
                "bos_token_id": ids["<|endoftext|>"],
                "eos_token_id": ids["<|endoftext|>"],
                "mask_token_id": ids["<|mask|>"],
                "pad_token_id": ids["<|endoftext|>"],
                "steps": 512,
                "temperature": 0.0,
                "top_p": None,
                "transformers_version": "4.46.2",
            }
        )
    )
    write_decoys(path, ["configuration_dream.py", "modeling_dream.py", "generation_utils.py", "tokenization_dream.py"])
    return path


def make_llada15_dir(path: Path, seed: int = 0) -> Path:
    """A tiny random checkpoint with LLaDA-8B-Instruct / LLaDA-1.5's config.json key set, sharded."""
    path.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer()
    tok.save_pretrained(str(path))
    vocab, embedding = len(tok), len(tok) + 20  # embedding rows padded past the vocabulary
    model = tiny_llada(tok, seed=seed, mlp_hidden_size=96, embedding_size=embedding, rope_theta=500000.0)
    model.to(torch.bfloat16).save_pretrained(str(path), max_shard_size="40KB")
    config = {
        "activation_type": "silu",
        "alibi": False,
        "alibi_bias_max": 8.0,
        "architectures": ["LLaDAModelLM"],
        "attention_dropout": 0.0,
        "attention_layer_norm": False,
        "attention_layer_norm_with_affine": True,
        "auto_map": {
            "AutoConfig": "configuration_llada.LLaDAConfig",
            "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM",
            "AutoModel": "modeling_llada.LLaDAModelLM",
        },
        "bias_for_layer_norm": False,
        "block_group_size": 1,
        "block_type": "llama",
        "d_model": 32,
        "embedding_dropout": 0.0,
        "embedding_size": embedding,
        "eos_token_id": tok.eos_token_id,
        "flash_attention": False,
        "include_bias": False,
        "include_qkv_bias": False,
        "init_cutoff_factor": None,
        "init_device": "meta",
        "init_fn": "mitchell",
        "init_std": 0.02,
        "input_emb_norm": False,
        "layer_norm_type": "rms",
        "layer_norm_with_affine": True,
        "mask_token_id": tok.mask_token_id,
        "max_sequence_length": 256,
        "mlp_hidden_size": 96,
        "mlp_ratio": 4,
        "model_type": "llada",
        "multi_query_attention": None,
        "n_heads": 4,
        "n_kv_heads": 4,
        "n_layers": 2,
        "pad_token_id": tok.pad_token_id,
        "precision": "amp_bf16",
        "residual_dropout": 0.0,
        "rms_norm_eps": 1e-05,
        "rope": True,
        "rope_full_precision": True,
        "rope_theta": 500000.0,
        "scale_logits": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.46.3",
        "use_cache": False,
        "vocab_size": vocab,
        "weight_tying": False,
    }
    (path / "config.json").write_text(json.dumps(config, indent=2))
    write_decoys(path, ["configuration_llada.py", "modeling_llada.py"])
    return path


def make_causal_dir(path: Path, kind: str = "llama", seed: int = 0, **extra) -> Path:
    """A tiny random transformers-native causal LM written with save_pretrained (+ tokenizer)."""
    import transformers

    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    }[kind]
    tok = make_tokenizer()
    torch.manual_seed(seed)
    config = config_cls(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tok),
        max_position_embeddings=256,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        **extra,
    )
    model = model_cls(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(20.0)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return path


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


def idle(page) -> None:
    """Wait until the app's script run has ended (Streamlit's running indicator is gone)."""
    from playwright.sync_api import expect

    page.wait_for_timeout(300)
    expect(page.locator("[data-testid='stStatusWidget']")).to_be_hidden()


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
