"""Dream's own sampler (``DecodeSpec(sampler="dream")``, issue 29 item 1) against a transcription of Dream's
``diffusion_generate``, on a tiny random Dream checkpoint; the recorded trajectory, replay, bad inputs, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.distributions as dists
import torch.nn.functional as F
from test_families import make_dream_dir  # tests/ is on the path

from sap_core.attention import AttentionRecorder
from sap_core.decoding import DREAM_ALGS, DecodeSpec, Trajectory
from sap_core.diffusion import attention_map, generate
from sap_core.errors import DecodeSpecError
from sap_core.models import load_model

# --- transcription -------------------------------------------------------------------------------
# Written from reading ``DreamGenerationMixin._sample`` and ``sample_tokens`` / ``top_p_logits`` /
# ``top_k_logits`` of ``generation_utils.py`` shipped with the Dream-v0 checkpoints on the Hugging Face
# hub (Dream-org/Dream-v0-Instruct-7B and -Base-7B), read in the copy vendored unchanged (in these parts)
# at X-Xia0828/DepCap, dream/model/generation_utils.py, commit f516fab08f8bbb57ac35721b848789d75d66c80f.
# The structure is Dream's, global RNG included: one sequence, no attention mask (Dream's "full"), no hooks.


def ref_top_p(logits, top_p):
    sorted_logits, sorted_idx = torch.sort(logits, descending=True)
    cum = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1)
    remove = cum > top_p
    remove[..., 1:] = remove[..., :-1].clone()
    remove[..., 0] = 0
    mask = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, sorted_idx, remove)
    return logits.masked_fill(mask, torch.finfo(logits.dtype).min)


def ref_top_k(logits, top_k):
    top_k = min(top_k, logits.size(-1))
    drop = logits < torch.topk(logits, top_k)[0][..., -1, None]
    return logits.masked_fill(drop, torch.finfo(logits.dtype).min)


def ref_sample_tokens(logits, temperature=0.0, top_p=None, top_k=None, margin_confidence=False, neg_entropy=False):
    if temperature > 0:
        logits = logits / temperature
    if top_p is not None and top_p < 1:
        logits = ref_top_p(logits, top_p)
    if top_k is not None:
        logits = ref_top_k(logits, top_k)
    probs = torch.softmax(logits, dim=-1)
    if temperature > 0:
        try:
            x0 = dists.Categorical(probs=probs).sample()
            confidence = torch.gather(probs, -1, x0.unsqueeze(-1)).squeeze(-1)
        except Exception:  # Dream's bare except (an empty selection)
            confidence, x0 = probs.max(dim=-1)
    else:
        confidence, x0 = probs.max(dim=-1)
    if margin_confidence:
        sorted_probs, _ = torch.sort(probs, dim=-1, descending=True)
        confidence = sorted_probs[:, 0] - sorted_probs[:, 1]
    if neg_entropy:
        confidence = torch.sum(probs * torch.log(probs + 1e-10), dim=-1)
    return confidence, x0


@torch.no_grad()
def ref_diffusion_generate(model, input_ids, mask_token_id, max_new_tokens, steps, eps, alg, alg_temp, temperature, top_p, top_k):
    max_length = input_ids.shape[1] + max_new_tokens
    x = F.pad(input_ids, (0, max_length - input_ids.shape[1]), value=mask_token_id)
    timesteps = torch.linspace(1, eps, steps + 1, device=x.device)
    for i in range(steps):
        mask_index = x == mask_token_id
        logits = model(x).logits
        logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
        mask_logits = logits[mask_index]
        t, s = timesteps[i], timesteps[i + 1]
        if alg == "origin":
            p_transfer = 1 - s / t if i < steps - 1 else 1
            x0 = torch.zeros_like(x[mask_index], dtype=torch.long) + mask_token_id
            transfer_index_t_s = torch.rand(*x0.shape) < p_transfer
            _, x0[transfer_index_t_s] = ref_sample_tokens(
                mask_logits[transfer_index_t_s], temperature=temperature, top_p=top_p, top_k=top_k
            )
            x[mask_index] = x0.clone()
        else:
            if alg == "maskgit_plus":
                confidence, x0 = ref_sample_tokens(mask_logits, temperature=temperature, top_p=top_p, top_k=top_k)
            elif alg == "topk_margin":
                confidence, x0 = ref_sample_tokens(mask_logits, temperature, top_p, top_k, margin_confidence=True)
            elif alg == "entropy":
                confidence, x0 = ref_sample_tokens(mask_logits, temperature, top_p=top_p, top_k=top_k, neg_entropy=True)
            else:
                raise RuntimeError(f"Unknown alg: {alg}")
            num_mask_token = mask_index.sum() / mask_index.shape[0]
            number_transfer_tokens = int(num_mask_token * (1 - s / t)) if i < steps - 1 else int(num_mask_token)
            full_confidence = torch.full_like(x, -torch.inf, dtype=logits.dtype)
            full_confidence[mask_index] = confidence
            if number_transfer_tokens > 0:
                if alg_temp is None or alg_temp == 0:
                    _, transfer_index = torch.topk(full_confidence, number_transfer_tokens)
                else:
                    full_confidence = F.softmax(full_confidence / alg_temp, dim=-1)
                    transfer_index = torch.multinomial(full_confidence, num_samples=number_transfer_tokens)
                x_ = torch.zeros_like(x, dtype=torch.long) + mask_token_id
                x_[mask_index] = x0.clone()
                row_indices = torch.arange(x.size(0)).unsqueeze(1).expand_as(transfer_index)
                x[row_indices, transfer_index] = x_[row_indices, transfer_index]
    return x


# --- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dream(tmp_path_factory):
    return load_model(make_dream_dir(tmp_path_factory.mktemp("dream_sampler")), device="cpu")


def ours(handle, prompt, **kw):
    return generate(handle, prompt, DecodeSpec(sampler="dream", **kw))


def reference(
    handle, prompt, seed=0, gen_length=12, steps=12, eps=1e-3, alg="entropy", alg_temp=0.0, temperature=0.0, top_p=1.0, top_k=0
):
    torch.manual_seed(seed)
    out = ref_diffusion_generate(
        handle.module,
        torch.tensor([prompt]),
        handle.mask_id,
        gen_length,
        steps,
        eps,
        alg,
        alg_temp,
        temperature,
        top_p if top_p < 1 else None,
        top_k or None,
    )
    return out[0].numpy()


PROMPT = "To be, or not"

# --- against the transcription -----------------------------------------------------------------------


@pytest.mark.parametrize("alg", DREAM_ALGS)
@pytest.mark.parametrize("gen_length,steps", [(12, 12), (10, 4), (6, 9), (7, 1)])
def test_greedy_tokens_equal_dreams(dream, alg, gen_length, steps):
    """Temperature 0: identical tokens for every alg, with steps equal to, below, above the length and 1."""
    prompt = dream.encode(PROMPT)
    kw = dict(gen_length=gen_length, steps=steps, alg=alg)
    traj = ours(dream, prompt, **kw)
    assert np.array_equal(traj.final_tokens, reference(dream, prompt, **kw))
    assert traj.spec.sampler == "dream" and traj.n_steps == steps and traj.note == ""


SAMPLED = [
    dict(alg="origin", temperature=0.9),
    dict(alg="maskgit_plus", temperature=0.7, top_p=0.9),
    dict(alg="topk_margin", temperature=1.0, top_k=20),
    dict(alg="entropy", temperature=0.5, top_p=0.95, top_k=50),
    dict(alg="entropy", temperature=0.0, alg_temp=0.3),  # greedy tokens, positions drawn
    dict(alg="maskgit_plus", temperature=1.2, alg_temp=0.1, eps=0.05),
]


@pytest.mark.parametrize("kw", SAMPLED, ids=lambda kw: "-".join(f"{k}{v}" for k, v in kw.items()))
@pytest.mark.parametrize("seed", [0, 7])
def test_sampled_tokens_equal_dreams_for_the_same_seed(dream, kw, seed):
    """Every draw can be matched on a CPU: Dream's global RNG after torch.manual_seed(seed) is the same
    stream as our generator seeded with seed, drawn in the same order (origin coins, tokens, positions)."""
    prompt = dream.encode(PROMPT)
    traj = ours(dream, prompt, gen_length=12, steps=7, seed=seed, **kw)
    assert np.array_equal(traj.final_tokens, reference(dream, prompt, seed=seed, gen_length=12, steps=7, **kw))


def test_seeds_differ_and_filters_bite(dream):
    prompt = dream.encode(PROMPT)
    runs = {s: ours(dream, prompt, gen_length=12, steps=6, temperature=1.0, seed=s).final_tokens for s in range(3)}
    assert not all(np.array_equal(runs[0], runs[s]) for s in (1, 2))
    # top_k = 1 makes every drawn token the most probable one at its step
    a = ours(dream, prompt, gen_length=12, steps=6, temperature=1.0, top_k=1, seed=3)
    for s in range(a.n_steps):
        pos = np.flatnonzero(a.decoded_at == s)
        best = dream.logits(torch.as_tensor(a.tokens[s])[None])[0, pos].argmax(-1).numpy()
        assert np.array_equal(a.final_tokens[pos], best)


# --- the trajectory ----------------------------------------------------------------------------------


def test_trajectory_records_the_run_and_replays(dream, tmp_path):
    prompt = dream.encode(PROMPT)
    P = len(prompt)
    spec = DecodeSpec(gen_length=10, steps=4, alg="topk_margin", temperature=0.8, seed=2)  # sampler left to the family
    plain = generate(dream, prompt, spec)
    traj = generate(dream, prompt, spec, recorder=AttentionRecorder(chunk_size=3))
    assert traj.spec.sampler == "dream" and spec.sampler is None  # the Dream family's own, recorded
    assert np.array_equal(plain.final_tokens, traj.final_tokens)
    assert np.array_equal(
        traj.final_tokens, reference(dream, prompt, seed=2, gen_length=10, steps=4, alg="topk_margin", temperature=0.8)
    )
    S, L = 4, P + 10
    assert traj.tokens.shape == (S, L) and traj.mass.shape == (S, 2, 4, L) and (traj.valid_length == L).all()
    assert (traj.tokens[0, P:] == dream.mask_id).all() and (traj.final_tokens != dream.mask_id).all()
    # each step's input is the previous one with exactly the positions decoded at that step filled
    after = np.vstack([traj.tokens[1:], traj.final_tokens[None]])
    for s in range(S):
        changed = np.flatnonzero(traj.tokens[s] != after[s])
        assert np.array_equal(changed, np.flatnonzero(traj.decoded_at == s))
        assert np.isfinite(traj.confidence[s, changed]).all() and np.isnan(np.delete(traj.confidence[s], changed)).all()
        logits = dream.logits(torch.as_tensor(traj.tokens[s])[None])[0].double()
        p = torch.softmax(logits[changed], -1).gather(-1, torch.as_tensor(after[s, changed])[:, None])[:, 0]
        assert np.allclose(traj.confidence[s, changed], p.numpy(), rtol=1e-5)
        assert np.allclose(traj.mass[s].sum(-1), L, atol=1e-3)
    assert (traj.decoded_at[:P] == -1).all() and (traj.decoded_at[P:] >= 0).all()
    # replay of a step and the saved file
    full = attention_map(dream, traj, 2, 1, 3)
    assert np.allclose(full.sum(0), traj.mass[2, 1, 3], atol=1e-4)
    back = Trajectory.load(traj.save(tmp_path / "dream"))
    assert back.spec == traj.spec and np.array_equal(back.final_tokens, traj.final_tokens) and np.allclose(back.mass, traj.mass)


def test_llada_sampler_stays_available_and_says_it_is_not_dreams(dream, tiny_dlm, tmp_path):
    traj = generate(dream, dream.encode(PROMPT), DecodeSpec(gen_length=8, steps=8, block_length=8, sampler="llada"))
    assert traj.spec.sampler == "llada" and "not Dream's own" in traj.note
    assert Trajectory.load(traj.save(tmp_path / "llada")).note == traj.note
    # a LLaDA model: its own sampler by default, no note; Dream's runs on it too and says so
    own = generate(tiny_dlm, [5, 6], DecodeSpec(gen_length=8, steps=8, block_length=8))
    assert own.spec.sampler == "llada" and own.note == ""
    other = generate(tiny_dlm, [5, 6], DecodeSpec(gen_length=8, steps=3, sampler="dream"))
    assert other.spec.sampler == "dream" and "on a llada model" in other.note
    assert np.array_equal(other.final_tokens, reference(tiny_dlm_as_dream(tiny_dlm), [5, 6], gen_length=8, steps=3))


def tiny_dlm_as_dream(handle):
    """LLaDA's logits are already aligned; unshift them so the transcription's shift gives them back."""

    class Unshifted(torch.nn.Module):
        def forward(self, x):
            logits = handle.logits(x)
            return type("Out", (), {"logits": torch.cat([logits[:, 1:], logits[:, -1:]], 1)})()

    return type("H", (), {"module": Unshifted(), "mask_id": handle.mask_id})()


def test_old_trajectory_files_read_as_llada(tiny_dlm, tmp_path):
    traj = generate(tiny_dlm, [5, 6], DecodeSpec(gen_length=4, steps=4, block_length=4))
    path = traj.save(tmp_path / "old")
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files}
    meta = json.loads(str(arrays.pop("meta")))
    for key in ("sampler", "alg", "alg_temp", "eps", "top_p", "top_k"):
        meta["spec"].pop(key)
    meta.pop("note")
    np.savez_compressed(path, meta=np.array(json.dumps(meta)), **arrays)
    back = Trajectory.load(path)
    assert back.spec.sampler == "llada" and back.note == ""


# --- bad inputs --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw,message",
    [
        (dict(alg="greedy"), "alg must be one of origin, maskgit_plus, topk_margin, entropy"),
        (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
        (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
        (dict(top_p=float("nan")), "top_p must be a finite number"),
        (dict(eps=0.0), r"eps must be in \(0, 1\)"),
        (dict(eps=1.0), r"eps must be in \(0, 1\)"),
        (dict(top_k=-1), "top_k must be >= 0"),
        (dict(top_k=2.5), "top_k must be a whole number"),
        (dict(alg_temp=-0.1), "alg_temp must be >= 0"),
        (dict(sampler="mdlm"), "sampler must be one of llada, dream"),
    ],
)
def test_bad_options_are_one_line_errors_at_construction(kw, message):
    with pytest.raises(DecodeSpecError, match=message) as info:
        DecodeSpec(**kw)
    assert "\n" not in str(info.value)


def test_model_dependent_refusals_come_before_any_forward_pass(dream, tiny_ar, monkeypatch):
    calls = []
    monkeypatch.setattr(type(dream.module), "forward", lambda *a, **k: calls.append(1))
    with pytest.raises(DecodeSpecError, match="no classifier-free guidance"):
        generate(dream, [5, 6], DecodeSpec(cfg_scale=1.0))
    with pytest.raises(DecodeSpecError, match="exceeds the model's max_sequence_length"):
        generate(dream, [5, 6], DecodeSpec(gen_length=300))
    with pytest.raises(DecodeSpecError, match="steps must be at least 1"):
        generate(dream, [5, 6], DecodeSpec(steps=0))
    with pytest.raises(DecodeSpecError, match="a causal model decodes token by token"):
        generate(tiny_ar, [5, 6], DecodeSpec(sampler="dream"))
    assert calls == []
    # Dream's sampler does not need blocks: a length no block divides, more steps than tokens
    monkeypatch.undo()
    traj = generate(dream, [5, 6], DecodeSpec(gen_length=7, steps=11, block_length=16))
    assert traj.n_steps == 11 and (traj.final_tokens != dream.mask_id).all()


# --- CLI ---------------------------------------------------------------------------------------------


def test_cli_generates_with_dreams_sampler_and_capture(dream, tmp_path):
    model_dir = dream.source
    npz, out = tmp_path / "run.npz", tmp_path / "run.json"
    args = ["--model", model_dir, "--device", "cpu", "--quiet", "--prompt", PROMPT, "--gen-length", "9", "--steps", "5"]
    dream_args = ["--sampler", "dream", "--alg", "maskgit_plus", "--alg-temp", "0.2", "--eps", "0.01", "--top-p", "0.9"]
    dream_args += ["--top-k", "40", "--temperature", "0.6", "--seed", "3"]
    cmd = [sys.executable, "-m", "sap_core", "generate", *args, *dream_args, "--record-attention", "--trajectory", str(npz)]
    run = subprocess.run([*cmd, "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    summary = json.loads(out.read_text())
    assert summary["spec"]["sampler"] == "dream" and summary["spec"]["alg"] == "maskgit_plus" and summary["n_steps"] == 5
    traj = Trajectory.load(npz)
    assert traj.mass is not None and traj.spec.top_k == 40 and traj.spec.eps == 0.01
    kw = dict(gen_length=9, steps=5, alg="maskgit_plus", alg_temp=0.2, eps=0.01, top_p=0.9, top_k=40, temperature=0.6)
    assert np.array_equal(traj.final_tokens, reference(dream, dream.encode(PROMPT), seed=3, **kw))
    assert summary["generated_ids"] == traj.generated_ids.tolist()
    bad = subprocess.run([sys.executable, "-m", "sap_core", "generate", *args, "--top-p", "2"], capture_output=True, text=True)
    assert (
        bad.returncode == 2
        and bad.stderr.strip().splitlines() == [bad.stderr.strip()]
        and "top_p must be in (0, 1]" in bad.stderr
    )
