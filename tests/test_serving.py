"""Shared mode's settings, the run and session stores, packed mask variants and the variants' memory budget."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from sap_core.cli import main
from sap_core.memory import BudgetError, MemoryBudget, block_linear_params, llada_8b_variant_memory
from sap_core.runs import RunError, RunStore, SessionStore
from sap_core.serving import ServerSettings, ServerSettingsError, without_paths


@pytest.fixture
def roots(tmp_path, tiny_dlm_dir):
    models, runs = tmp_path / "models", tmp_path / "runs"
    runs.mkdir()
    shutil.copytree(tiny_dlm_dir, models / "my-dlm")
    return models, runs


def test_settings_roundtrip_and_models_offered_by_name(roots):
    models, runs = roots
    s = ServerSettings(shared=True, models_dir=models, runs_dir=runs, heavy_jobs=False, max_gen_length=32, memory_budget_gb=1)
    assert ServerSettings.from_env(s.to_env()) == ServerSettings(
        shared=True, models_dir=models.resolve(), runs_dir=runs.resolve(), heavy_jobs=False, max_gen_length=32, memory_budget_gb=1
    )
    assert s.model_names() == ["tiny-dlm", "tiny-ar", "my-dlm"]
    assert s.source_of("my-dlm") == str((models / "my-dlm").resolve())
    for crafted in ("/etc", "../runs", str(models / "my-dlm")):
        with pytest.raises(ServerSettingsError, match="not offered"):
            s.source_of(crafted)
    assert ServerSettings.from_env({}) == ServerSettings()  # plain `streamlit run app.py`: single-user defaults


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(models_dir=None), "needs --models"),
        (dict(runs_dir="missing"), "--runs .* is not a directory"),
        (dict(runs_dir="model"), "inside a model directory"),
        (dict(memory_budget_gb=1e-6), "below one variant"),
        (dict(max_gen_length=0), "at least 1"),
    ],
)
def test_settings_refuse_bad_input_in_one_line(roots, change, message):
    models, runs = roots
    values = dict(shared=True, models_dir=models, runs_dir=runs)
    values.update({k: {"missing": runs / "nope", "model": models / "my-dlm" / "sub"}.get(v, v) for k, v in change.items()})
    (models / "my-dlm" / "sub").mkdir(exist_ok=True)
    with pytest.raises(ServerSettingsError, match=message) as info:
        ServerSettings(**values)
    assert "\n" not in str(info.value)


def test_cli_app_refuses_before_streamlit_starts(roots, capsys):
    models, runs = roots
    assert main(["app", "--shared", "--models", str(models), "--runs", str(models / "my-dlm")]) == 2
    assert capsys.readouterr().err.startswith("error: --runs")
    assert main(["app", "--shared", "--runs", str(runs)]) == 2
    assert "needs --models" in capsys.readouterr().err


def test_messages_lose_server_paths():
    assert without_paths("Save directory '/srv/class/runs/x' is not empty; C:\\data too") == (
        "Save directory '<server path>' is not empty; <server path> too"
    )


def test_run_store_ids_expiry_and_read_only_for_others(tiny_dlm, tmp_path):
    from sap_core.decoding import DecodeSpec
    from sap_core.diffusion import generate

    traj = generate(tiny_dlm, "To be", DecodeSpec(8, 8, 8))
    now = [0.0]
    store = RunStore(lifetime_s=60, directory=tmp_path, clock=lambda: now[0])
    run_id = store.put(traj, "tiny", "label", author="alice-session")
    assert store.get(run_id).trajectory is traj and len(run_id) >= 16
    assert (tmp_path / f"run-{run_id}.npz").is_file()  # shared mode: also on disk, found after a restart
    again = RunStore(lifetime_s=60, directory=tmp_path, clock=lambda: now[0]).get(run_id)
    np.testing.assert_array_equal(again.trajectory.final_tokens, traj.final_tokens)
    with pytest.raises(RunError, match="view it but not change it"):
        store.replace(run_id, traj, "mine now", session="bob-session")
    store.replace(run_id, traj, "new label", session="alice-session")
    for crafted in ("../../etc/passwd", "/etc/passwd", "x", "a" * 100):
        with pytest.raises(RunError) as info:
            store.get(crafted)
        assert crafted not in str(info.value)
    now[0] = 61
    with pytest.raises(RunError, match="no longer stored"):
        store.get(run_id)


def test_sessions_expire_and_new_ids_for_unknown(monkeypatch):
    now = [0.0]
    store = SessionStore(MemoryBudget(100), idle_s=7200, clock=lambda: now[0])
    s = store.session(None)
    assert store.session(s.id) is s
    assert store.session("someone-elses-guess").id != s.id
    now[0] = 7201
    assert store.session(s.id).id != s.id


def test_budget_refuses_before_allocating_and_releases_idle_sessions_first():
    now = [0.0]
    store = SessionStore(MemoryBudget(100), release_after_s=600, clock=lambda: now[0])
    old, active, me = store.session(None), store.session(None), store.session(None)
    store.add_variant(old.id, {"name": "old-v", "bytes": 40})
    store.add_variant(active.id, {"name": "active-v", "bytes": 40})
    store.add_variant(me.id, {"name": "mine", "bytes": 15})
    now[0] = 700
    store.session(active.id), store.session(me.id)  # these two came back; `old` stays idle
    assert store.reserve(me.id, 40) == ["old-v"]  # the idle session's variant goes first
    assert old.variants == [] and "released while you were away" in old.notices[0]
    with pytest.raises(BudgetError, match="Drop or save one of your variants \\(mine\\)"):
        store.reserve(me.id, 60)  # active sessions keep theirs: refused, nothing released
    assert [v["name"] for v in active.variants] == ["active-v"]
    with pytest.raises(BudgetError):
        store.add_variant(me.id, {"name": "too-big", "bytes": 50})


def test_a_reservation_holds_its_room_until_the_variant_is_kept_or_given_back():
    store = SessionStore(MemoryBudget(100))
    a, b = store.session(None), store.session(None)
    store.reserve(a.id, 60)  # two students press Prune together: the first holds 60 while its job waits and runs
    with pytest.raises(BudgetError, match="hold 60 B"):
        store.reserve(b.id, 60)  # refused at once, not after both variants were made
    store.add_variant(a.id, {"name": "a-v", "bytes": 55})  # kept in its room: the hold becomes the variant
    assert store.used() == 55
    store.reserve(b.id, 40)
    store.release(b.id)  # b's job failed or was cancelled: its room comes back
    assert store.used() == 55
    store.reserve(a.id, 45), store.reserve(a.id, 45)  # one job a session: a new hold replaces its earlier one
    assert store.used() == 100


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sink_wanda"])
def test_packed_mask_variant_applies_bit_for_bit(tiny_dlm, one_thread, method):
    from sap_core.pruning import CalibrationSpec, PruneSpec, prune
    from sap_core.pruning.variant import MaskedVariant, pack, resident_bytes

    variant = prune(tiny_dlm, PruneSpec(method, 0.5, calibration=CalibrationSpec(nsamples=2, seqlen=16)))
    packed = pack(variant, tiny_dlm)
    assert isinstance(packed, MaskedVariant)
    assert resident_bytes(packed) * 32 <= resident_bytes(variant) + 32 * len(variant.weights)  # float32: 1/32
    dense = {n: p.data.clone() for n, p in tiny_dlm.module.named_parameters()}
    for name in variant.weights:
        assert torch.equal(packed.weights[name].view(torch.int32), variant.weights[name].view(torch.int32))
    with packed.applied(tiny_dlm):
        inside = {n: p.data.clone() for n, p in tiny_dlm.module.named_parameters()}
    with variant.applied(tiny_dlm):
        for n, p in tiny_dlm.module.named_parameters():
            assert torch.equal(p.data.view(torch.int32), inside[n].view(torch.int32))
    for n, p in tiny_dlm.module.named_parameters():  # restored bit for bit
        assert torch.equal(p.data.view(torch.int32), dense[n].view(torch.int32))


def test_sparsegpt_keeps_its_copy(tiny_dlm, one_thread):
    from sap_core.pruning import CalibrationSpec, PruneSpec, prune
    from sap_core.pruning.variant import MaskedVariant, pack

    variant = prune(tiny_dlm, PruneSpec("sparsegpt", 0.5, calibration=CalibrationSpec(nsamples=2, seqlen=16)))
    assert not isinstance(pack(variant, tiny_dlm), MaskedVariant)


def test_memory_per_variant_at_llada_8b_shape(tiny_dlm):
    from sap_core.pruning.variant import target_linears

    config = tiny_dlm.module.config.to_dict()
    assert block_linear_params(config) == sum(lin.weight.numel() for _, _, lin in target_linears(tiny_dlm.module))
    m = llada_8b_variant_memory()
    assert m["linear_params"] == 6_979_321_856
    assert m["mask"] * 16 == m["copy"]  # one bit per weight against a bfloat16 copy: 1/16 (872 MB against 14.0 GB)
