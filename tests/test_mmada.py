"""MMaDA as a text DLM (issue 29, item 4): loading a released-format directory, the forward pass and MMaDA's own
text sampler checked against transcriptions of the official code, the text-only option, capture and pruning.

The references below are transcriptions written for these tests from Gen-Verse/MMaDA at commit
20ce285181bda7382d255565454dcc9a5d9bbe6f (the file versions are unchanged at 3cdb8709635beb29f66e4e23cd66060872ac3996
except for an unrelated line of ``t2i_generate``):

* ``official_logits``: ``models/modeling_llada.py`` ``LLaDAModel.forward`` with ``LLaDALlamaBlock`` (the class
  ``MMadaModelLM`` of ``models/modeling_mmada.py`` inherits), no attention bias, as ``mmu_generate`` calls it;
* ``official_generate``: ``generate.py`` ``generate`` (the same loop as ``MMadaModelLM.mmu_generate``), with its
  ``add_gumbel_noise`` (``exp(logits) / (-log u)^T`` on the global RNG) and ``get_num_transfer_tokens``;
* ``OFFICIAL_CHAT_TEMPLATE``: the template ``generate.py`` and ``app.py`` set on the tokenizer.

The checkpoint is tiny and random but in the released format: LLaDA's config keys plus MMaDA's, the
``model.transformer.*`` parameter names, LLaDA-style tokenizer files, a vocabulary of text rows followed by
"image" rows, and decoy remote-code files that raise if imported.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import make_tokenizer
from safetensors.torch import load_file

from sap_core import pruning
from sap_core.attention import AttentionRecorder
from sap_core.decoding import DecodeSpec, Trajectory
from sap_core.diffusion import attention_map, generate
from sap_core.errors import DecodeSpecError, ModelLoadError
from sap_core.models import load_model
from sap_core.models.llada import LLaDAConfig, LLaDAModelLM
from sap_core.models.mmada import MMadaModelLM

DECOY = "raise RuntimeError('remote code from the checkpoint directory was executed')\n"
CODEBOOK = 12  # "image" rows after the text rows (8192 in the released models)
OFFICIAL_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n' }}"
)


def make_mmada_dir(path: Path, seed: int = 0, config_edit=None) -> Path:
    """A tiny random MMaDA checkpoint: LLaDA's weights and keys with ``codebook_size`` image rows appended.
    The image rows of the head are scaled up so that unrestricted decoding picks image tokens at some positions."""
    path.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer()
    tok.save_pretrained(str(path))
    text_rows = len(tok)
    rows = text_rows + CODEBOOK
    torch.manual_seed(seed)
    model = LLaDAModelLM(
        LLaDAConfig(
            d_model=32,
            n_heads=4,
            n_kv_heads=4,
            n_layers=2,
            mlp_hidden_size=96,
            vocab_size=rows,
            embedding_size=rows,
            mask_token_id=tok.mask_token_id,
        )
    )
    with torch.no_grad():
        model.model.transformer.ff_out.weight[text_rows:] *= 6.0
    model.save_pretrained(str(path))
    config = {
        "activation_type": "silu",
        "alibi": False,
        "alibi_bias_max": 8.0,
        "architectures": ["MMadaModelLM"],
        "attention_dropout": 0.0,
        "attention_layer_norm": False,
        "attention_layer_norm_with_affine": True,
        "bias_for_layer_norm": False,
        "block_group_size": 1,
        "block_type": "llama",
        "codebook_size": CODEBOOK,
        "d_model": 32,
        "embedding_dropout": 0.0,
        "embedding_size": rows,
        "eos_token_id": tok.eos_token_id,
        "flash_attention": False,
        "gradient_checkpointing": True,
        "include_bias": False,
        "include_qkv_bias": False,
        "init_cutoff_factor": None,
        "init_device": "meta",
        "init_fn": "mitchell",
        "init_std": 0.02,
        "input_emb_norm": False,
        "layer_norm_type": "rms",
        "layer_norm_with_affine": True,
        "llm_model_path": "GSAI-ML/LLaDA-8B-Instruct",
        "llm_vocab_size": text_rows,
        "mask_token_id": tok.mask_token_id,
        "max_sequence_length": 256,
        "mlp_hidden_size": 96,
        "mlp_ratio": 4,
        "model_type": "mmada",
        "multi_query_attention": None,
        "n_heads": 4,
        "n_kv_heads": 4,
        "n_layers": 2,
        "new_vocab_size": rows,
        "num_new_special_tokens": 0,
        "num_vq_tokens": 256,
        "pad_token_id": tok.pad_token_id,
        "precision": "amp_bf16",
        "residual_dropout": 0.0,
        "rms_norm_eps": 1e-05,
        "rope": True,
        "rope_full_precision": True,
        "rope_theta": 500000.0,
        "scale_logits": False,
        "torch_dtype": "float32",
        "use_cache": False,
        "vocab_size": rows,
        "w_clip_vit": False,
        "weight_tying": False,
    }
    if config_edit is not None:
        config_edit(config)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    for name in ("configuration_llada.py", "modeling_llada.py", "modeling_mmada.py"):
        (path / name).write_text(DECOY)
    return path


@pytest.fixture(scope="module")
def mmada_dir(tmp_path_factory) -> Path:
    return make_mmada_dir(tmp_path_factory.mktemp("mmada"))


@pytest.fixture(scope="module")
def mmada(mmada_dir):
    return load_model(mmada_dir, device="cpu", dtype="float32")


# --- transcriptions of the official code ----------------------------------------------------------


def official_logits(state: dict, cfg: dict, ids: torch.Tensor) -> torch.Tensor:
    """LLaDAModel.forward + LLaDALlamaBlock.forward (modeling_llada.py), no attention bias, float32."""
    p = "model.transformer."
    nh, d = cfg["n_heads"], cfg["d_model"]
    hs = d // nh

    def rms(x, w):
        x32 = x.to(torch.float32)
        return w * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + cfg["rms_norm_eps"])).to(x.dtype)

    def rotate_half(t):
        B, n, T, h = t.size()
        t1, t2 = t.view(B, n, T, 2, h // 2).unbind(dim=-2)
        return torch.cat((-t2, t1), dim=-1)

    T = ids.shape[1]
    inv_freq = 1.0 / (cfg["rope_theta"] ** (torch.arange(0, hs, 2, dtype=torch.float) / hs))
    freqs = torch.einsum("i , j -> i j", torch.arange(T, dtype=torch.float), inv_freq)
    positions = torch.cat((freqs, freqs), dim=-1)
    sin, cos = positions.sin()[None, None], positions.cos()[None, None]
    x = F.embedding(ids, state[p + "wte.weight"])
    for i in range(cfg["n_layers"]):
        b = f"{p}blocks.{i}."
        xn = rms(x, state[b + "attn_norm.weight"])
        q, k, v = (F.linear(xn, state[b + n + "_proj.weight"]) for n in "qkv")
        B = q.shape[0]
        q, k, v = (t.view(B, T, nh, hs).transpose(1, 2) for t in (q, k, v))
        q, k = ((t.float() * cos) + (rotate_half(t.float()) * sin) for t in (q, k))
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False)
        x = x + F.linear(att.transpose(1, 2).contiguous().view(B, T, d), state[b + "attn_out.weight"])
        h = rms(x, state[b + "ff_norm.weight"])
        h = F.silu(F.linear(h, state[b + "ff_proj.weight"])) * F.linear(h, state[b + "up_proj.weight"])
        x = x + F.linear(h, state[b + "ff_out.weight"])
    return F.linear(rms(x, state[p + "ln_f.weight"]), state[p + "ff_out.weight"])


def official_generate(
    model, prompt, steps, gen_length, block_length, temperature=0.0, cfg_scale=0.0, remasking="low_confidence", mask_id=126336
):
    """generate.py ``generate`` (= MMadaModelLM.mmu_generate), ``model(x)`` returning logits; the global RNG."""

    def add_gumbel_noise(logits, temperature):
        if temperature == 0:
            return logits
        logits = logits.to(torch.float64)
        noise = torch.rand_like(logits, dtype=torch.float64)
        return logits.exp() / (-torch.log(noise)) ** temperature

    def get_num_transfer_tokens(mask_index, steps):
        mask_num = mask_index.sum(dim=1, keepdim=True)
        base, remainder = mask_num // steps, mask_num % steps
        out = torch.zeros(mask_num.size(0), steps, dtype=torch.int64) + base
        for i in range(mask_num.size(0)):
            out[i, : remainder[i]] += 1
        return out

    x = torch.full((prompt.shape[0], prompt.shape[1] + gen_length), mask_id, dtype=torch.long)
    x[:, : prompt.shape[1]] = prompt.clone()
    prompt_index = x != mask_id
    num_blocks = gen_length // block_length
    steps = steps // num_blocks
    for num_block in range(num_blocks):
        lo, hi = prompt.shape[1] + num_block * block_length, prompt.shape[1] + (num_block + 1) * block_length
        num_transfer_tokens = get_num_transfer_tokens(x[:, lo:hi] == mask_id, steps)
        for i in range(steps):
            mask_index = x == mask_id
            if cfg_scale > 0.0:
                un_x = x.clone()
                un_x[prompt_index] = mask_id
                logits, un_logits = torch.chunk(model(torch.cat([x, un_x], dim=0)), 2, dim=0)
                logits = un_logits + (cfg_scale + 1) * (logits - un_logits)
            else:
                logits = model(x)
            x0 = torch.argmax(add_gumbel_noise(logits, temperature), dim=-1)
            if remasking == "low_confidence":
                p = F.softmax(logits.to(torch.float64), dim=-1)
                x0_p = torch.squeeze(torch.gather(p, dim=-1, index=torch.unsqueeze(x0, -1)), -1)
            else:
                x0_p = torch.rand((x0.shape[0], x0.shape[1]))
            x0_p[:, hi:] = -np.inf
            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, -np.inf)
            transfer_index = torch.zeros_like(x0, dtype=torch.bool)
            for j in range(confidence.shape[0]):
                _, select_index = torch.topk(confidence[j], k=num_transfer_tokens[j, i])
                transfer_index[j, select_index] = True
            x[transfer_index] = x0[transfer_index]
    return x


# --- loading -----------------------------------------------------------------------------------------


def test_mmada_loads_by_released_names_without_remote_code(mmada, mmada_dir):
    assert mmada.family == "mmada" and isinstance(mmada.module, MMadaModelLM) and not mmada.causal
    cfg = mmada.module.config
    text_rows = len(mmada.tokenizer)
    assert cfg.text_vocab_size == text_rows and cfg.codebook_size == CODEBOOK
    assert mmada.mask_id == mmada.tokenizer.mask_token_id
    state = load_file(str(mmada_dir / "model.safetensors"))
    assert set(state) == set(mmada.module.state_dict())
    for name in ("model.transformer.wte.weight", "model.transformer.ff_out.weight"):  # image rows kept
        assert mmada.module.state_dict()[name].shape[0] == text_rows + CODEBOOK
        assert torch.equal(mmada.module.state_dict()[name], state[name])


def test_logits_equal_the_official_forward(mmada, mmada_dir):
    state = load_file(str(mmada_dir / "model.safetensors"))
    cfg = json.loads((mmada_dir / "config.json").read_text())
    ids = torch.randint(4, len(mmada.tokenizer), (2, 19), generator=torch.Generator().manual_seed(1))
    ids[:, 5:9] = mmada.mask_id
    ids[1, 3] = len(mmada.tokenizer) + 7  # an image token as input
    ours = mmada.module(ids).logits
    assert ours.shape == (2, 19, len(mmada.tokenizer) + CODEBOOK)
    torch.testing.assert_close(ours, official_logits(state, cfg, ids), rtol=0, atol=2e-6)


def test_chat_template_is_mmadas(mmada):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    messages = [{"role": "system", "content": " Be brief. "}, {"role": "user", "content": "To be, or not?\n"}]
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    for given in (messages, messages[1:]):
        expected = env.from_string(OFFICIAL_CHAT_TEMPLATE).render(messages=given, bos_token=mmada.tokenizer.bos_token)
        assert mmada.tokenizer.apply_chat_template(given, add_generation_prompt=True, tokenize=False) == expected
    assert expected.startswith("[BOS]<|start_header_id|>user<|end_header_id|>\nTo be, or not?<|eot_id|>")


def test_a_config_without_llada_keys_is_one_line_before_any_work(tmp_path, monkeypatch):
    import sap_core.models.mmada as mmada_module

    d = make_mmada_dir(
        tmp_path / "m", config_edit=lambda c: [c.pop(k) for k in ("d_model", "n_heads", "mlp_hidden_size", "mlp_ratio")]
    )
    monkeypatch.setattr(mmada_module, "load_pretrained", lambda *a, **k: pytest.fail("weights were loaded"))
    with pytest.raises(ModelLoadError) as err:
        load_model(d, device="cpu")
    message = str(err.value)
    assert "\n" not in message and "lacks the LLaDA keys d_model, n_heads, mlp_hidden_size" in message


def test_llm_vocab_size_beyond_the_embedding_is_refused(tmp_path):
    d = make_mmada_dir(tmp_path / "m", config_edit=lambda c: c.update(llm_vocab_size=10_000))
    with pytest.raises(ModelLoadError, match="text rows"):
        load_model(d, device="cpu")


# --- MMaDA's text generation ------------------------------------------------------------------------


SETTINGS = [  # (gen_length, steps, block_length, temperature, cfg_scale, remasking)
    (16, 16, 8, 0.0, 0.0, "low_confidence"),
    (12, 6, 4, 0.0, 0.0, "low_confidence"),
    (16, 8, 16, 0.0, 1.5, "low_confidence"),
    (16, 8, 8, 1.0, 0.0, "low_confidence"),
    (16, 8, 8, 0.7, 0.0, "random"),
    (8, 8, 8, 0.0, 0.0, "random"),
]


@pytest.mark.parametrize("gen_length,steps,block_length,temperature,cfg_scale,remasking", SETTINGS)
def test_generation_equals_the_official_loop(mmada, gen_length, steps, block_length, temperature, cfg_scale, remasking):
    prompt = mmada.encode("ROMEO. To be, or not")
    spec = DecodeSpec(gen_length, steps, block_length, remasking, temperature, cfg_scale, seed=11)
    ours = generate(mmada, prompt, spec)
    torch.manual_seed(11)
    with torch.inference_mode():
        theirs = official_generate(
            lambda x: mmada.module(x).logits,
            torch.tensor([prompt]),
            steps,
            gen_length,
            block_length,
            temperature,
            cfg_scale,
            remasking,
            mask_id=mmada.mask_id,
        )
    assert ours.final_tokens.tolist() == theirs[0].tolist()
    assert ours.n_steps == steps and (ours.decoded_at[len(prompt) :] >= 0).all()


def test_image_tokens_can_come_out_and_text_only_never_emits_one(mmada):
    text_rows = mmada.module.config.text_vocab_size
    prompt = "ROMEO. To be, or not"
    free = [generate(mmada, prompt, DecodeSpec(24, 12, 8, temperature=t, seed=s)) for t, s in ((0.0, 0), (1.0, 1), (1.0, 2))]
    assert any((t.generated_ids >= text_rows).any() for t in free)  # MMaDA's own rule: the whole vocabulary
    for temperature, seed in ((0.0, 0), (1.0, 1), (1.0, 2), (2.0, 3)):
        for remasking in ("low_confidence", "random"):
            spec = DecodeSpec(24, 12, 8, remasking, temperature, seed=seed, text_only=True)
            traj = generate(mmada, prompt, spec)
            assert (traj.final_tokens < text_rows).all() and (traj.tokens < text_rows).all()
            assert np.isfinite(traj.confidence[traj.decoded_at[traj.decoded_at >= 0], np.flatnonzero(traj.decoded_at >= 0)]).all()


def test_capture_replay_and_save_work_as_for_llada(mmada, tmp_path):
    spec = DecodeSpec(16, 8, 8, temperature=1.0, seed=3, text_only=True)
    recorder = AttentionRecorder()
    traj = generate(mmada, "To be, or not", spec, recorder=recorder)
    plain = generate(mmada, "To be, or not", spec)
    assert traj.final_tokens.tolist() == plain.final_tokens.tolist()
    assert traj.mass.shape == (8, 2, 4, traj.length)
    np.testing.assert_allclose(traj.mass.sum(-1), traj.length, rtol=1e-4)
    full = attention_map(mmada, traj, 3, 1, 2)
    np.testing.assert_allclose(full.sum(0), traj.mass[3, 1, 2], rtol=1e-4, atol=1e-5)
    back = Trajectory.load(traj.save(tmp_path / "t"))
    assert (
        back.spec == traj.spec
        and back.spec.sampler == "mmada"
        and back.spec.text_only
        and np.array_equal(back.final_tokens, traj.final_tokens)
    )


def test_bad_decoding_input_is_refused_before_work(mmada, tiny_dlm):
    with pytest.raises(DecodeSpecError, match="not 'entropy'"):
        generate(mmada, "To be", DecodeSpec(8, 8, 8, remasking="entropy"))
    with pytest.raises(DecodeSpecError, match="this 'llada' model has none"):
        generate(tiny_dlm, "To be", DecodeSpec(8, 8, 8, text_only=True))
    with pytest.raises(DecodeSpecError, match="text_only must be true or false"):
        DecodeSpec(text_only="yes")


def test_cli_generate_text_only(mmada_dir, tmp_path):
    from sap_core.cli import main

    out = tmp_path / "g.json"
    argv = ["generate", "--model", str(mmada_dir), "--device", "cpu", "--prompt", "To be", "--gen-length", "16"]
    assert main(argv + ["--steps", "16", "--temperature", "1", "--text-only", "--quiet", "--out", str(out)]) == 0
    summary = json.loads(out.read_text())
    assert summary["spec"]["text_only"] is True and max(summary["generated_ids"]) < len(make_tokenizer())


# --- pruning ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["wanda", "sink_wanda", "flap"])
def test_mmada_prunes(mmada, method):
    text = " ".join(["To be, or not to be, that is the question."] * 20)
    cal = pruning.CalibrationSpec(text=text, nsamples=2, seqlen=24, T=10, interval=5)
    before = {k: v.clone() for k, v in mmada.module.state_dict().items()}
    variant = pruning.prune(mmada, pruning.PruneSpec(method, 0.5, calibration=cal))
    if method != "flap":
        assert abs(variant.achieved_sparsity - 0.5) < 0.02
    assert all(torch.equal(before[k], v) for k, v in mmada.module.state_dict().items())  # dense intact
    ids = torch.randint(4, len(mmada.tokenizer), (1, 10), generator=torch.Generator().manual_seed(0))
    with variant.applied(mmada):
        pruned = mmada.logits(ids)
        traj = generate(mmada, "To be", DecodeSpec(8, 8, 8, text_only=True))
    assert pruned.shape[-1] == len(mmada.tokenizer) + CODEBOOK
    assert not torch.allclose(pruned, mmada.logits(ids), atol=1e-4)
    assert (traj.final_tokens < mmada.module.config.text_vocab_size).all()
