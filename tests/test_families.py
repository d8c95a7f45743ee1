"""Model families (issue 8): Dream, LLaDA-1.5-shaped LLaDA checkpoints, transformers causal LMs;
Dream's entropy remasking; placement over devices (device_map); the GPU check script (``--tiny``).

Every checkpoint here (written by conftest.py's make_dream_dir, make_llada15_dir, make_causal_dir) is tiny and
random but written in its family's real on-disk format: the
released config keys (including ``auto_map`` / ``architectures``), sharded safetensors, the tokenizer
files the family ships, and decoy remote-code files that raise if anything imports them.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import make_causal_dir, make_dream_dir, make_llada15_dir
from safetensors.torch import load_file
from torch import nn

from sap_core import pruning
from sap_core.attention import AttentionRecorder
from sap_core.decoding import REMASKING, DecodeSpec
from sap_core.diffusion import attention_map, generate
from sap_core.errors import DecodeSpecError, ModelLoadError
from sap_core.models import FAMILY_LOADERS, ModelHandle, load_model, placement
from sap_core.models.dream import DreamModel
from sap_core.models.hf_causal import HFBlock
from sap_core.models.llada import LLaDAModelLM

ROOT = Path(__file__).resolve().parents[1]


def merged_state(path: Path) -> dict[str, torch.Tensor]:
    state = {}
    for f in sorted(path.glob("*.safetensors")):
        state.update(load_file(str(f)))
    return state


def rand_ids(vocab_hi: int, n: int, seed: int = 0, lo: int = 4) -> torch.Tensor:
    return torch.randint(lo, vocab_hi, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="session")
def dream_dir(tmp_path_factory) -> Path:
    return make_dream_dir(tmp_path_factory.mktemp("dream"))


@pytest.fixture(scope="session")
def llada15_dir(tmp_path_factory) -> Path:
    return make_llada15_dir(tmp_path_factory.mktemp("llada15"))


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory) -> Path:
    return make_causal_dir(tmp_path_factory.mktemp("llama"), "llama")


@pytest.fixture(scope="session")
def qwen2_dir(tmp_path_factory) -> Path:
    return make_causal_dir(tmp_path_factory.mktemp("qwen2"), "qwen2")


@pytest.fixture(scope="session")
def dream(dream_dir) -> ModelHandle:
    return load_model(dream_dir, device="cpu")


@pytest.fixture(scope="session")
def llada15(llada15_dir) -> ModelHandle:
    return load_model(llada15_dir, device="cpu")


@pytest.fixture(scope="session")
def llama(llama_dir) -> ModelHandle:
    return load_model(llama_dir, device="cpu")


@pytest.fixture(scope="session")
def qwen2(qwen2_dir) -> ModelHandle:
    return load_model(qwen2_dir, device="cpu")


FAMILIES = ["dream", "llada15", "llama", "qwen2"]


@pytest.fixture
def handle(request) -> ModelHandle:
    return request.getfixturevalue(request.param)


@pytest.mark.parametrize("handle", FAMILIES + ["tiny_dlm", "tiny_ar"], indirect=True)
def test_handle_reads_width_context_and_vocabulary_from_the_model(handle):
    cfg = json.loads((Path(handle.source) / "config.json").read_text())
    with torch.no_grad():
        width = handle.module.embed(torch.tensor([[1, 2, 3]], device=handle.device)).shape[-1]
    assert handle.d_model == width == (cfg.get("d_model") or cfg["hidden_size"])
    assert handle.max_length == (cfg.get("max_sequence_length") or cfg.get("max_position_embeddings"))
    assert handle.max_length is not None
    assert handle.vocab_size == len(handle.tokenizer)


def qwen2_reference(dream_dir: Path):
    """transformers' own Qwen2 with Dream's weights, eager attention (gives full maps)."""
    import transformers

    c = json.loads((dream_dir / "config.json").read_text())
    config = transformers.Qwen2Config(
        hidden_size=c["hidden_size"],
        intermediate_size=c["intermediate_size"],
        num_hidden_layers=c["num_hidden_layers"],
        num_attention_heads=c["num_attention_heads"],
        num_key_value_heads=c["num_key_value_heads"],
        vocab_size=c["vocab_size"],
        rms_norm_eps=c["rms_norm_eps"],
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": c["rope_theta"]},
        attn_implementation="eager",
    )
    model = transformers.Qwen2ForCausalLM(config).eval()
    model.load_state_dict({k: v.float() for k, v in merged_state(dream_dir).items()}, strict=True)
    return model


# --- Dream ---------------------------------------------------------------------------------------


def test_dream_loads_by_released_names_without_remote_code(dream, dream_dir):
    from transformers import AutoModel, Qwen2Tokenizer

    keys = set(merged_state(dream_dir))
    for name in (
        "self_attn.q_proj.weight",
        "self_attn.q_proj.bias",
        "self_attn.k_proj.bias",
        "self_attn.v_proj.bias",
        "self_attn.o_proj.weight",
        "mlp.gate_proj.weight",
        "mlp.up_proj.weight",
        "mlp.down_proj.weight",
        "input_layernorm.weight",
        "post_attention_layernorm.weight",
    ):
        assert f"model.layers.1.{name}" in keys
    assert {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"} <= keys
    assert "model.layers.0.self_attn.o_proj.bias" not in keys
    assert len(list(dream_dir.glob("*.safetensors"))) > 1  # sharded, with an index
    assert isinstance(dream.module, DreamModel) and dream.family == "Dream" and not dream.causal
    assert isinstance(dream.tokenizer, Qwen2Tokenizer)  # DreamTokenizer's files, read without its code
    assert dream.mask_id == dream.tokenizer.convert_tokens_to_ids("<|mask|>") == dream.module.config.mask_token_id
    assert dream.n_heads == 4 and dream.module.blocks[0].n_kv_heads == 2  # GQA
    assert dream.encode("To be<|mask|>")[-1] == dream.mask_id
    assert isinstance(AutoModel.from_pretrained(str(dream_dir)), DreamModel)  # auto_map present, decoys untouched


def test_dream_is_qwen2_run_bidirectionally(dream, dream_dir):
    """Independent reference: transformers' Qwen2 with Dream's weights and a full (all-zero) mask."""
    ref = qwen2_reference(dream_dir)
    x = rand_ids(300, 20)
    raw = dream.module(x).logits
    with torch.no_grad():
        full = ref(x, attention_mask=torch.zeros(1, 1, 20, 20)).logits
        causal = ref(x).logits
    assert torch.allclose(raw, full, atol=1e-4)
    assert not torch.allclose(raw, causal, atol=1e-2)  # attention really is bidirectional
    assert not torch.allclose(raw[:, :19], dream.module(torch.cat([x[:, :19], x[:, :1]], 1)).logits[:, :19], atol=1e-3)


def test_dream_shift_is_applied(dream):
    x = rand_ids(300, 16)
    raw = dream.module(x).logits
    aligned = dream.logits(x)
    assert torch.equal(aligned[:, 1:], raw[:, :-1]) and torch.equal(aligned[:, 0], raw[:, 0])
    # The LLaDA sampler fills position p from the hidden state at p - 1: one token per step, greedy.
    # (Dream's own sampler, the Dream default, is checked against Dream's code in test_dream_sampler.py.)
    prompt = dream.encode("To be, or not")
    P = len(prompt)
    traj = generate(dream, prompt, DecodeSpec(gen_length=8, steps=8, block_length=8, sampler="llada"))
    for s in range(8):
        step_raw = dream.module(torch.as_tensor(traj.tokens[s])[None]).logits[0].double()
        probs = torch.softmax(step_raw, -1)
        masked = np.flatnonzero(traj.tokens[s] == dream.mask_id)
        best = masked[int(torch.argmax(probs[masked - 1].max(-1).values))]  # most confident, shifted
        (p,) = np.flatnonzero(traj.decoded_at == s)
        assert p == best and p >= P
        assert traj.final_tokens[p] == int(step_raw[p - 1].argmax())
        assert math.isclose(traj.confidence[s, p], float(probs[p - 1].max()), rel_tol=1e-5)


def test_dream_config_errors(tmp_path):
    def scaled_rope(c):
        c["rope_scaling"] = {"type": "linear", "factor": 2.0}

    d = make_dream_dir(tmp_path / "rope", config_edit=scaled_rope)
    with pytest.raises(ModelLoadError, match="Dream checkpoint SinkScope cannot run: .*rope_scaling"):
        load_model(d, device="cpu")
    d = make_dream_dir(tmp_path / "notok")
    for name in ("vocab.json", "merges.txt"):
        (d / name).unlink()
    with pytest.raises(ModelLoadError, match="Could not load a tokenizer"):
        load_model(d, device="cpu")


def test_dream_mask_token_from_tokenizer_when_config_lacks_it(tmp_path):
    d = make_dream_dir(tmp_path / "d", config_edit=lambda c: c.pop("mask_token_id"))
    h = load_model(d, device="cpu")
    assert h.module.config.mask_token_id is None
    assert h.mask_id == h.tokenizer.convert_tokens_to_ids("<|mask|>")


# --- LLaDA-1.5 shaped checkpoints ------------------------------------------------------------------


def test_llada15_checkpoint_loads_as_llada(llada15, llada15_dir):
    assert llada15.family == "llada" and isinstance(llada15.module, LLaDAModelLM) and not llada15.causal
    cfg = llada15.module.config
    assert cfg.embedding_size == cfg.vocab_size + 20 and cfg.rope_theta == 500000.0 and not cfg.weight_tying
    assert llada15.mask_id == llada15.tokenizer.mask_token_id
    x = rand_ids(len(llada15.tokenizer), 12)
    assert llada15.logits(x).shape == (1, 12, cfg.embedding_size)
    direct = LLaDAModelLM.from_pretrained(str(llada15_dir), dtype=torch.float32).eval()
    assert torch.allclose(direct(x).logits, llada15.logits(x), atol=1e-6)


# --- transformers causal LMs ----------------------------------------------------------------------


@pytest.mark.parametrize("name,cls", [("llama", "LlamaForCausalLM"), ("qwen2", "Qwen2ForCausalLM")])
def test_causal_lm_keeps_its_class_and_checkpoint(request, name, cls, tmp_path):
    import transformers

    h = request.getfixturevalue(name)
    d = request.getfixturevalue(f"{name}_dir")
    assert isinstance(h.module, getattr(transformers, cls)) and type(h.module).__name__ == cls
    assert h.causal and h.family == name and h.module.config._attn_implementation == "sinkscope"
    assert set(h.module.state_dict()) == set(load_file(str(d / "model.safetensors")))
    assert all(isinstance(b, HFBlock) for b in h.module.blocks) and h.n_layers == 2 and h.n_heads == 4
    h.module.save_pretrained(str(tmp_path))
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == [cls]
    plain = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    x = rand_ids(len(h.tokenizer), 14)
    assert torch.allclose(plain(x).logits, h.logits(x), atol=1e-5)


def test_mask_id_may_be_none_for_causal(tmp_path):
    d = make_causal_dir(tmp_path / "m")
    tok = json.loads((d / "tokenizer_config.json").read_text())
    tok.pop("mask_token", None)
    (d / "tokenizer_config.json").write_text(json.dumps(tok))
    stm = d / "special_tokens_map.json"
    if stm.exists():
        m = json.loads(stm.read_text())
        m.pop("mask_token", None)
        stm.write_text(json.dumps(m))
    h = load_model(d, device="cpu")
    assert h.mask_id is None and h.causal
    traj = generate(h, h.encode("To be"), DecodeSpec(gen_length=3), recorder=AttentionRecorder())
    assert traj.mask_id == -1 and traj.mass.shape[0] == 3


def test_padded_batch_is_refused_by_capture(llama):
    x = rand_ids(len(llama.tokenizer), 6).repeat(2, 1)
    pad = torch.ones(2, 6, dtype=torch.long)
    pad[1, :2] = 0
    rec = AttentionRecorder()
    rec.start_pass()
    with pytest.raises(DecodeSpecError, match="the inputs come with a padding mask"):
        llama.module(x, attention_mask=pad, attention_recorder=rec)
    llama.module(x, attention_mask=pad)  # without capture: transformers' SDPA with the padding mask


def test_sliding_window_limits_capture(tmp_path):
    h = load_model(make_causal_dir(tmp_path / "m", "mistral", sliding_window=8), device="cpu")
    x = rand_ids(len(h.tokenizer), 12)
    h.logits(x)  # the model's own forward builds the sliding mask: fine
    rec = AttentionRecorder()
    rec.start_pass()
    with pytest.raises(DecodeSpecError, match="but layer 0 attends within a sliding window of 8 tokens and the sequence has 12"):
        h.logits(x, rec)
    with pytest.raises(DecodeSpecError, match="sliding window of 8"):
        h.module.blocks[0](h.module.embed(x))
    short = rand_ids(len(h.tokenizer), 8)
    rec.start_pass()
    h.logits(short, rec)
    assert torch.allclose(rec.end_pass().sum(-1), torch.full((1, 2, 4), 8.0), atol=1e-4)


# --- every family: blocks, capture, generation -----------------------------------------------------


def naive_mass(module: nn.Module, x: torch.Tensor, theta: float, causal: bool) -> torch.Tensor:
    """``[layers, heads, T]`` reference mass from the q/k projections' outputs (forward hooks), with
    RoPE, GQA and the softmax written out here in float64."""
    out, hooks = {}, []
    for i, block in enumerate(module.blocks):
        for name, lin in block.named_modules():
            if name.endswith(("q_proj", "k_proj")):
                hooks.append(lin.register_forward_hook(lambda m, a, y, key=(i, name[-6]): out.__setitem__(key, y)))
    with torch.no_grad():
        module(x)
    for hk in hooks:
        hk.remove()
    T = x.shape[1]
    masses = []
    for i, block in enumerate(module.blocks):
        H, Hkv = block.n_heads, block.n_kv_heads
        q = out[(i, "q")].double().view(1, T, H, -1).transpose(1, 2)
        k = out[(i, "k")].double().view(1, T, Hkv, -1).transpose(1, 2)
        d = q.shape[-1]
        inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
        ang = torch.outer(torch.arange(T, dtype=torch.float64), inv)
        cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()

        def rope(t):
            a, b = t[..., : d // 2], t[..., d // 2 :]
            return t * cos + torch.cat([-b, a], -1) * sin

        q, k = rope(q), rope(k).repeat_interleave(H // Hkv, dim=1)
        s = q @ k.transpose(-1, -2) / math.sqrt(d)
        if causal:
            s = s.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf"))
        masses.append(torch.softmax(s, -1).sum(-2)[0])
    return torch.stack(masses).float()


def rope_theta(h: ModelHandle) -> float:
    cfg = h.module.config
    theta = getattr(cfg, "rope_theta", None)
    return float(theta if theta is not None else cfg.rope_parameters["rope_theta"])


@pytest.mark.parametrize("handle", FAMILIES, indirect=True)
@pytest.mark.parametrize("chunk", [5, 128])
def test_recorded_mass_matches_naive(handle, chunk):
    x = rand_ids(len(handle.tokenizer) - 8, 21, seed=chunk)
    rec = AttentionRecorder(chunk_size=chunk)
    rec.start_pass()
    captured = handle.logits(x, rec)
    mass = rec.end_pass()[0]
    assert mass.shape == (2, 4, 21)
    assert torch.allclose(mass, naive_mass(handle.module, x, rope_theta(handle), handle.causal), atol=1e-4)
    assert torch.allclose(mass.sum(-1), torch.full((2, 4), 21.0), atol=1e-4)
    assert torch.allclose(captured, handle.logits(x), atol=1e-5)  # capture changes nothing


def test_dream_mass_matches_qwen2_eager_maps(dream, dream_dir):
    x = rand_ids(300, 17, seed=3)
    with torch.no_grad():
        maps = qwen2_reference(dream_dir)(x, attention_mask=torch.zeros(1, 1, 17, 17), output_attentions=True).attentions
    rec = AttentionRecorder(chunk_size=4)
    rec.start_pass()
    dream.logits(x, rec)
    assert torch.allclose(rec.end_pass()[0], torch.stack([a[0].sum(-2) for a in maps]), atol=1e-4)


def test_llama_mass_matches_transformers_eager_maps(llama, llama_dir):
    import transformers

    eager = transformers.AutoModelForCausalLM.from_pretrained(str(llama_dir), attn_implementation="eager").eval()
    x = rand_ids(len(llama.tokenizer), 15, seed=4)
    with torch.no_grad():
        maps = eager(x, output_attentions=True).attentions
    rec = AttentionRecorder(chunk_size=6)
    rec.start_pass()
    llama.logits(x, rec)
    assert torch.allclose(rec.end_pass()[0], torch.stack([a[0].sum(-2) for a in maps]), atol=1e-4)


@pytest.mark.parametrize("handle", FAMILIES, indirect=True)
def test_blocks_embed_head_reproduce_forward(handle):
    x = rand_ids(len(handle.tokenizer) - 8, 13, seed=5)
    h = handle.module.embed(x)
    rec = AttentionRecorder()
    rec.start_pass()
    for block in handle.module.blocks:
        h = block(h, rec)
    assert torch.allclose(handle.module.head(h), handle.module(x).logits, atol=1e-5)
    assert torch.allclose(rec.end_pass().sum(-1), torch.full((1, 2, 4), 13.0), atol=1e-4)
    linears = [m for b in handle.module.blocks for m in b.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 2 * 7


@pytest.mark.parametrize("handle", FAMILIES, indirect=True)
def test_generation_with_and_without_recorder(handle):
    prompt = handle.encode("To be, or not")
    P = len(prompt)
    spec = DecodeSpec(gen_length=8, steps=4, block_length=4, temperature=0.0)
    plain = generate(handle, prompt, spec)
    traj = generate(handle, prompt, spec, recorder=AttentionRecorder(chunk_size=3))
    assert plain.mass is None and np.array_equal(plain.final_tokens, traj.final_tokens)
    S = traj.n_steps
    assert traj.mass.shape == (S, 2, 4, P + 8)
    for s in range(S):
        n = int(traj.valid_length[s])
        assert np.allclose(traj.mass[s, ..., :n].sum(-1), n, atol=1e-3)
        assert (traj.mass[s, ..., n:] == 0).all()
    if handle.causal:
        assert S == 8 and list(traj.valid_length) == [P + s for s in range(8)]
        logits = handle.logits(torch.as_tensor(traj.final_tokens[:-1])[None])[0]
        assert np.array_equal(traj.final_tokens[P:], logits[P - 1 :].argmax(-1).numpy())  # greedy = argmax
    else:
        assert S == 4 and (traj.final_tokens != handle.mask_id).all()
    full = attention_map(handle, traj, S - 1, 1, 2)
    assert np.allclose(full.sum(0), traj.mass[S - 1, 1, 2, : full.shape[0]], atol=1e-4)


@pytest.mark.parametrize("handle", ["dream", "llama"], indirect=True)
def test_trajectories_feed_sink_analytics(handle):
    from sap_core import sinks
    from sap_core.sink_report import analyze

    traj = generate(
        handle, handle.encode("To be, or not"), DecodeSpec(gen_length=8, steps=8, block_length=8), recorder=AttentionRecorder()
    )
    report = analyze(traj, sinks.SinkSpec())
    S, L = traj.n_steps, traj.length
    assert report.causal == handle.causal and report.scores.shape == (S, L) and report.layer_scores.shape == (S, 2, L)
    assert np.allclose(report.mass, traj.mass.sum(axis=(1, 2)), rtol=1e-5)  # the same mass, reduced
    for s in range(S):
        n = int(traj.valid_length[s])
        assert report.dominant[s] == int(np.argmax(traj.mass[s, ..., :n].sum(axis=(0, 1))))
        assert np.isnan(report.scores[s, n:]).all() and np.isfinite(report.scores[s, :n]).all()


# --- entropy remasking -----------------------------------------------------------------------------


class FixedLogits(nn.Module):
    """A stand-in model whose logits depend only on the position."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.fixed = logits
        self.config = SimpleNamespace(max_sequence_length=64)

    def forward(self, input_ids, attention_recorder=None):
        return SimpleNamespace(logits=self.fixed[None, : input_ids.shape[1]].expand(input_ids.shape[0], -1, -1))


def test_entropy_remasking_prefers_low_entropy_over_high_top1():
    V = 300
    logits = torch.full((4, V), -30.0)
    logits[:, 5] = 0.0
    # position 2: top-1 probability 0.6, the other 0.4 spread over the whole vocabulary (high entropy)
    logits[2] = math.log(0.4 / (V - 1))
    logits[2, 10] = math.log(0.6)
    # position 3: two tokens at 0.5 each (top-1 lower, entropy ln 2)
    logits[3] = -30.0
    logits[3, 11] = logits[3, 12] = 0.0
    handle = ModelHandle(FixedLogits(logits), None, 0, "fixed", torch.device("cpu"), torch.float32, False, "fixed")
    assert "entropy" in REMASKING
    first = {}
    for remasking in ("low_confidence", "entropy"):
        traj = generate(handle, [5, 5], DecodeSpec(gen_length=2, steps=2, block_length=2, remasking=remasking))
        first[remasking] = int(np.flatnonzero(traj.decoded_at == 0)[0])
        assert math.isclose(traj.confidence[0, first[remasking]], 0.6 if first[remasking] == 2 else 0.5, rel_tol=1e-6)
    assert first == {"low_confidence": 2, "entropy": 3}


def test_entropy_remasking_orders_by_negative_entropy_of_sampling_distribution(dream):
    T = 0.7
    spec = DecodeSpec(gen_length=8, steps=8, block_length=8, remasking="entropy", temperature=T, seed=1, sampler="llada")
    traj = generate(dream, dream.encode("To be, or not"), spec)
    differs = 0
    for s in range(8):
        logits = dream.logits(torch.as_tensor(traj.tokens[s])[None])[0].double()
        p = torch.softmax(logits / T, -1)
        neg_entropy = (p * torch.log(p + 1e-300)).sum(-1)
        masked = np.flatnonzero(traj.tokens[s] == dream.mask_id)
        (chosen,) = np.flatnonzero(traj.decoded_at == s)
        assert chosen == masked[int(neg_entropy[masked].argmax())]
        differs += chosen != masked[int(torch.softmax(logits, -1)[masked].max(-1).values.argmax())]
    assert differs > 0  # on this model the entropy order is not the confidence order


# --- placement over devices ------------------------------------------------------------------------


class FakeHook:
    def __init__(self, execution_device):
        self.execution_device = execution_device


def test_execution_device_rule():
    lin = nn.Linear(2, 2)
    assert placement.execution_device(lin) == torch.device("cpu")
    lin.to("meta")
    assert placement.execution_device(lin) == torch.device("meta")  # plain parameters: their device
    lin._hf_hook = FakeHook(1)  # accelerate writes GPU indices as ints
    assert placement.execution_device(lin) == torch.device("cuda", 1)
    wrapper = nn.Sequential(nn.Identity(), lin)  # a hook on a submodule counts for the parent
    assert placement.execution_device(wrapper) == torch.device("cuda", 1)
    lin._hf_hook = SimpleNamespace(hooks=[SimpleNamespace(), FakeHook("cpu")])  # SequentialHook
    assert placement.execution_device(lin) == torch.device("cpu")
    assert placement.execution_device(nn.Identity()) == torch.device("cpu")


@pytest.mark.parametrize("handle", ["dream", "llada15"], indirect=True)
def test_hidden_state_follows_each_blocks_device(handle):
    """Last block and head on another device ("meta": shapes only): the forward moves the hidden state to
    it, so the logits come out there with the right shape. Without the move it would raise."""
    module = LLaDAModelLM(handle.module.config) if handle.family == "llada" else DreamModel(handle.module.config)
    module.eval()
    x = rand_ids(100, 9)
    with pytest.raises((RuntimeError, NotImplementedError)):  # the failure the moves prevent
        module.blocks[-1].to("meta")(module.embed(x))
    llada = handle.family == "llada"
    tail = [module.model.transformer.ln_f, module.model.transformer.ff_out] if llada else [module.model.norm, module.lm_head]
    for part in [module.blocks[-1], *tail]:
        part.to("meta")
    assert placement.block_devices(module) == [torch.device("cpu"), torch.device("meta")]
    with torch.no_grad():
        out = module(x).logits
    vocab = module.config.padded_vocab_size if llada else module.config.vocab_size
    assert out.device.type == "meta" and out.shape == (1, 9, vocab)


def test_hf_block_moves_hidden_to_its_layer(llama):
    import copy

    module = copy.deepcopy(llama.module)
    module.blocks[1].layer.to("meta")
    x = rand_ids(100, 7)
    h = module.blocks[0](module.embed(x))
    assert h.device.type == "cpu"
    assert module.blocks[1](h).device.type == "meta"


def offload_map(family: str) -> dict[str, str]:
    """Second block offloaded to disk (its parameters on meta, run on the CPU by accelerate)."""
    if family == "llada":
        names = ["model.transformer.wte", "model.transformer.blocks.0", "model.transformer.ln_f", "model.transformer.ff_out"]
        last = "model.transformer.blocks.1"
    elif family == "Dream":
        names, last = ["model.embed_tokens", "model.layers.0", "model.norm", "lm_head"], "model.layers.1"
    else:
        names = ["model.embed_tokens", "model.layers.0", "model.norm", "model.rotary_emb", "lm_head"]
        last = "model.layers.1"
    return {**{n: "cpu" for n in names}, last: "disk"}


@pytest.mark.parametrize("handle", FAMILIES, indirect=True)
def test_disk_offloaded_block_runs_like_resident(handle):
    """A real multi-placement run on CPU: one block's weights on disk (parameters on meta), executed
    on the CPU by accelerate's hook. Logits, capture and generation match the resident model."""
    off = load_model(handle.source, device="cpu", device_map=offload_map(handle.family))
    assert placement.is_offloaded(off.module) and off.device == torch.device("cpu")
    assert placement.block_devices(off.module) == [torch.device("cpu")] * 2
    x = rand_ids(len(handle.tokenizer) - 8, 11)
    assert torch.allclose(off.logits(x), handle.logits(x), atol=1e-5)
    spec = DecodeSpec(gen_length=4, steps=4, block_length=4)
    a = generate(off, handle.encode("To be"), spec, recorder=AttentionRecorder())
    b = generate(handle, handle.encode("To be"), spec, recorder=AttentionRecorder())
    assert np.array_equal(a.final_tokens, b.final_tokens) and np.allclose(a.mass, b.mass, atol=1e-5)


@pytest.mark.parametrize("handle", ["dream", "llama"], indirect=True)
def test_an_offloaded_model_is_refused_before_pruning_swapping_or_saving(handle, tmp_path):
    """Pruning reads every weight and a variant writes them, but a disk-offloaded block's parameters are meta
    placeholders: each is refused up front with what to do, and nothing is changed or written."""
    from sap_core.errors import OffloadedModelError
    from sap_core.pruning import PruneSpec, prune

    off = load_model(handle.source, device="cpu", device_map=offload_map(handle.family))
    before = {n: p.detach().clone() for n, p in off.module.named_parameters() if p.device.type != "meta"}
    calls = []
    for method in ("magnitude", "wanda"):
        with pytest.raises(OffloadedModelError, match="Cannot prune this model: .* offloaded .* Load it without offload"):
            prune(off, PruneSpec(method, 0.5), progress=lambda *a: calls.append(a))
    assert calls == []  # refused before the first step
    variant = prune(handle, PruneSpec("magnitude", 0.5))  # pruned on the resident model
    with pytest.raises(OffloadedModelError, match="put pruned weights"):
        with variant.applied(off):
            pass
    with pytest.raises(OffloadedModelError, match="put pruned weights"):
        variant.apply_to_copy(off)
    with pytest.raises(OffloadedModelError, match="save a pruned variant"):
        variant.save(tmp_path / "variant", off)
    assert list(tmp_path.iterdir()) == []
    after = dict(off.module.named_parameters())
    assert all(torch.equal(after[n], w) for n, w in before.items())
    x = rand_ids(len(handle.tokenizer) - 8, 11)
    assert torch.allclose(off.logits(x), handle.logits(x), atol=1e-5)  # still the dense model


@pytest.mark.parametrize("name", ["dream", "llama"])
def test_accelerate_dispatched_model_generates_and_prunes_identically(request, name):
    """Blocks behind accelerate's device hooks (as device_map="auto" leaves them on a multi-GPU box; here
    every hook executes on the CPU): generation, capture and pruning give the resident model's results."""
    from accelerate import dispatch_model

    resident = request.getfixturevalue(name)
    h = load_model(resident.source, device="cpu")
    dispatch_model(h.module, device_map={k: "cpu" for k in offload_map(h.family)}, force_hooks=True)
    layers = [getattr(b, "layer", b) for b in h.module.blocks]
    assert [placement.hook_device(m) for m in layers] == [torch.device("cpu")] * 2
    spec = DecodeSpec(gen_length=4, steps=4, block_length=4)
    a = generate(h, resident.encode("To be"), spec, recorder=AttentionRecorder())
    b = generate(resident, resident.encode("To be"), spec, recorder=AttentionRecorder())
    assert np.array_equal(a.final_tokens, b.final_tokens) and np.allclose(a.mass, b.mass, atol=1e-6)
    cal = pruning.CalibrationSpec(
        text=" ".join(["To be, or not to be, that is the question."] * 20), nsamples=2, seqlen=24, T=10, interval=5
    )
    for method in ("wanda", "sink_wanda"):
        va = pruning.prune(h, pruning.PruneSpec(method, 0.5, calibration=cal))
        vb = pruning.prune(resident, pruning.PruneSpec(method, 0.5, calibration=cal))
        assert va.weights.keys() == vb.weights.keys()
        assert all(torch.allclose(va.weights[k], vb.weights[k], atol=1e-6) for k in va.weights)


def test_device_map_auto_on_cpu(dream_dir, dream):
    h = load_model(dream_dir, device="cpu", device_map="auto")
    x = rand_ids(300, 9)
    assert h.device == torch.device("cpu") and torch.allclose(h.logits(x), dream.logits(x), atol=1e-6)


def scored_positions(shape: tuple[int, int], seed: int = 0) -> torch.Tensor:
    """A bool ``[B, T]`` mask with a different number of True entries per row, position 0 among them."""
    m = torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < torch.linspace(0.2, 0.9, shape[0])[:, None]
    m[0, 0] = True
    return m


@pytest.mark.parametrize("handle", FAMILIES + ["tiny_dlm", "tiny_ar"], indirect=True)
def test_logits_at_positions_are_the_full_logits_there(handle):
    """``logits(x, positions=m)`` is ``logits(x)[m]``: head at the chosen positions only (LLaDA, Dream: with
    Dream's shift applied before the head) or the full logits indexed (transformers causal LMs)."""
    x = torch.cat([rand_ids(len(handle.tokenizer) - 8, 13, seed) for seed in range(3)])
    m = scored_positions(x.shape)
    full = handle.logits(x)
    got = handle.logits(x, positions=m)
    assert got.shape == (int(m.sum()), full.shape[-1])
    torch.testing.assert_close(got, full[m], rtol=1e-5, atol=1e-5)
    if handle.family == "Dream":  # index i of the aligned logits is the raw logits at i - 1
        second = int(m[0].nonzero()[1, 0])  # the second chosen position of row 0 (the first is position 0)
        torch.testing.assert_close(got[1], handle.module(x).logits[0, second - 1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("handle", ["dream", "llada15"], indirect=True)
def test_logits_at_positions_on_an_offloaded_model(handle):
    off = load_model(handle.source, device="cpu", device_map=offload_map(handle.family))
    x = torch.cat([rand_ids(len(handle.tokenizer) - 8, 11, seed) for seed in range(2)])
    m = scored_positions(x.shape, seed=1)
    torch.testing.assert_close(off.logits(x, positions=m), handle.logits(x)[m], rtol=1e-5, atol=1e-5)


def test_dream_perplexity_with_the_head_at_masked_positions_equals_the_full_logits_way(dream):
    from sap_core.evaluate import diffusion_perplexity

    text = " ".join(["To be, or not to be, that is the question."] * 30)
    new = diffusion_perplexity(dream, text, seqlen=24, nsamples=3, draws=4, seed=2, batch_size=5)
    ref = diffusion_perplexity(dream, text, seqlen=24, nsamples=3, draws=4, seed=2, batch_size=5, _all_positions=True)
    np.testing.assert_allclose(new.estimates, ref.estimates, rtol=1e-5)
    assert new.nll == pytest.approx(ref.nll, rel=1e-5) and np.isfinite(new.estimates).all()


# --- errors ----------------------------------------------------------------------------------------


def test_wrong_family_directory_gets_clear_error(tmp_path, llada15_dir):
    import transformers

    gpt2 = tmp_path / "gpt2"
    transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64)).save_pretrained(
        str(gpt2)
    )
    known = ", ".join(sorted(FAMILY_LOADERS))
    assert "Dream" in known and "llama" in known and "qwen2" in known
    with pytest.raises(ModelLoadError, match=f"'gpt2' model; SinkScope knows the families: {known}"):
        load_model(gpt2, device="cpu")
    # config.json says Dream, the weights are LLaDA's: refused, not silently re-initialised
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for f in llada15_dir.iterdir():
        if f.suffix in (".safetensors", ".json") and f.name != "config.json":
            (mixed / f.name).write_bytes(f.read_bytes())
    make_dream_dir(tmp_path / "dream-config")
    (mixed / "config.json").write_text((tmp_path / "dream-config" / "config.json").read_text())
    for name in ("vocab.json", "merges.txt"):
        (mixed / name).write_bytes((tmp_path / "dream-config" / name).read_bytes())
    with pytest.raises(ModelLoadError, match="says model_type 'Dream' but its weights lack"):
        load_model(mixed, device="cpu")


# --- pruning on every family -----------------------------------------------------------------------

PRUNE_CASES = [(family, method) for family in FAMILIES for method in ("wanda", "sink_wanda", "sparsegpt")] + [
    ("dream", method) for method in ("magnitude", "sink_sparsegpt", "gated_sink_wanda", "gated_sink_sparsegpt", "noised_wanda")
]


@pytest.mark.parametrize("handle,method", PRUNE_CASES, indirect=["handle"])
def test_every_family_prunes(handle, method):
    if method.startswith("sink") and handle.mask_id is None:
        pytest.skip("no mask token")
    text = " ".join(["To be, or not to be, that is the question."] * 20)
    cal = pruning.CalibrationSpec(text=text, nsamples=2, seqlen=24, T=10, interval=5)
    before = {k: v.clone() for k, v in handle.module.state_dict().items()}
    variant = pruning.prune(handle, pruning.PruneSpec(method, 0.5, calibration=cal))
    assert abs(variant.achieved_sparsity - 0.5) < 0.02
    for name, w in variant.weights.items():
        assert name in before and w.shape == before[name].shape
    assert all(torch.equal(before[k], v) for k, v in handle.module.state_dict().items())  # dense intact
    x = rand_ids(len(handle.tokenizer) - 8, 10)
    with variant.applied(handle):
        pruned = handle.logits(x)
    assert not torch.allclose(pruned, handle.logits(x), atol=1e-4)


# --- GPU check script ------------------------------------------------------------------------------


def test_gpu_check_runs_tiny(capsys, monkeypatch):
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_check", gpu_check)  # dataclasses look their module up
    spec.loader.exec_module(gpu_check)
    assert gpu_check.LLADA_8B.d_model == 4096 and gpu_check.LLADA_8B.vocab_size == 126464
    assert gpu_check.main(["--tiny", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "ratio capture/plain:" in out and "generation L=32, 8 steps" in out
    assert "ratio sink_wanda/wanda:" in out and "sparsegpt 50% on one block (7 linears" in out


@pytest.mark.parametrize("family", ["dream", "mmada"])
def test_gpu_check_covers_dream_and_mmada_shapes(family, capsys, monkeypatch):
    """The released shapes, built on the meta device (no memory): their parameter counts (Dream-v0-7B is
    Qwen2.5-7B's 7.62 B; MMaDA-8B is LLaDA-8B's 8.02 B plus 8192 image rows in the embedding and the head);
    and the tiny shape of the family runs end to end on CPU."""
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_check", gpu_check)
    spec.loader.exec_module(gpu_check)
    full, _ = gpu_check.SHAPES[family]
    h = gpu_check.build(full, torch.device("meta"), torch.bfloat16)
    expected = {"dream": (7_615_616_512, 28, 28, 151666), "mmada": (8_082_690_048, 32, 32, 126336)}[family]
    assert (h.n_params, h.n_layers, h.n_heads, h.mask_id) == expected
    if family == "mmada":
        llada = gpu_check.build(gpu_check.LLADA_8B, torch.device("meta"), torch.bfloat16)
        assert h.n_params - llada.n_params == 2 * 8192 * 4096  # the image rows of the embedding and the head
    assert gpu_check.main(["--tiny", "--repeats", "1", "--family", family]) == 0
    out = capsys.readouterr().out
    assert f"random tiny {'Dream' if family == 'dream' else 'MMaDA'} shape" in out and "ratio sink_wanda/wanda:" in out
