"""Structured pruning (issue 23): whole MLP channels and heads cut out, against a brute-force reference;
the model shrinks, the dense one comes back bit for bit, a saved variant loads to the same logits."""

from __future__ import annotations

import json
import re
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import TEXT, make_dream_dir, make_model_dir

from sap_core.errors import PruneSpecError
from sap_core.models import load_model
from sap_core.pruning import CalibrationSpec, PruneSpec, prune
from sap_core.pruning.calibration import calibration_ids, tokenize

CAL = CalibrationSpec(text=" ".join(TEXT * 20), nsamples=2, seqlen=24, T=50, interval=10, batch_size=3)


pytestmark = pytest.mark.usefixtures("one_thread_module")  # conftest.py


@pytest.fixture(scope="module")
def dlm(tmp_path_factory):
    return load_model(make_model_dir(tmp_path_factory.mktemp("struct-dlm"), seed=2), device="cpu")


def snapshot(handle):
    return {k: v.detach().clone() for k, v in handle.module.state_dict().items()}


def inputs_of(handle, ids: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    """Brute force: every block linear's input on ``ids`` (``[B, L]``), through forward hooks on the dense model."""
    seen = [{} for _ in handle.module.blocks]
    hooks = []
    for i, block in enumerate(handle.module.blocks):
        for name in ("q_proj", "ff_proj", "ff_out", "attn_out"):

            def hook(_m, args, i=i, name=name):
                seen[i].setdefault(name, []).append(args[0].detach().reshape(-1, args[0].shape[-1]).double())

            hooks.append(getattr(block, name).register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            handle.module(ids)
    finally:
        for h in hooks:
            h.remove()
    return [{k: torch.cat(v) for k, v in s.items()} for s in seen]


def reference_scores(statistic, block, x: dict, w: torch.Tensor, heads: int):
    """Per-channel and per-head scores by explicit loops over the structures."""

    def wnorm(X):  # ‖w⊙X_c‖₂
        return ((w[:, None] * X) ** 2).sum(0).sqrt()

    def wvar(X):
        mean = (w[:, None] * X).sum(0) / w.sum()
        return (w[:, None] * (X - mean) ** 2).sum(0) / w.sum()

    Wg, Wu, Wo = (getattr(block, n).weight.double() for n in ("ff_proj", "up_proj", "ff_out"))
    ch = []
    for j in range(Wg.shape[0]):
        if statistic == "wanda":
            s = sum(abs(Wg[j, i]) * wnorm(x["ff_proj"])[i] + abs(Wu[j, i]) * wnorm(x["ff_proj"])[i] for i in range(Wg.shape[1]))
            s = s + sum(abs(Wo[k, j]) for k in range(Wo.shape[0])) * wnorm(x["ff_out"])[j]
        else:
            s = wvar(x["ff_out"])[j] * sum(Wo[k, j] ** 2 for k in range(Wo.shape[0]))
        ch.append(float(s))
    hd = block.head_dim
    Wq, Wk, Wv, Wa = (getattr(block, n).weight.double() for n in ("q_proj", "k_proj", "v_proj", "attn_out"))
    hs = []
    for h in range(heads):
        cols = range(h * hd, (h + 1) * hd)
        if statistic == "wanda":
            s = sum((abs(W[c]) * wnorm(x["q_proj"])).sum() for W in (Wq, Wk, Wv) for c in cols)
            s = s + sum(abs(Wa[:, c]).sum() * wnorm(x["attn_out"])[c] for c in cols)
        else:
            s = sum(wvar(x["attn_out"])[c] * (Wa[:, c] ** 2).sum() for c in cols)
        hs.append(float(s))
    return np.array(ch), np.array(hs)


def top(scores: np.ndarray, remove: int) -> list[int]:
    return sorted(np.argsort(-scores, kind="stable")[: len(scores) - remove].tolist())


@pytest.mark.parametrize("method", ["struct_wanda", "flap", "sink_struct_wanda"])
def test_kept_structures_match_a_brute_force_reference(dlm, method):
    v = prune(dlm, PruneSpec(method, 0.25, heads=0.5, calibration=CAL))
    if v.calibration.noised is None:  # clean windows, every token weight 1
        ids = calibration_ids(tokenize(dlm, CAL), CAL)[0]
        w = torch.ones(ids.numel(), dtype=torch.float64)
    else:  # every noised step, tokens weighted by the run's factors 1 − s_t(j)
        ids = torch.from_numpy(v.calibration.noised).reshape(-1, CAL.seqlen)
        w = torch.from_numpy(v.token_weights).reshape(-1).double()
        assert (w < 1).any()
    x = inputs_of(dlm, ids)
    stat = "fluctuation" if "flap" in method else "wanda"
    for i, block in enumerate(dlm.module.blocks):
        ch, hs = reference_scores(stat, block, x[i], w, dlm.n_heads)
        assert v.kept[i]["channels"] == top(ch, 16), i
        assert v.kept[i]["heads"] == top(hs, 2), i


def test_the_model_shrinks_and_the_dense_one_comes_back_bit_for_bit(dlm):
    before = snapshot(dlm)
    ids = torch.randint(4, 200, (1, 16), generator=torch.Generator().manual_seed(0))
    dense_logits, dense_params = dlm.logits(ids), dlm.n_params
    v = prune(dlm, PruneSpec("sink_flap", 0.5, heads=0.5, calibration=CAL))
    table = v.settings_table()  # the Prune page's table: channels and heads removed, not a target sparsity
    assert table.loc["heads removed", "value"] == "0.50" and "target sparsity" not in table.index
    assert "bias compensation" in table.index and "variance threshold tau" not in table.index
    assert_restored = lambda: all(torch.equal(before[k], t) for k, t in snapshot(dlm).items())  # noqa: E731
    assert_restored()
    copy = v.apply_to_copy(dlm)
    with v.applied(dlm) as h:
        block = h.module.blocks[0]
        assert block.ff_proj.weight.shape == (32, 32) and block.ff_out.weight.shape == (32, 32)
        assert block.q_proj.weight.shape == (16, 32) and block.attn_out.weight.shape == (32, 16) and block.n_heads == 2
        assert h.module.config.mlp_hidden_size == 32 and h.module.config.n_heads == 2
        # each block loses half of its MLP (3·32·32) and half of its attention (4·32·16) parameters
        assert h.n_params == dense_params - dlm.n_layers * (3 * 32 * 32 + 4 * 32 * 16)
        pruned = h.logits(ids)
        assert torch.equal(pruned, copy.logits(ids)) and not torch.allclose(pruned, dense_logits)
    assert abs(v.achieved_sparsity - 0.5) < 1e-9
    with pytest.raises(RuntimeError, match="boom"), v.applied(dlm):
        raise RuntimeError("boom")
    assert dlm.module.config.mlp_hidden_size == 64 and dlm.module.blocks[0].n_heads == 4
    assert set(snapshot(dlm)) == set(before) and assert_restored()
    assert torch.equal(dlm.logits(ids), dense_logits)


def test_save_then_load_model_gives_the_in_memory_logits(dlm, tmp_path):
    v = prune(dlm, PruneSpec("gated_sink_struct_wanda", 0.25, heads=0.5, calibration=CAL))
    ids = torch.randint(4, 200, (2, 20), generator=torch.Generator().manual_seed(1))
    with v.applied(dlm):
        expected = dlm.logits(ids)
    target = v.save(tmp_path / "small", dlm)
    config = json.loads((target / "config.json").read_text())
    assert (config["mlp_hidden_size"], config["n_heads"], config["n_kv_heads"], config["head_dim"]) == (48, 2, 2, 8)
    record = json.loads((target / "pruning.json").read_text())
    assert record["removed"] == {"mlp_channels_per_block": 16, "heads_per_block": 2} and len(record["kept"]) == dlm.n_layers
    loaded = load_model(target, device="cpu")
    assert loaded.n_params < dlm.n_params
    assert torch.allclose(loaded.logits(ids), expected, atol=1e-6)
    dense_size = sum(p.numel() for p in dlm.module.parameters()) * 4
    assert (target / "model.safetensors").stat().st_size < 0.9 * dense_size


def test_kept_heads_need_not_divide_the_width_with_an_explicit_head_dim(dlm, tmp_path):
    """3 of 4 heads kept (32 % 3 != 0): the saved config gives head_dim, load_model accepts it and gives the
    in-memory logits; the same config without head_dim, or a head_dim the weights do not have, is refused."""
    from sap_core.errors import ModelLoadError

    v = prune(dlm, PruneSpec("sink_flap", 0.25, heads=0.25, calibration=CAL))
    ids = torch.randint(4, 200, (2, 20), generator=torch.Generator().manual_seed(3))
    with v.applied(dlm):
        expected = dlm.logits(ids)
    target = v.save(tmp_path / "three", dlm)
    config = json.loads((target / "config.json").read_text())
    assert (config["d_model"], config["n_heads"], config["head_dim"]) == (32, 3, 8)
    assert torch.allclose(load_model(target, device="cpu").logits(ids), expected, atol=1e-6)
    for change, match in (
        (dict(head_dim=None), "not divisible by the 3 attention heads"),
        (dict(head_dim=4), "has shape .24, 32. in the weights but .12, 32. in config.json"),
    ):
        (target / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(ModelLoadError, match=match):
            load_model(target, device="cpu")
    (target / "config.json").write_text(json.dumps({**config, "head_dim": 0}))
    with pytest.raises(ModelLoadError, match="head_dim is 0"):
        load_model(target, device="cpu")


def test_bias_compensation_adds_the_removed_mean(tmp_path):
    handle = load_model(make_model_dir(tmp_path / "biased", include_bias=True), device="cpu")
    plain = prune(handle, PruneSpec("flap", 0.5, calibration=CAL))
    comp = prune(handle, PruneSpec("flap", 0.5, calibration=CAL, bias_compensation=True))
    ids = calibration_ids(tokenize(handle, CAL), CAL)[0]
    x = inputs_of(handle, ids)[0]["ff_out"]
    ff_out = handle.module.blocks[0].ff_out
    removed = sorted(set(range(64)) - set(comp.kept[0]["channels"]))
    expect = ff_out.bias.double() + ff_out.weight.double()[:, removed] @ x[:, removed].mean(0)
    name = "model.transformer.blocks.0.ff_out.bias"
    assert torch.allclose(comp.weights[name].double(), expect, atol=1e-5)
    assert torch.equal(plain.weights[name], ff_out.bias)
    target = comp.save(tmp_path / "comp", handle)
    with comp.applied(handle):
        expected = handle.logits(ids)
    assert torch.allclose(load_model(target, device="cpu").logits(ids), expected, atol=1e-6)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(method="flap", sparsity=1.0), "sparsity must be in"),
        (dict(method="flap", sparsity=-0.1), "sparsity must be in"),
        (dict(method="flap", sparsity=0.995), "would remove all 64 MLP channels"),
        (dict(method="flap", sparsity=0.3, heads=1.0), "heads must be a number in"),
        (dict(method="flap", sparsity=0.3, heads=0.9), "would remove all 4 attention heads"),
        (dict(method="wanda", sparsity=0.3, heads=0.5), "only the structured methods"),
        (dict(method="struct_wanda", sparsity=0.3, pattern="2:4"), "N:M pattern"),
        (dict(method="struct_wanda", sparsity=0.3, bias_compensation=True), "FLAP's"),
        (dict(method="flap", sparsity=0.3, bias_compensation=True), "has none there"),
    ],
)
def test_bad_structured_settings_fail_in_one_line_before_any_work(dlm, kw, match):
    calls = []
    with pytest.raises(PruneSpecError, match=match) as err:
        prune(dlm, PruneSpec(calibration=CAL, **kw), progress=lambda *a: calls.append(a))
    assert "\n" not in str(err.value) and calls == []


def test_heads_of_a_gqa_model_cannot_be_dropped(tmp_path):
    gqa = load_model(make_model_dir(tmp_path / "gqa", n_kv_heads=2), device="cpu")
    with pytest.raises(PruneSpecError, match="GQA"):
        prune(gqa, PruneSpec("struct_wanda", 0.3, heads=0.5, calibration=CAL))


def test_cli_prune_structured_saves_a_smaller_model(tmp_path, tiny_dlm_dir):
    from sap_core.cli import main

    (tmp_path / "t.txt").write_text(" ".join(TEXT * 10))
    out = tmp_path / "small"
    args = ["prune", "--model", tiny_dlm_dir, "--method", "sink_struct_wanda", "--sparsity", "0.3", "--save", out, "--quiet"]
    args += ["--calib-text", tmp_path / "t.txt", "--calib-nsamples", "2", "--calib-seqlen", "24", "--out", tmp_path / "r.json"]
    assert main([str(a) for a in args]) == 0
    assert json.loads((out / "config.json").read_text())["mlp_hidden_size"] == 64 - 19
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["method"] == "sink_struct_wanda" and report["config_changes"] == {"mlp_hidden_size": 45}
    assert load_model(out, device="cpu").module.blocks[0].ff_out.in_features == 45
    assert main([str(a) for a in args[:7] + ["--heads", "1.5"]]) == 2


def test_compare_and_sweep_take_a_structured_variant(dlm):
    from sap_core.compare import compare_generations
    from sap_core.decoding import DecodeSpec
    from sap_core.evaluate import EvalSpec
    from sap_core.sweep import SweepSpec, run_sweep

    before = snapshot(dlm)
    v = prune(dlm, PruneSpec("flap", 0.5, heads=0.5, calibration=CAL))
    comparison = compare_generations(dlm, [v], "To be", DecodeSpec(gen_length=8, steps=8, block_length=8))
    table = comparison.table()
    assert list(table["label"]) == ["dense", "flap 50% channels, 50% heads"] and (table["tokens_per_second"] > 0).all()
    spec = SweepSpec(("sink_flap",), (0.5,), calibration=CAL, eval=EvalSpec(seqlen=16, nsamples=2, draws=2, text=" ".join(TEXT)))
    df = run_sweep(dlm, spec)
    assert (
        list(df["method"]) == ["dense", "sink_flap"] and abs(df["achieved_sparsity"].iloc[1] - 0.3) < 1e-9
    )  # half of the MLP, 3/5 of the block
    assert all(torch.equal(before[k], t) for k, t in snapshot(dlm).items())


def test_sweep_heads_reach_the_structured_rows_only_and_name_the_structure(dlm, tmp_path, tiny_dlm_dir):
    from sap_core.cli import main
    from sap_core.errors import SapError
    from sap_core.evaluate import EvalSpec
    from sap_core.sweep import SweepSpec, run_sweep, sweep_jobs

    spec = SweepSpec(("wanda", "flap"), (0.5,), calibration=CAL, heads=0.5, eval=EvalSpec(seqlen=16, nsamples=1, draws=2))
    jobs = {j.label: j.prune for j in sweep_jobs(spec)[1:]}
    assert list(jobs) == ["wanda 50%", "flap 50% channels, 50% heads"]
    assert jobs["wanda 50%"].heads == 0 and jobs["flap 50% channels, 50% heads"].heads == 0.5
    df = run_sweep(dlm, replace(spec, methods=("flap",), eval=replace(spec.eval, text=" ".join(TEXT))))
    # half of the MLP channels and half of the heads: every linear of the block loses half its parameters
    assert list(df["label"]) == ["dense", "flap 50% channels, 50% heads"] and df["achieved_sparsity"].iloc[1] == 0.5
    for bad, match in (
        (dict(heads=0.5, methods=("wanda",)), "only the structured methods"),
        (dict(heads=1.0), "heads must be a fraction"),
        (dict(heads=float("nan")), "heads must be a fraction"),
    ):
        with pytest.raises(SapError, match=match):
            replace(spec, **bad).validate()
    (tmp_path / "t.txt").write_text(" ".join(TEXT * 10))
    args = ["sweep", "--model", tiny_dlm_dir, "--methods", "flap", "--sparsities", "0.25", "--heads", "0.25", "--quiet"]
    args += ["--calib-text", tmp_path / "t.txt", "--calib-nsamples", "2", "--calib-seqlen", "24"]
    args += ["--text", tmp_path / "t.txt", "--nsamples", "1", "--seqlen", "16", "--draws", "2"]
    assert main([str(a) for a in args + ["--out", tmp_path / "s.csv"]]) == 0
    import pandas as pd

    assert list(pd.read_csv(tmp_path / "s.csv")["label"]) == ["dense", "flap 25% channels, 25% heads"]
    assert main([str(a) for a in args[:5] + ["--heads", "1.5", "--out", tmp_path / "x.csv"]]) == 2
    assert main([str(a) for a in args[:3] + ["--methods", "wanda", "--heads", "0.25", "--out", tmp_path / "x.csv"]]) != 0


def test_dream_mlp_channels_save_and_load_but_heads_are_refused(tmp_path):
    dream = load_model(make_dream_dir(tmp_path / "dream"), device="cpu")
    with pytest.raises(PruneSpecError, match="head size"):
        prune(dream, PruneSpec("flap", 0.5, heads=0.5, calibration=CAL))
    v = prune(dream, PruneSpec("sink_struct_wanda", 0.5, calibration=CAL))
    ids = torch.randint(4, 100, (1, 12), generator=torch.Generator().manual_seed(3))
    with v.applied(dream):
        expected = dream.logits(ids)
    hidden = dream.module.config.intermediate_size
    loaded = load_model(v.save(tmp_path / "small", dream), device="cpu")
    assert loaded.module.config.intermediate_size == hidden - round(0.5 * hidden)
    assert torch.allclose(loaded.logits(ids), expected, atol=1e-5)


@pytest.mark.slow
def test_compare_page_runs_a_structured_variant_and_shows_tokens_per_second():
    from test_app import new_app, texts

    at = new_app()
    at.switch_page("pages/prune.py").run()
    at.selectbox[0].set_value("flap")
    at.button[0].click().run()
    assert not at.exception and not at.error, texts(at.error)
    at.switch_page("pages/compare.py").run()
    nums = {n.label: n for n in at.number_input}
    nums["Generation length"].set_value(16)
    nums["Steps"].set_value(16)
    at.button[0].click().run()
    assert not at.exception and not at.error, texts(at.error)
    heads = [m for m in texts(at.markdown) if "tokens/s" in m]
    assert len(heads) == 2 and any(m.startswith("**flap 50%") for m in heads), heads
    assert (at.dataframe[0].value["tokens_per_second"] > 0).all()


def test_prune_page_heads_control_makes_a_smaller_variant_and_refuses_all_heads():
    """The Prune page shows "Heads removed" (and FLAP's bias compensation) only for structured methods; the
    variant's summary names the channels/heads removed and the smaller parameter count; removing every head
    is the core's one-line refusal, with no variant made."""
    from test_app import new_app, texts

    at = new_app()
    at.switch_page("pages/prune.py").run()
    at.selectbox[0].set_value("wanda").run()
    assert "Heads removed" not in [n.label for n in at.number_input]
    at.selectbox[0].set_value("sink_flap").run()
    nums = {n.label: n for n in at.number_input}
    assert "Bias compensation" in [c.label for c in at.checkbox]
    nums["Calibration samples"].set_value(2)
    nums["Calibration length"].set_value(32)
    nums["Heads removed"].set_value(0.95)
    at.button[0].click().run()
    assert any("would remove all 6 attention heads" in e for e in texts(at.error)), texts(at.error)
    assert not at.session_state["variants"]
    {n.label: n for n in at.number_input}["Heads removed"].set_value(0.5)
    at.button[0].click().run()
    assert not at.exception and not at.error, texts(at.error)
    (made,) = [s for s in texts(at.success) if s.startswith("Made")]
    assert "removed 256 of 512 MLP channels and 3 of 6 heads per block" in made and "fewer)" in made, made
    variant = at.session_state["variants"][0]["variant"]
    small, dense = (int(x.replace(",", "")) for x in re.search(r"· ([\d,]+) parameters \(dense ([\d,]+)", made).groups())
    assert dense - small == variant.layer_sparsity["zeros"].sum() > 0
    settings = at.table[0].value["value"]
    assert settings["heads removed"] == "0.50" and settings["bias compensation"] == "no"
    assert float(settings["removed parameters (pruned layers)"]) == pytest.approx(variant.achieved_sparsity, abs=1e-3)
