"""Pruning (issue 5): scores, SparseGPT, masks, sink weighting, non-destructiveness, saving, errors."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TEXT, make_model_dir

from sap_core.decoding import DecodeSpec
from sap_core.diffusion import generate
from sap_core.errors import Cancelled, PruneSpecError
from sap_core.models import load_model
from sap_core.pruning import METHODS, CalibrationSpec, PruneSpec, check_sparsity, prune
from sap_core.pruning import scores as sc
from sap_core.pruning import spec as spec_module
from sap_core.pruning import statistics as stats
from sap_core.pruning.calibration import calibration_ids, noised_ids, tokenize
from sap_core.pruning.masks import n_prune, select_mask
from sap_core.pruning.sparsegpt import Hessian, sparsegpt_prune, sparsegpt_prune_group
from sap_core.sinks import SinkSpec

CAL_TEXT = " ".join(TEXT * 12)
CAL = CalibrationSpec(text=CAL_TEXT, nsamples=2, seqlen=24, T=50, interval=10, batch_size=3)


def nm_holds(weight: torch.Tensor, nm: tuple[int, int]) -> bool:
    """True when every group of M consecutive input weights of every row has at most N non-zeros."""
    n, m = nm
    rows, cols = weight.shape
    return bool(((weight != 0).reshape(rows, cols // m, m).sum(-1) <= n).all())


def spec(method, sparsity=0.5, **kw):
    kw.setdefault("calibration", CAL)
    return PruneSpec(method, sparsity, **kw)


def snapshot(handle):
    return {k: v.detach().clone() for k, v in handle.module.state_dict().items()}


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def assert_same_weights(v1, v2):
    assert v1.weights.keys() == v2.weights.keys()
    for k in v1.weights:
        assert torch.equal(v1.weights[k], v2.weights[k]), k


pytestmark = pytest.mark.usefixtures("one_thread_module")  # conftest.py


@pytest.fixture(scope="module")
def dlm(tmp_path_factory):
    """A module-private tiny DLM (the session one is shared with other tests that must not see changes)."""
    return load_model(make_model_dir(tmp_path_factory.mktemp("prune-dlm"), seed=1), device="cpu")


# --- scores -------------------------------------------------------------------------------------


def test_wanda_matches_brute_force_block_by_block(dlm):
    v = prune(dlm, spec("wanda", 0.5))
    assert v.timings["calibration"] == 0.0  # no noised passes: the block-sequential pass is pruning time
    cal = CAL
    clean, _ = calibration_ids(tokenize(dlm, cal), cal)
    pruned = v.apply_to_copy(dlm)
    with torch.no_grad():
        h = dlm.module.embed(clean)
        for i in range(dlm.n_layers):
            block = dlm.module.blocks[i]
            x = block.attn_norm(h)  # the input q_proj sees, after the already-pruned blocks
            X = x.reshape(-1, x.shape[-1]).double()
            W = block.q_proj.weight.double()
            norms = torch.tensor(
                [sum(float(X[t, c]) ** 2 for t in range(X.shape[0])) ** 0.5 for c in range(X.shape[1])], dtype=torch.float64
            )
            score = W.abs() * norms[None, :]
            k = n_prune(W.shape[1], 0.5)
            expect = torch.zeros_like(W, dtype=torch.bool)
            for r in range(W.shape[0]):
                expect[r, sorted(range(W.shape[1]), key=lambda c: (float(score[r, c]), c))[:k]] = True
            got = v.weights[f"model.transformer.blocks.{i}.q_proj.weight"] == 0
            assert torch.equal(got, expect), f"block {i}"
            h = pruned.module.blocks[i](h)  # next block sees the pruned block's outputs


def test_column_squares_is_the_l2_norm():
    x = torch.randn(3, 5, 7)
    w = torch.rand(3, 5)
    stat = sc.ColumnSquares(7, torch.device("cpu"))
    stat.add(x, w)
    ref = torch.tensor([float(((x[:, :, c] * w) ** 2).sum()) ** 0.5 for c in range(7)])
    assert torch.allclose(stat.norm(), ref, rtol=1e-5)


def test_sparsegpt_reconstructs_better_than_magnitude_and_wanda():
    g = torch.Generator().manual_seed(0)
    rows, cols, tokens = 48, 64, 512
    base = torch.randn(tokens, 8, generator=g) @ torch.randn(8, cols, generator=g)  # strongly correlated
    X = base + 0.1 * torch.randn(tokens, cols, generator=g)
    X[:, :8] *= 4.0
    W = torch.randn(rows, cols, generator=g)
    H = Hessian(cols, torch.device("cpu"))
    H.add(X[None])
    err = {}
    for name in ("magnitude", "wanda", "sparsegpt"):
        if name == "magnitude":
            Wp = W.masked_fill(select_mask(W.abs(), 0.5), 0)
        elif name == "wanda":
            Wp = W.masked_fill(select_mask(W.abs() * X.norm(dim=0)[None], 0.5), 0)
        else:
            Wp, mask = sparsegpt_prune(W, H.matrix(), 0.5, blocksize=16)
            assert torch.equal(Wp == 0, mask)
            assert (mask.sum(1) == n_prune(cols, 0.5)).all()
        err[name] = float(((X @ W.T - X @ Wp.T) ** 2).sum())
    assert err["sparsegpt"] < 0.5 * err["wanda"] and err["sparsegpt"] < 0.5 * err["magnitude"], err
    assert not W.eq(0).any()  # input untouched


def test_sparsegpt_nm_and_unaligned_blocks():
    g = torch.Generator().manual_seed(1)
    X = torch.randn(200, 24, generator=g)
    W = torch.randn(10, 24, generator=g)
    H = Hessian(24, torch.device("cpu"))
    H.add(X[None])
    Wp, mask = sparsegpt_prune(W, H.matrix(), 0.0, nm=(2, 4), blocksize=10)  # blocksize rounded to 8
    assert nm_holds(Wp, (2, 4)) and (mask.reshape(10, 6, 4).sum(-1) == 2).all()
    Wp, mask = sparsegpt_prune(W, H.matrix(), 0.3, blocksize=7)  # per-row target across uneven blocks
    assert (mask.sum(1) == n_prune(24, 0.3)).all()


@pytest.mark.parametrize("nm, selection", [(None, "per_row"), ((2, 4), "per_row"), (None, "official")])
def test_sparsegpt_group_prunes_each_linear_as_on_its_own(nm, selection):
    """q/k/v (or gate/up) share one Hessian: pruned as one stacked matrix (per-row, N:M) or one by one
    (official), every linear gets the weights sparsegpt_prune gives it alone, in its own storage."""
    g = torch.Generator().manual_seed(2)
    X = torch.randn(300, 32, generator=g) @ torch.randn(32, 32, generator=g)
    H = Hessian(32, torch.device("cpu"))
    H.add(X[None])
    weights = [torch.randn(rows, 32, generator=g) for rows in (32, 16, 16)]
    group = sparsegpt_prune_group(weights, H.matrix(), 0.5, nm, blocksize=8, selection=selection)
    for W, new in zip(weights, group):
        alone, mask = sparsegpt_prune(W, H.matrix(), 0.5, nm, blocksize=8, selection=selection)
        torch.testing.assert_close(new, alone, rtol=0, atol=1e-6)
        assert torch.equal(new == 0, mask) and new.shape == W.shape and not W.eq(0).any()
    assert len({t.untyped_storage().data_ptr() for t in group}) == 3  # saveable: no shared storage


# --- sink weighting -----------------------------------------------------------------------------


def test_sink_wanda_with_zero_sink_scores_is_noised_wanda(dlm):
    no_sinks = SinkSpec(k=1e6)  # threshold far above every mass: s_t(j) = 0 exactly
    a = prune(dlm, spec("sink_wanda", sink=no_sinks))
    b = prune(dlm, spec("noised_wanda"))
    assert (a.calibration.sink_scores == 0).all() and (a.token_weights == 1).all()
    assert_same_weights(a, b)
    official = prune(dlm, spec("sink_wanda"))
    assert (official.token_weights < 1).any()  # default scores are never exactly zero
    assert np.array_equal(official.calibration.noised, b.calibration.noised)  # same noised inputs


@pytest.mark.parametrize("gated,official", [("gated_sink_wanda", "sink_wanda"), ("gated_sink_sparsegpt", "sink_sparsegpt")])
def test_gated_at_tau_zero_differs_from_the_official_variant_exactly_on_the_non_sinks(dlm, gated, official):
    a = prune(dlm, spec(gated, sink=SinkSpec(tau=0.0)))
    b = prune(dlm, spec(official))
    assert b.timings["calibration"] > 0 and b.timings["calibration"] + b.timings["pruning"] == pytest.approx(b.seconds)
    sink = a.calibration.labels != "none"  # a sink at some noised timestep: at tau = 0 every one is unstable
    assert sink.any() and (~sink).any()
    assert np.array_equal(a.calibration.gate, sink) and b.calibration.gate.all()  # official: every position
    wa, wb = a.token_weights, b.token_weights
    at = (lambda m: m[:, None, :]) if wa.ndim == 3 else (lambda m: m)  # Wanda family: per timestep
    on_sinks = np.broadcast_to(at(sink), wa.shape)
    np.testing.assert_array_equal(wa[on_sinks], wb[on_sinks])  # the sinks: the official factors
    assert (wa[~on_sinks] == 1).all() and (wb[~on_sinks] < 1).all()  # the non-sinks: kept whole vs down-weighted
    assert any(not torch.equal(a.weights[n], b.weights[n]) for n in a.weights)  # so the pruned models differ
    # tau above any possible variance (<= 0.25 for scores in [0, 1]): nothing is gated, no down-weighting
    c = prune(dlm, spec(gated, sink=SinkSpec(tau=1.0)))
    assert not c.calibration.gate.any() and (c.token_weights == 1).all()


def test_gated_factors_follow_the_gate(dlm):
    rec = prune(dlm, spec("gated_sink_wanda", sink=SinkSpec(tau=1e-4, k=0.5))).calibration
    expect = np.where(rec.gate[:, None, :], 1.0 - rec.sink_scores, 1.0).astype(np.float32)
    assert rec.gate.any() and not rec.gate.all()  # some positions gated, some not: the test can fail
    assert np.allclose(rec.token_weights, expect, atol=1e-6)
    assert set(np.unique(rec.labels[rec.gate])) <= {"unstable"}
    assert np.all(rec.variance[rec.gate] >= 1e-4)


def official_prune_sink_stats(handle, noised: torch.Tensor, k: float = 2.0, alpha: float = 5.0):
    """A transcription of the official ``prune_sink`` statistics loop (VILA-Lab/Sink-Aware-Pruning,
    ``lib/prune_llada.py``: ``SinkCollector``, ``_compute_sink_mask``, ``SinkActivationStats``), batch size 1,
    on the given noised inputs ``[N, S, L]``: per sample and timestep, one forward of the whole model to
    sum the attention mass over every layer, head and query; the soft sink mask
    ``sigmoid(alpha·(m − (mean + k·std)))``; a second forward whose forward hooks on every linear scale
    its input by ``1 − mask`` and add the column L2 norm to that linear's accumulator. Returns
    ``({(block, name): accum}, masks [N, S, L])``. Shares no code with the engine: hooks on the model
    itself, torch only."""
    from sap_core.attention import AttentionRecorder

    accum, current, hooks = {}, {}, []
    for i, block in enumerate(handle.module.blocks):
        for name, lin in block.named_modules():
            if isinstance(lin, torch.nn.Linear):
                accum[(i, name)] = torch.zeros(lin.in_features)

                def hook(_m, inp, _out, key=(i, name)):
                    if "mask" in current:
                        x = inp[0].float() * (1.0 - current["mask"]).unsqueeze(-1)
                        accum[key] += torch.norm(x.reshape(-1, x.shape[-1]), p=2, dim=0)

                hooks.append(lin.register_forward_hook(hook))
    N, S, L = noised.shape
    masks = torch.zeros(N, S, L)
    try:
        for n in range(N):
            for t in range(S):
                ids = noised[n, t][None]
                recorder = AttentionRecorder()
                recorder.start_pass()
                handle.module(ids, attention_recorder=recorder)
                mass = recorder.end_pass().sum(dim=(1, 2))  # [1, L]: every layer, head and query
                threshold = mass.mean(dim=1, keepdim=True) + k * mass.std(dim=1, keepdim=True, unbiased=False)
                masks[n, t] = torch.sigmoid(alpha * (mass - threshold))[0]
                current["mask"] = masks[n, t][None]
                handle.module(ids)
                current.clear()
    finally:
        for h in hooks:
            h.remove()
    return accum, masks


def test_sink_wanda_is_the_official_prune_sink(dlm):
    """The engine's sink_wanda scaler rows (column norms) and masks against the official loop, transcribed;
    and the sink SparseGPT factors against the official ``1 − mean_t mask``."""
    from sap_core.pruning.record import record_calibration

    token_ids = tokenize(dlm, CAL)
    clean, g = calibration_ids(token_ids, CAL)
    noised = noised_ids(clean, CAL, dlm.mask_id, g)
    accum, masks = official_prune_sink_stats(dlm, noised)
    record, (stats,) = sc.noised_wanda_stats(dlm, CAL, SinkSpec(), token_ids, [sc.weighting("official", 0.0)])
    assert record.passes == -(-len(CAL.timesteps) // CAL.batch_size) * CAL.nsamples  # one pass per chunk, not two
    np.testing.assert_array_equal(record.noised, noised)
    np.testing.assert_allclose(stats.token_weights, 1 - masks.numpy(), atol=1e-5)  # float64 vs float32 sigmoid
    seen = set()
    for i, groups in enumerate(stats.norms):
        for names, norms in groups.items():
            for name in names:
                torch.testing.assert_close(norms, accum[(i, name)], rtol=1e-4, atol=1e-6)
                seen.add((i, name))
    assert seen == set(accum)
    v = prune(dlm, spec("sink_wanda", 0.5))
    block_names = {(i, n): pname for i, n, pname in v.modules}
    differ = 0
    for key, a in accum.items():
        W = dict(dlm.module.named_parameters())[block_names[key]]
        metric = W.abs().float() * a[None, :]
        official = torch.zeros_like(W, dtype=torch.bool).scatter_(
            1, torch.topk(metric, int(W.shape[1] * 0.5), dim=1, largest=False).indices, True
        )
        differ += int((official != (v.weights[block_names[key]] == 0)).sum())
    assert differ == 0
    # the sink SparseGPT family: prune_sink_sparsegpt's weight 1 − mean over the sampled steps of the mask
    rec = record_calibration(dlm, CAL, SinkSpec(), token_ids)
    np.testing.assert_allclose(rec.mean_factors("official", 0.0), 1 - masks.mean(1).numpy(), atol=1e-5)


def test_forward_noising_probability():
    cal = CalibrationSpec(text="x", nsamples=400, seqlen=50, T=50, interval=5, eps=1e-3)
    clean = torch.full((400, 50), 7)
    noised = noised_ids(clean, cal, 3, torch.Generator().manual_seed(0))
    assert noised.shape == (400, 10, 50)
    rate = (noised == 3).float().mean(dim=(0, 2))
    expect = torch.tensor([cal.mask_probability(t) for t in cal.timesteps])
    assert torch.allclose(rate, expect, atol=0.01)
    assert (noised[:, -1] == 3).all()  # t = T: p = 1


# --- masks and exactness ------------------------------------------------------------------------


@pytest.mark.parametrize("method", [m for m in METHODS if m not in spec_module.STRUCTURED])
def test_unstructured_hits_target_per_row(dlm, method):
    v = prune(dlm, spec(method, 0.3))
    for pname, W in v.weights.items():
        assert ((W == 0).sum(1) == n_prune(W.shape[1], 0.3)).all(), pname
    assert abs(v.achieved_sparsity - 0.3) < 0.01


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt", "sink_wanda", "gated_sink_sparsegpt"])
@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
def test_nm_pattern_holds_in_every_group(dlm, method, pattern):
    before = snapshot(dlm)
    v = prune(dlm, spec(method, 0.0, pattern=pattern))
    assert_same(before, snapshot(dlm))
    n, m = map(int, pattern.split(":"))
    for pname, W in v.weights.items():
        assert nm_holds(W, (n, m)), pname
        assert ((W == 0).reshape(W.shape[0], -1, m).sum(-1) == m - n).all(), pname
    frame = check_sparsity(v)
    assert list(frame.columns) == ["block", "module", "rows", "cols", "params", "zeros", "sparsity"]
    assert np.allclose(frame["sparsity"], 0.5)


def test_check_sparsity_on_models_and_variants(dlm):
    v = prune(dlm, spec("magnitude", 0.25))
    dense = check_sparsity(dlm)
    assert len(dense) == dlm.n_layers * 7 and dense.attrs["overall"] < 0.01
    copy = v.apply_to_copy(dlm)
    assert check_sparsity(copy).equals(v.layer_sparsity)
    per_layer = check_sparsity(copy, by="layer")
    assert list(per_layer["block"]) == list(range(dlm.n_layers)) and np.allclose(per_layer["sparsity"], 0.25)
    with v.applied(dlm):
        assert check_sparsity(dlm.module).equals(v.layer_sparsity)


# --- non-destructive ----------------------------------------------------------------------------


def test_dense_model_untouched_bit_for_bit(dlm):
    before = snapshot(dlm)
    for method in METHODS:
        prune(dlm, spec(method, 0.5, pattern="2:4" if method in ("sparsegpt", "sink_wanda") else "unstructured"))
    assert_same(before, snapshot(dlm))


def test_applied_swaps_in_and_restores_even_on_error(dlm):
    before = snapshot(dlm)
    v = prune(dlm, spec("sparsegpt", 0.5))
    ids = torch.randint(4, 200, (1, 16), generator=torch.Generator().manual_seed(0))
    dense_logits = dlm.logits(ids)
    copy = v.apply_to_copy(dlm)
    with v.applied(dlm) as h:
        assert h is dlm
        assert torch.equal(dlm.logits(ids), copy.logits(ids))
        assert not torch.equal(dlm.logits(ids), dense_logits)
    assert_same(before, snapshot(dlm))
    with pytest.raises(RuntimeError, match="boom"):
        with v.applied(dlm):
            raise RuntimeError("boom")
    assert_same(before, snapshot(dlm))
    assert torch.equal(dlm.logits(ids), dense_logits)
    assert copy.tokenizer is dlm.tokenizer and copy.lock is not dlm.lock


def test_taps_are_snapshots_of_the_dense_weights(dlm):
    v = prune(dlm, spec("magnitude", 0.5))
    taps = sc.make_taps(dlm)
    with v.applied(dlm):
        assert torch.equal(dlm.module.blocks[0].q_proj.weight, v.weights["model.transformer.blocks.0.q_proj.weight"])
        assert not (taps[0].weight("q_proj") == 0).any()  # the swap does not reach a snapshot
    assert taps[0].weight("q_proj") is not dlm.module.blocks[0].q_proj.weight


def test_cancel_leaves_dense_untouched_and_progress_counts(dlm):
    before = snapshot(dlm)
    calls = []
    v = prune(dlm, spec("sink_wanda"), progress=lambda d, t, m: calls.append((d, t, m)))
    total = CAL.nsamples * len(CAL.timesteps) + dlm.n_layers
    assert calls[0][:2] == (0, total) and calls[-1][:2] == (total, total)
    assert [c[0] for c in calls] == sorted(c[0] for c in calls)
    assert sum("timesteps" in c[2] for c in calls) >= CAL.nsamples and sum("block" in c[2] for c in calls) == dlm.n_layers

    def cancel(done, total, message):
        if done >= 2:
            raise Cancelled("stop")

    for method in ("sink_wanda", "sparsegpt", "gated_sink_sparsegpt"):
        with pytest.raises(Cancelled):
            prune(dlm, spec(method), progress=cancel)
    assert_same(before, snapshot(dlm))
    assert v.seconds > 0 and v.passes == CAL.nsamples * 2  # one recorded pass per batch (5 timesteps, batches of 3)


def test_same_spec_same_result(dlm):
    assert_same_weights(
        prune(dlm, spec("gated_sink_sparsegpt", sink=SinkSpec(tau=1e-4))),
        prune(dlm, spec("gated_sink_sparsegpt", sink=SinkSpec(tau=1e-4))),
    )
    a = prune(dlm, spec("sink_wanda", calibration=dataclasses.replace(CAL, batch_size=1)))
    b = prune(dlm, spec("sink_wanda"))
    assert np.array_equal(a.token_weights, b.token_weights)  # batching changes speed, not the factors


def test_saved_variant_reloads_and_generates(dlm, tmp_path):
    v = prune(dlm, spec("sink_sparsegpt", 0.5))
    out = v.save(tmp_path / "pruned", dlm)
    assert (out / "pruning.json").exists() and list(out.glob("*.safetensors"))
    again = load_model(out, device="cpu")
    params = dict(again.module.named_parameters())
    for name, W in v.weights.items():
        assert torch.equal(params[name], W)
    assert np.isclose(check_sparsity(again).attrs["overall"], v.achieved_sparsity)
    decode = DecodeSpec(gen_length=8, steps=8, block_length=8)
    traj = generate(again, "To be, or not", decode)
    ref = generate(v.apply_to_copy(dlm), "To be, or not", decode)
    assert np.array_equal(traj.final_tokens, ref.final_tokens)
    assert (traj.final_tokens != again.mask_id).all()


# --- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad,match",
    [
        (dict(method="wandaa"), "Unknown pruning method"),
        (dict(sparsity=1.0), r"\[0, 1\)"),
        (dict(sparsity=-0.1), r"\[0, 1\)"),
        (dict(pattern="4:4"), "N < M"),
        (dict(pattern="6:4"), "N < M"),
        (dict(pattern="2-4"), "N:M"),
        (dict(pattern="3:5"), "divisible by 5"),
        (dict(calibration=dataclasses.replace(CAL, nsamples=0)), "nsamples"),
        (dict(calibration=dataclasses.replace(CAL, text="   ")), "empty"),
        (dict(calibration=dataclasses.replace(CAL, seqlen=100000)), "seqlen"),
        (dict(calibration=dataclasses.replace(CAL, text="To be.")), "tokens long"),
        (dict(calibration=dataclasses.replace(CAL, interval=60)), "interval"),
    ],
)
def test_bad_input_errors_before_any_work(dlm, bad, match):
    kw = dict(method="sink_wanda", sparsity=0.5, calibration=CAL)
    kw.update(bad)
    calls = []
    with pytest.raises(PruneSpecError, match=match):
        prune(dlm, PruneSpec(**kw), progress=lambda *a: calls.append(a))
    assert calls == []


def test_missing_default_calibration_text(dlm, monkeypatch, tmp_path):
    monkeypatch.setattr(spec_module, "DEFAULT_CALIBRATION", tmp_path / "nothing.txt")
    with pytest.raises(PruneSpecError, match="No calibration text"):
        prune(dlm, PruneSpec("wanda", 0.5))
    prune(dlm, PruneSpec("magnitude", 0.5))  # needs no data
    text_file = tmp_path / "cal.txt"
    text_file.write_text(CAL_TEXT)
    monkeypatch.setattr(spec_module, "DEFAULT_CALIBRATION", text_file)
    v = prune(dlm, PruneSpec("wanda", 0.5, calibration=dataclasses.replace(CAL, text=None)))
    assert v.calibration.ids.shape == (CAL.nsamples, CAL.seqlen)


def test_variant_refuses_another_model(dlm, tmp_path):
    other = load_model(make_model_dir(tmp_path, d_model=48, n_heads=4, mlp_hidden_size=96), device="cpu")
    v = prune(dlm, spec("magnitude"))
    with pytest.raises(PruneSpecError, match="another model"):
        with v.applied(other):
            pass


# --- the method table ---------------------------------------------------------------------------


def test_cli_choices_app_help_and_methods_come_from_the_one_table():
    from streamlit.testing.v1 import AppTest

    from sap_core.cli import build_parser
    from sap_core.pruning.spec import GATED, METHOD_TABLE

    names = [m.name for m in METHOD_TABLE]
    assert list(METHODS) == names and [METHODS[n] for n in names] == [m.description for m in METHOD_TABLE]
    assert (
        GATED
        == {m.name for m in METHOD_TABLE if m.gated}
        == {
            "gated_sink_wanda",
            "gated_sink_sparsegpt",
            "gated_sink_struct_wanda",
            "gated_sink_flap",
        }
    )
    prune_cli = build_parser()._subparsers._group_actions[0].choices["prune"]
    method = next(a for a in prune_cli._actions if "--method" in a.option_strings)
    assert list(method.choices) == names
    assert all(f"{m.name}: {m.description}" in method.help for m in METHOD_TABLE)

    at = AppTest.from_file(str(Path(__file__).resolve().parents[1] / "app.py"), default_timeout=300)
    at.run()
    at.switch_page("pages/prune.py").run()
    assert not at.exception
    assert at.selectbox[0].options == names
    for row in METHOD_TABLE:
        at.selectbox[0].set_value(row.name).run()
        shown = [str(m.value) for m in at.markdown]
        assert any(f"**{row.name}**: {row.description}" in m and row.traits in m for m in shown), shown


def test_the_pruner_reads_the_row_not_the_name(dlm, monkeypatch):
    """A new name with sink_wanda's row prunes exactly as sink_wanda; the row's ``gated`` field, not
    tau, decides whether the variance gate applies (an ungated row ignores tau, and keeps it)."""
    row = dataclasses.replace(spec_module.METHOD_ROWS["sink_wanda"], name="renamed_sink_wanda")
    monkeypatch.setitem(spec_module.METHOD_ROWS, row.name, row)
    monkeypatch.setitem(spec_module.METHODS, row.name, row.description)
    sink = SinkSpec(tau=1e-4, k=0.5)
    a = prune(dlm, spec("sink_wanda", sink=sink))
    b = prune(dlm, spec("renamed_sink_wanda", sink=sink))
    assert a.weights.keys() == b.weights.keys() and all(torch.equal(a.weights[k], b.weights[k]) for k in a.weights)
    assert b.spec.sink.tau == 1e-4 and np.array_equal(a.token_weights, b.token_weights)
    gated = dataclasses.replace(row, name="renamed_gated", gated=True)
    monkeypatch.setitem(spec_module.METHOD_ROWS, gated.name, gated)
    monkeypatch.setitem(spec_module.METHODS, gated.name, gated.description)
    c = prune(dlm, spec("renamed_gated", sink=sink))
    ref = prune(dlm, spec("gated_sink_wanda", sink=sink))
    assert np.array_equal(c.token_weights, ref.token_weights) and not np.array_equal(c.token_weights, a.token_weights)


def test_a_method_row_must_be_consistent():
    with pytest.raises(ValueError, match="inconsistent"):
        spec_module.Method("x", "gated without weighting", "clean", stats.WANDA, True, "none", gated=True)
    with pytest.raises(ValueError, match="inconsistent"):
        spec_module.Method("x", "a key, not a statistic", "clean", "wanda", True)
    with pytest.raises(ValueError, match="inconsistent"):
        spec_module.Method("x", "FLAP masks no single weight", "clean", stats.FLUCTUATION, True)
    with pytest.raises(ValueError, match="inconsistent"):
        spec_module.Method("x", "SparseGPT is block-sequential", "noised", stats.HESSIAN, False)
    with pytest.raises(ValueError, match="inconsistent"):
        spec_module.Method("x", "magnitude reads no data", "clean", stats.MAGNITUDE, True)


def test_the_registry_holds_one_object_per_statistic():
    """Each statistic is one registered object, and the method table refers to those objects (its ``name``
    the key shown): adding one is its class and a table row."""
    assert list(stats.STATISTICS) == ["magnitude", "wanda", "hessian", "fluctuation"]
    assert [type(s) for s in stats.STATISTICS.values()] == [stats.Magnitude, stats.Wanda, stats.Hessian, stats.Fluctuation]
    assert {row.statistic for row in spec_module.METHOD_TABLE} == set(stats.STATISTICS.values())
    for row in spec_module.METHOD_TABLE:
        assert row.statistic is stats.STATISTICS[row.statistic.name] and row.statistic.words in row.traits
    assert {row.name for row in spec_module.METHOD_TABLE if row.statistic.compensates} == {
        "flap",
        "sink_flap",
        "gated_sink_flap",
        "noised_flap",
    }


class _ToyWanda(stats.Statistic):
    """Wanda's score written again, under another name."""

    name = "toy_wanda"
    words = "toy: |W| times the column norm"

    def weight_scores(self, W, norms):
        return W.abs().float() * norms.to(W.device)[None, :]


class _ToyReversed(stats.Statistic):
    """Prunes the weights Wanda keeps: the negated Wanda score."""

    name = "toy_reversed"
    words = "toy: −|W| times the column norm"

    def weight_scores(self, W, norms):
        return -(W.abs().float() * norms.to(W.device)[None, :])


def test_a_statistic_registered_in_a_test_prunes_through_the_engine(dlm, monkeypatch):
    monkeypatch.setattr(stats, "STATISTICS", dict(stats.STATISTICS))  # registered for this test only
    for cls, name in ((_ToyWanda, "toy_wanda_method"), (_ToyReversed, "toy_reversed_method")):
        stats.register(cls)
        row = spec_module.Method(name, cls.__doc__, "clean", stats.STATISTICS[cls.name], True)
        monkeypatch.setitem(spec_module.METHOD_ROWS, name, row)
        monkeypatch.setitem(spec_module.METHODS, name, row.description)
    assert set(stats.STATISTICS) >= {"toy_wanda", "toy_reversed"}
    wanda = prune(dlm, spec("wanda"))
    assert_same_weights(prune(dlm, spec("toy_wanda_method")), wanda)  # the same score: the same variant, bit for bit
    reversed_ = prune(dlm, spec("toy_reversed_method"))
    assert reversed_.achieved_sparsity == pytest.approx(wanda.achieved_sparsity)
    first = next(iter(wanda.weights))  # the first block sees the same inputs: its masks are complements
    kept_w, kept_r = wanda.weights[first] != 0, reversed_.weights[first] != 0
    assert not (kept_w & kept_r).any() and kept_w.sum() == kept_r.sum()


@pytest.mark.parametrize("method", ["sink_wanda", "gated_sink_wanda", "sink_sparsegpt", "gated_sink_sparsegpt"])
def test_each_sample_is_scored_once(dlm, monkeypatch, method):
    """Factors and record come from one scoring of each sample (each forward chunk of timesteps, scored
    as its pass ends by the calibration stage), never a rescoring."""
    from sap_core import sinks

    calls = []
    real = sinks.score_steps
    monkeypatch.setattr(sinks, "score_steps", lambda mass, *a, **kw: calls.append(np.shape(mass)) or real(mass, *a, **kw))
    v = prune(dlm, spec(method, sink=SinkSpec(tau=1e-4, k=0.5)))
    S = len(CAL.timesteps)
    chunks = -(-S // CAL.batch_size)  # the calibration stage scores each chunk as its pass ends
    assert len(calls) == CAL.nsamples * chunks
    assert sum(shape[0] for shape in calls) == CAL.nsamples * S  # every step scored exactly once
    assert v.calibration.sink_scores.shape == (CAL.nsamples, S, CAL.seqlen)


def test_weights_restored_after_a_variant_and_settings_table(dlm):
    """The pages' check after a cancel: the dense weights are back exactly when the variant is swapped out."""
    from sap_core.pruning.variant import weights_fingerprint, weights_restored

    before = weights_fingerprint(dlm)
    variant = prune(dlm, spec("wanda"))
    assert weights_restored(dlm, before) and not weights_restored(dlm, None)
    with variant.applied(dlm):
        assert not (weights_fingerprint(dlm) == before)
    assert weights_restored(dlm, before)
    table = variant.settings_table()
    assert table.loc["method", "value"] == "wanda" and "variance threshold tau" not in table.index
    assert table.loc["calibration", "value"].startswith(f"{CAL.nsamples} windows")
