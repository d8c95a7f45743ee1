"""Core runtime: LLaDA model family, loader, sampler and attention capture (issue 2)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import make_model_dir
from safetensors.torch import load_file

from sap_core.attention import AttentionRecorder
from sap_core.decoding import DecodeSpec, transfer_schedule
from sap_core.diffusion import attention_map, generate
from sap_core.errors import DecodeSpecError, ModelLoadError
from sap_core.models import load_model
from sap_core.models.llada import LLaDAConfig, LLaDAModelLM

LLADA_KEYS = {"wte", "ln_f", "ff_out"}
BLOCK_KEYS = {"q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out", "attn_norm", "ff_norm"}


def ids(handle, n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, len(handle.tokenizer), (1, n), generator=g)


# --- model family and loader -------------------------------------------------------------------


def test_checkpoint_uses_llada_names_and_round_trips(tiny_dlm, tiny_dlm_dir, tmp_path):
    keys = set(load_file(str(tiny_dlm_dir / "model.safetensors")))
    assert "model.transformer.wte.weight" in keys and "model.transformer.ln_f.weight" in keys
    assert "model.transformer.ff_out.weight" in keys
    for name in BLOCK_KEYS:
        assert f"model.transformer.blocks.1.{name}.weight" in keys
    config = json.loads((tiny_dlm_dir / "config.json").read_text())
    for key in (
        "d_model",
        "n_heads",
        "n_kv_heads",
        "n_layers",
        "mlp_hidden_size",
        "vocab_size",
        "max_sequence_length",
        "rope_theta",
        "rms_norm_eps",
        "include_bias",
        "include_qkv_bias",
        "weight_tying",
        "mask_token_id",
    ):
        assert key in config
    x = ids(tiny_dlm)
    before = tiny_dlm.logits(x)
    tiny_dlm.module.save_pretrained(str(tmp_path))
    tiny_dlm.tokenizer.save_pretrained(str(tmp_path))
    again = load_model(tmp_path, device="cpu")
    assert torch.allclose(before, again.logits(x), atol=1e-6)


def test_weight_tying_has_no_separate_head(tmp_path):
    d = make_model_dir(tmp_path, weight_tying=True)
    assert "model.transformer.ff_out.weight" not in load_file(str(d / "model.safetensors"))
    h = load_model(d, device="cpu")
    assert h.logits(ids(h)).shape[-1] == h.module.config.padded_vocab_size


def test_sharded_checkpoint_loads(tiny_dlm, tmp_path):
    tiny_dlm.module.save_pretrained(str(tmp_path), max_shard_size="30KB")
    tiny_dlm.tokenizer.save_pretrained(str(tmp_path))
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    x = ids(tiny_dlm)
    assert torch.allclose(load_model(tmp_path, device="cpu").logits(x), tiny_dlm.logits(x), atol=1e-6)


def test_automodel_loads_without_remote_code(tiny_dlm_dir):
    from transformers import AutoModel

    config = json.loads((tiny_dlm_dir / "config.json").read_text())
    config["auto_map"] = {"AutoModel": "modeling_llada.LLaDAModelLM"}  # as in released checkpoints
    (tiny_dlm_dir / "config.json").write_text(json.dumps(config))
    assert isinstance(AutoModel.from_pretrained(str(tiny_dlm_dir)), LLaDAModelLM)


@pytest.mark.parametrize("dtype,tol", [("bfloat16", 0.1), ("float16", 0.02)])
def test_half_precision_matches_fp32(tiny_dlm_dir, tiny_dlm, dtype, tol):
    half = load_model(tiny_dlm_dir, device="cpu", dtype=dtype)
    assert half.dtype == getattr(torch, dtype)
    x = ids(tiny_dlm)
    ref = torch.softmax(tiny_dlm.logits(x), -1)
    got = torch.softmax(half.logits(x).float(), -1)
    assert (ref - got).abs().max() < tol
    rec = AttentionRecorder()
    rec.start_pass()
    half.logits(x, rec)
    assert torch.allclose(rec.end_pass().sum(-1), torch.full((1, 2, 4), 24.0), atol=1e-3)


def test_loader_errors(tmp_path, tiny_dlm_dir):
    with pytest.raises(ModelLoadError, match="No model at"):
        load_model(tmp_path / "nope")
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ModelLoadError, match="'bert' model; SinkScope knows the families: .*llada"):
        load_model(tmp_path)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((tiny_dlm_dir / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"not really")
    with pytest.raises(ModelLoadError, match="only pickled weights.*arbitrary code"):
        load_model(pickled)
    nomask = make_model_dir(tmp_path / "nomask", mask_token_id=None)
    tok = json.loads((nomask / "tokenizer_config.json").read_text())
    tok.pop("mask_token", None)
    (nomask / "tokenizer_config.json").write_text(json.dumps(tok))
    stm = nomask / "special_tokens_map.json"
    if stm.exists():
        m = json.loads(stm.read_text())
        m.pop("mask_token", None)
        stm.write_text(json.dumps(m))
    with pytest.raises(ModelLoadError, match="Cannot determine the \\[MASK\\] token"):
        load_model(nomask)
    with pytest.raises(ModelLoadError, match="Unknown dtype"):
        load_model(tiny_dlm_dir, dtype="int3")


# --- attention capture -------------------------------------------------------------------------


def naive_mass(model: LLaDAModelLM, x: torch.Tensor) -> torch.Tensor:
    """Full-softmax reference: [layers, heads, L] mass per key, via hooks on the block inputs."""
    out = []
    h = model.embed(x)
    for block in model.blocks:
        n = block.attn_norm(h)
        B, T, _ = n.shape
        q = block.rotary.apply(block.q_proj(n).view(B, T, block.n_heads, -1).transpose(1, 2))
        k = block.rotary.apply(block.k_proj(n).view(B, T, block.n_kv_heads, -1).transpose(1, 2))
        k = k.repeat_interleave(block.n_heads // block.n_kv_heads, dim=1)
        s = q.double() @ k.double().transpose(-1, -2) / math.sqrt(q.shape[-1])
        if block.causal:
            s = s.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf"))
        out.append(torch.softmax(s, -1).sum(-2)[0])
        h = block(h)
    return torch.stack(out).float()


@pytest.mark.parametrize("causal,kv_heads,chunk", [(False, 4, 5), (False, 2, 64), (True, 1, 7)])
def test_recorded_mass_matches_naive(tmp_path, causal, kv_heads, chunk):
    h = load_model(make_model_dir(tmp_path, causal=causal, n_kv_heads=kv_heads), device="cpu")
    x = ids(h, 30)
    rec = AttentionRecorder(chunk_size=chunk)
    rec.start_pass()
    with_capture = h.logits(x, rec)
    mass = rec.end_pass()[0]
    assert mass.shape == (2, 4, 30) and mass.dtype == torch.float32
    assert torch.allclose(mass, naive_mass(h.module, x), atol=1e-5)
    assert torch.allclose(mass.sum(-1), torch.full((2, 4), 30.0), atol=1e-4)
    assert torch.allclose(with_capture, h.logits(x), atol=1e-5)  # capture does not change the output


def test_gqa_equals_repeated_key_heads(tmp_path):
    gqa = LLaDAModelLM(
        LLaDAConfig(d_model=32, n_heads=4, n_kv_heads=2, n_layers=2, mlp_hidden_size=64, vocab_size=50, mask_token_id=49)
    ).eval()
    full = LLaDAModelLM(
        LLaDAConfig(d_model=32, n_heads=4, n_kv_heads=4, n_layers=2, mlp_hidden_size=64, vocab_size=50, mask_token_id=49)
    ).eval()
    state = gqa.state_dict()
    for key, value in list(state.items()):
        if key.endswith(("k_proj.weight", "v_proj.weight")):  # [kv_heads*hd, d] -> repeat each head
            state[key] = value.view(2, 8, 32).repeat_interleave(2, dim=0).reshape(32, 32)
    full.load_state_dict(state)
    x = torch.randint(0, 49, (2, 12))
    with torch.no_grad():
        assert torch.allclose(gqa(x).logits, full(x).logits, atol=1e-5)
        r1, r2 = AttentionRecorder(), AttentionRecorder()
        r1.start_pass()
        gqa(x, attention_recorder=r1)
        r2.start_pass()
        full(x, attention_recorder=r2)
        assert torch.allclose(r1.end_pass(), r2.end_pass(), atol=1e-5)


def test_causal_logits_ignore_the_future(tiny_ar):
    x = ids(tiny_ar, 20)
    y = x.clone()
    y[0, 12:] = torch.randint(4, 200, (8,))
    a, b = tiny_ar.logits(x), tiny_ar.logits(y)
    assert torch.allclose(a[0, :12], b[0, :12], atol=1e-5)
    assert not torch.allclose(a[0, 12:], b[0, 12:], atol=1e-3)


# --- sampler -----------------------------------------------------------------------------------


def test_transfer_schedule_is_even_with_remainder_first():
    assert transfer_schedule(10, 4) == [3, 3, 2, 2]
    assert transfer_schedule(8, 8) == [1] * 8
    assert sum(transfer_schedule(13, 5)) == 13


@pytest.mark.parametrize(
    "remasking,temperature,cfg", [("low_confidence", 0.0, 0.0), ("random", 0.8, 0.0), ("low_confidence", 0.7, 1.5)]
)
def test_sampler_invariants(tiny_dlm, remasking, temperature, cfg):
    spec = DecodeSpec(
        gen_length=24, steps=12, block_length=8, remasking=remasking, temperature=temperature, cfg_scale=cfg, seed=3
    )
    prompt = tiny_dlm.encode("To be, or not")
    P = len(prompt)
    traj = generate(tiny_dlm, prompt, spec, recorder=AttentionRecorder())
    mask = tiny_dlm.mask_id
    assert traj.tokens.shape == (12, P + 24) and traj.mass.shape == (12, 2, 4, P + 24)
    assert (traj.final_tokens != mask).all()
    steps_per_block = 12 // 3
    for s in range(12):
        assert (traj.tokens[s, :P] == prompt).all()  # prompt untouched
        assert (traj.decoded_at == s).sum() == 2  # 8 tokens per block over 4 steps
        block = s // steps_per_block
        decoded_now = np.flatnonzero(traj.decoded_at == s)
        assert ((decoded_now >= P + 8 * block) & (decoded_now < P + 8 * (block + 1))).all()  # blocks in order
        assert (traj.tokens[s][decoded_now] == mask).all()
        nxt = traj.tokens[s + 1] if s + 1 < 12 else traj.final_tokens
        known = traj.tokens[s] != mask
        assert (nxt[known] == traj.tokens[s][known]).all()  # never remasked
        assert (nxt[decoded_now] == traj.final_tokens[decoded_now]).all()
        assert np.isfinite(traj.confidence[s, decoded_now]).all()
    assert np.allclose(traj.mass.sum(-1), P + 24, atol=1e-3)
    again = generate(tiny_dlm, prompt, spec, recorder=AttentionRecorder())
    assert (again.tokens == traj.tokens).all() and np.array_equal(again.mass, traj.mass)
    assert traj.mass is not None and generate(tiny_dlm, prompt, spec).mass is None


def test_sampler_uneven_schedule(tiny_dlm):
    traj = generate(tiny_dlm, [5, 6], DecodeSpec(gen_length=10, steps=4, block_length=10))
    counts = [(traj.decoded_at == s).sum() for s in range(4)]
    assert counts == [3, 3, 2, 2]


def test_different_seeds_differ_when_sampling(tiny_dlm):
    a = generate(tiny_dlm, [5, 6], DecodeSpec(gen_length=16, steps=16, temperature=1.0, seed=1))
    b = generate(tiny_dlm, [5, 6], DecodeSpec(gen_length=16, steps=16, temperature=1.0, seed=2))
    assert not np.array_equal(a.final_tokens, b.final_tokens)


def test_causal_decodes_token_by_token(tiny_ar):
    prompt = tiny_ar.encode("To be")
    P = len(prompt)
    traj = generate(tiny_ar, prompt, DecodeSpec(gen_length=6, temperature=0.5), recorder=AttentionRecorder())
    assert traj.n_steps == 6 and traj.causal
    assert list(traj.valid_length) == [P + s for s in range(6)]
    assert list(traj.decoded_at[P:]) == list(range(6))
    for s in range(6):
        assert np.allclose(traj.mass[s].sum(-1), P + s, atol=1e-4)
        assert (traj.mass[s, ..., P + s :] == 0).all()


def test_attention_map_replays_the_step(tiny_dlm):
    traj = generate(
        tiny_dlm,
        [5, 6, 7],
        DecodeSpec(gen_length=16, steps=8, block_length=8, temperature=0.5),
        recorder=AttentionRecorder(chunk_size=4),
    )
    full = attention_map(tiny_dlm, traj, 5, 1, 3)
    assert full.shape == (19, 19)
    assert np.allclose(full.sum(-1), 1.0, atol=1e-5)
    assert np.allclose(full.sum(0), traj.mass[5, 1, 3], atol=1e-5)
    with pytest.raises(DecodeSpecError, match="step must be in"):
        attention_map(tiny_dlm, traj, 8, 0, 0)


def test_trajectory_save_load(tiny_dlm, tmp_path):
    traj = generate(tiny_dlm, "To be", DecodeSpec(gen_length=8, steps=8, block_length=8), recorder=AttentionRecorder())
    traj.save(tmp_path / "t.npz")
    back = type(traj).load(tmp_path / "t.npz")
    assert back.spec == traj.spec and back.prompt == "To be"
    assert np.array_equal(back.mass, traj.mass) and np.array_equal(back.tokens, traj.tokens)


@pytest.mark.parametrize(
    "spec,message",
    [
        (DecodeSpec(gen_length=30, steps=10, block_length=8), "divisible by block_length"),
        (DecodeSpec(gen_length=32, steps=10, block_length=8), "divisible by the number of blocks"),
        (DecodeSpec(gen_length=16, steps=32, block_length=16), "cannot exceed gen_length"),
        (DecodeSpec(gen_length=0), "at least 1"),
        (DecodeSpec(gen_length=16, steps=16, temperature=-1), "temperature"),
        (DecodeSpec(gen_length=16, steps=16, remasking="best"), "remasking must be one of"),
        (DecodeSpec(gen_length=16, steps=16, cfg_scale=-0.5), "cfg_scale"),
        (DecodeSpec(gen_length=512, steps=64, block_length=64), "max_sequence_length"),
    ],
)
def test_impossible_decode_settings(tiny_dlm, spec, message):
    with pytest.raises(DecodeSpecError, match=message):
        generate(tiny_dlm, [5], spec)


def test_causal_decode_errors(tiny_ar):
    with pytest.raises(DecodeSpecError, match="at least one prompt token"):
        generate(tiny_ar, [], DecodeSpec(gen_length=4))
    with pytest.raises(DecodeSpecError, match="guidance"):
        generate(tiny_ar, [5], DecodeSpec(gen_length=4, cfg_scale=1.0))


def test_cli_offers_every_remasking_rule(capsys):
    from sap_core.cli import build_parser
    from sap_core.decoding import REMASKING

    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "--help"])
    assert "{" + ",".join(REMASKING) + "}" in capsys.readouterr().out.replace("\n", "").replace(" ", "")
