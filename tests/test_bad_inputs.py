"""Hostile and careless input (issue 12): every case asserts the one-line error AND that nothing was lost
(sha256 of the files around it before and after). Library cases first, then the CLI (in-process with
``main``; a few subprocesses prove the exit status and the absence of a traceback)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import resource
import shutil
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_model_dir
from safetensors.torch import load_file, save_file

from sap_core.cli import main
from sap_core.decoding import DecodeSpec, Trajectory, TrajectoryError, npz_path
from sap_core.diffusion import generate
from sap_core.errors import DecodeSpecError, MemoryGuardError, ModelLoadError, OutputPathError, PruneSpecError, SapError
from sap_core.evaluate import EvalSpec, perplexity
from sap_core.memory import check_capture
from sap_core.models import load_model
from sap_core.models.llada import LLaDAModelLM
from sap_core.pruning import CalibrationSpec, PruneSpec, prune
from sap_core.pruning.spec import parse_pattern
from sap_core.pruning.variant import is_variant_dir
from sap_core.sweep import SweepSpec, SweepSpecError, load_sweep, partial_path, run_sweep, save_sweep

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread_module")  # conftest.py


def hashes(*roots: Path) -> dict[str, str]:
    """sha256 of every file under ``roots`` (a file root hashes itself)."""
    out = {}
    for root in roots:
        root = Path(root)
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []
        for f in files:
            out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def one_line(exc: BaseException) -> str:
    text = str(exc)
    assert text and "\n" not in text and "Traceback" not in text
    return text


# --- fixtures ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def variant(tiny_dlm):
    return prune(tiny_dlm, PruneSpec("magnitude", 0.3))


@pytest.fixture(scope="module")
def other_dlm_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("other-dlm"), seed=1)


@pytest.fixture(scope="module")
def other_dlm(other_dlm_dir):
    return load_model(other_dlm_dir, device="cpu")


@pytest.fixture
def broken(tiny_dlm_dir, tmp_path):
    """A fresh copy of the tiny model to damage."""
    return Path(shutil.copytree(tiny_dlm_dir, tmp_path / "model"))


def edit_config(path: Path, **changes) -> None:
    config = json.loads((path / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            config.pop(k, None)
        else:
            config[k] = v
    (path / "config.json").write_text(json.dumps(config))


def shard(path: Path, parts: int = 2, suffix: str = ".safetensors") -> None:
    """Split model.safetensors into ``parts`` shards with an index (as large checkpoints come)."""
    tensors = load_file(str(path / "model.safetensors"))
    names = sorted(tensors)
    weight_map = {}
    for i in range(parts):
        name = f"model-{i + 1:05d}-of-{parts:05d}{suffix}"
        chunk = {n: tensors[n] for n in names[i::parts]}
        save_file(chunk, str(path / name)) if suffix == ".safetensors" else torch.save(chunk, path / name)
        weight_map.update({n: name for n in chunk})
    (path / "model.safetensors").unlink()
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def refused(path: Path, *needles: str, device: str = "cpu") -> str:
    before = hashes(path)
    with pytest.raises(ModelLoadError) as info:
        load_model(path, device=device)
    text = one_line(info.value)
    for needle in needles:
        assert needle in text, text
    assert hashes(path) == before
    return text


# --- 1. saving never destroys files --------------------------------------------------------------------


def test_save_into_the_loaded_models_own_directory_is_refused(tiny_dlm, tiny_dlm_dir, variant):
    before = hashes(tiny_dlm_dir)
    with pytest.raises(OutputPathError, match="loaded model's directory"):
        variant.save(tiny_dlm_dir, tiny_dlm)
    with pytest.raises(OutputPathError, match="loaded model's directory"):
        variant.save(tiny_dlm_dir / "sub" / "..", tiny_dlm, overwrite=True)  # other spelling, same place
    assert hashes(tiny_dlm_dir) == before


def test_save_inside_or_above_the_model_directory_is_refused(tiny_dlm, tiny_dlm_dir, variant):
    before = hashes(tiny_dlm_dir)
    for target in (tiny_dlm_dir / "pruned", tiny_dlm_dir.parent):
        with pytest.raises(OutputPathError):
            variant.save(target, tiny_dlm)
    assert hashes(tiny_dlm_dir) == before and not (tiny_dlm_dir / "pruned").exists()


def test_save_into_a_non_variant_directory_is_refused(tiny_dlm, variant, other_dlm_dir, tmp_path):
    user = Path(shutil.copytree(other_dlm_dir, tmp_path / "users-model"))
    (user / "model-00001-of-00002.safetensors").write_bytes(b"the user's shard")
    before = hashes(user)
    with pytest.raises(OutputPathError, match="not a SinkScope variant"):
        variant.save(user, tiny_dlm, overwrite=True)  # overwrite never applies to a non-variant
    assert hashes(user) == before


def test_save_replaces_a_variant_only_with_overwrite(tiny_dlm, variant, tmp_path):
    target = variant.save(tmp_path / "v", tiny_dlm)
    assert target == (tmp_path / "v").resolve() and is_variant_dir(target)
    before = hashes(target)
    with pytest.raises(OutputPathError, match="overwrite"):
        variant.save(target, tiny_dlm)
    assert hashes(target) == before
    half = prune(tiny_dlm, PruneSpec("magnitude", 0.5))
    half.save(target, tiny_dlm, overwrite=True)
    record = json.loads((target / "pruning.json").read_text())
    assert record["sparsity"] == 0.5
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind


def test_saved_record_agrees_with_its_weights(tiny_dlm, variant, tmp_path):
    target = variant.save(tmp_path / "v", tiny_dlm)
    record = json.loads((target / "pruning.json").read_text())
    weights = load_file(str(target / "model.safetensors"))
    pruned = [w for name, w in weights.items() if "blocks" in name and w.dim() == 2]
    zeros = sum(int((w == 0).sum()) for w in pruned) / sum(w.numel() for w in pruned)
    assert abs(zeros - record["achieved_sparsity"]) < 1e-6 and abs(zeros - 0.3) < 0.01
    assert record["dense_fingerprint"]["names"]
    loaded = load_model(target, device="cpu")
    assert loaded.mask_id == tiny_dlm.mask_id


def test_save_into_an_empty_existing_directory_works(tiny_dlm, variant, tmp_path):
    (tmp_path / "empty").mkdir()
    assert is_variant_dir(variant.save(tmp_path / "empty", tiny_dlm))


@pytest.mark.parametrize("stage", ["weights", "tokenizer", "record"])
def test_a_save_killed_midway_leaves_the_previous_variant_intact(tiny_dlm, variant, tmp_path, monkeypatch, stage):
    target = variant.save(tmp_path / "v", tiny_dlm)
    before = hashes(target)
    half = prune(tiny_dlm, PruneSpec("magnitude", 0.7))

    def boom(self, directory, *a, **k):
        Path(directory, "config.json").write_text("")  # half-written, as a kill would leave it
        raise KeyboardInterrupt("killed")

    if stage == "weights":
        monkeypatch.setattr(LLaDAModelLM, "save_pretrained", boom)
    elif stage == "tokenizer":
        monkeypatch.setattr(type(tiny_dlm.tokenizer), "save_pretrained", boom)
    else:
        real = Path.write_text

        def write_text(self, *a, **k):
            if self.name == "pruning.json":
                raise KeyboardInterrupt("killed")
            return real(self, *a, **k)

        monkeypatch.setattr(Path, "write_text", write_text)
    with pytest.raises(KeyboardInterrupt):
        half.save(target, tiny_dlm, overwrite=True)
    assert hashes(target) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v"]
    assert json.loads((target / "pruning.json").read_text())["sparsity"] == 0.3


def test_save_to_a_file_or_under_a_file_is_refused(tiny_dlm, variant, tmp_path):
    f = tmp_path / "a-file"
    f.write_text("keep me")
    for target in (f, f / "sub"):
        with pytest.raises(OutputPathError, match="is a file"):
            variant.save(target, tiny_dlm)
    assert f.read_text() == "keep me"


def test_save_to_an_unwritable_place_is_refused(tiny_dlm, variant, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as root: permissions are not enforced")
        with pytest.raises(OutputPathError, match="not writable"):
            variant.save(locked / "v", tiny_dlm)
    finally:
        locked.chmod(0o700)


def test_atomic_writes_leave_no_sibling_and_the_mode_of_a_plain_write(tmp_path):
    from sap_core.files import atomic_write, atomic_write_bytes, atomic_write_text

    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    atomic_write_text(tmp_path / "a.txt", "text")
    atomic_write_bytes(tmp_path / "b.bin", b"\x00\x01")
    with pytest.raises(RuntimeError):
        atomic_write(tmp_path / "a.txt", lambda p: (p.write_text("half"), (_ for _ in ()).throw(RuntimeError("boom"))))
    assert (tmp_path / "a.txt").read_text() == "text" and (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.bin", "plain.txt"]  # no temporary left
    mode = plain.stat().st_mode & 0o777  # what open() gives under this process's umask (mkstemp alone gives 0600)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == mode and (tmp_path / "b.bin").stat().st_mode & 0o777 == mode


# --- 2. the [MASK] id ------------------------------------------------------------------------------------


def test_mask_id_comes_from_the_tokenizer_when_the_config_lacks_it(broken):
    edit_config(broken, mask_token_id=None)
    handle = load_model(broken, device="cpu")
    assert handle.mask_id == handle.tokenizer.mask_token_id == 3
    traj = generate(handle, "To be", DecodeSpec(gen_length=4, steps=4, block_length=4))
    assert traj.final_tokens.max() < len(handle.tokenizer)


def test_no_mask_token_anywhere_is_refused(broken):
    edit_config(broken, mask_token_id=None)
    cfg = json.loads((broken / "tokenizer_config.json").read_text())
    cfg.pop("mask_token", None)
    for entry in cfg.get("added_tokens_decoder", {}).values():
        entry["special"] = entry.get("special", True)
    (broken / "tokenizer_config.json").write_text(json.dumps(cfg))
    smap = broken / "special_tokens_map.json"
    if smap.exists():
        m = json.loads(smap.read_text())
        m.pop("mask_token", None)
        smap.write_text(json.dumps(m))
    refused(broken, "[MASK]", "mask_token_id")


@pytest.mark.parametrize(
    "field,value,needle",
    [
        ("mask_token_id", 126336, "outside the embedding"),
        ("pad_token_id", 5000, "outside the embedding"),
        ("mask_token_id", -1, "token id"),
        ("eos_token_id", "2", "token id"),
    ],
)
def test_special_ids_are_range_checked(broken, field, value, needle):
    edit_config(broken, **{field: value})
    refused(broken, field, needle)


# --- 3. memory ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layers", [1000, 100000])
def test_a_config_declaring_more_layers_than_the_weights_is_refused_at_once(broken, layers):
    edit_config(broken, n_layers=layers)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    refused(broken, f"declares {layers} layers", "hold 2")
    assert time.perf_counter() - t0 < 1.0
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 100 * 1024  # KiB: under 100 MiB more


def test_a_config_wider_than_the_weights_is_refused_before_allocation(broken):
    edit_config(broken, d_model=64, n_heads=4, n_kv_heads=4)
    refused(broken, "shape", "config.json")


def test_capture_guard_refuses_with_the_estimate_and_what_to_change(tiny_dlm):
    with pytest.raises(MemoryGuardError) as info:
        check_capture(tiny_dlm, 64, 64, free=(1024, None))
    text = one_line(info.value)
    assert "64 steps" in text and "fewer steps" in text and "--allow-large-capture" in text
    assert check_capture(tiny_dlm, 64, 64, allow=True, free=(1024, None)).capture_record == 64 * 2 * 4 * 64 * 4
    with pytest.raises(MemoryGuardError, match="GPU memory"):
        check_capture(tiny_dlm, 64, 64, free=(2**40, 1024))


def test_generate_consults_the_guard_and_accepts_the_override(tiny_dlm, monkeypatch):
    from sap_core import memory
    from sap_core.attention import AttentionRecorder

    monkeypatch.setattr(memory, "free_memory", lambda device: (4096, None))
    spec = DecodeSpec(gen_length=4, steps=4, block_length=4)
    with pytest.raises(MemoryGuardError):
        generate(tiny_dlm, "To be", spec, recorder=AttentionRecorder())
    traj = generate(tiny_dlm, "To be", spec, recorder=AttentionRecorder(), allow_large_capture=True)
    assert traj.mass.shape == (4, 2, 4, traj.length)
    generate(tiny_dlm, "To be", spec)  # no capture: only the token and confidence arrays, which fit
    monkeypatch.setattr(memory, "free_memory", lambda device: (100, None))
    with pytest.raises(MemoryGuardError, match="tokens and confidences"):  # ... and are guarded too (issue 21)
        generate(tiny_dlm, "To be", spec)


def _bomb(path: Path, mass_shape, tokens_shape=(2, 3), confidence_shape=None) -> Path:
    """A .npz whose 'mass' member declares ``mass_shape`` but holds a few compressed bytes."""
    S, L = tokens_shape
    arrays = dict(
        tokens=np.zeros((S, L), np.int64),
        final_tokens=np.zeros(L, np.int64),
        decoded_at=np.zeros(L, np.int64),
        confidence=np.zeros(confidence_shape or (S, L), np.float32),
        valid_length=np.full(S, L, np.int64),
        step_seconds=np.zeros(S),
    )
    meta = dict(prompt_length=1, causal=False, mask_id=3, spec={}, prompt="")
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, arr in {**arrays, "meta": np.array(json.dumps(meta))}.items():
            buf = io.BytesIO()
            np.save(buf, arr)
            z.writestr(name + ".npy", buf.getvalue())
        buf = io.BytesIO()
        np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False, "shape": tuple(mass_shape)})
        buf.write(b"\0" * 1024)
        z.writestr("mass.npy", buf.getvalue())
    return path


def test_an_in_memory_record_with_nan_or_infinity_is_refused_by_the_analysis(tiny_dlm):
    from dataclasses import replace

    from sap_core.attention import AttentionRecorder
    from sap_core.sink_report import analyze
    from sap_core.sinks import SinkSpec, SinkSpecError

    traj = generate(tiny_dlm, "ROMEO.\n", DecodeSpec(8, 8, 8), recorder=AttentionRecorder())
    assert analyze(traj).n_steps == 8  # the record as generated is fine
    for bad in (np.nan, np.inf):
        broken = traj.mass.copy()
        broken[3, 1, 0, 2] = bad  # one value of one head of one layer
        traj_bad = replace(traj, mass=broken)
        with pytest.raises(SinkSpecError, match="NaN or infinite"):
            analyze(traj_bad)
        with pytest.raises(SinkSpecError, match="NaN or infinite"):
            analyze(traj_bad, SinkSpec(layers=(1,), heads=(0,)))


def test_trajectory_load_is_bounded_by_declared_shapes(tmp_path):
    bomb = _bomb(tmp_path / "bomb.npz", (2, 1000, 1000, 3))  # 24 MB would be fine, but ...
    bomb = _bomb(tmp_path / "bomb.npz", (2, 100000, 1000, 3))  # ... 2.4 GB from a 1 kB file is not
    before = hashes(bomb)
    t0 = time.perf_counter()
    with pytest.raises(TrajectoryError, match="declares"):
        Trajectory.load(bomb)
    assert time.perf_counter() - t0 < 1.0 and hashes(bomb) == before
    with pytest.raises(TrajectoryError, match="mass has shape"):
        Trajectory.load(_bomb(tmp_path / "wrong.npz", (5, 2, 2, 3)))
    with pytest.raises(TrajectoryError, match="confidence has shape"):
        Trajectory.load(_bomb(tmp_path / "conf.npz", (2, 2, 2, 3), confidence_shape=(9, 9)))


# --- 4. corrupt checkpoints ---------------------------------------------------------------------------------


def test_config_that_is_a_list(broken):
    (broken / "config.json").write_text("[1, 2]")
    refused(broken, "config.json", "list")


def test_config_that_is_binary(broken):
    (broken / "config.json").write_bytes(b"\x89PNG\xff\xfe\x00\x01")
    refused(broken, "config.json", "binary")


def test_config_that_is_a_directory(broken):
    (broken / "config.json").unlink()
    (broken / "config.json").mkdir()
    refused(broken, "config.json", "directory")


def test_truncated_safetensors(broken):
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    refused(broken, "model.safetensors", "truncated")


def test_empty_safetensors(broken):
    (broken / "model.safetensors").write_bytes(b"")
    refused(broken, "model.safetensors", "empty")


def test_garbage_safetensors(broken):
    (broken / "model.safetensors").write_bytes(os.urandom(4096))
    refused(broken, "model.safetensors", "not a valid safetensors")


def test_garbage_safetensors_header(broken):
    header = b"{not json at all"
    (broken / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 64)
    refused(broken, "model.safetensors", "unreadable header")


def test_missing_shard(broken):
    shard(broken)
    (broken / "model-00002-of-00002.safetensors").unlink()
    refused(broken, "model-00002-of-00002.safetensors", "missing")


def test_sharded_checkpoint_loads(broken, tiny_dlm):
    shard(broken)
    handle = load_model(broken, device="cpu")
    ids = torch.tensor([[1, 5, 6, 3]])
    assert torch.equal(handle.logits(ids), tiny_dlm.logits(ids))


def test_index_that_is_not_json(broken):
    shard(broken)
    (broken / "model.safetensors.index.json").write_text("{oops")
    refused(broken, "model.safetensors.index.json", "not a valid JSON index")


def test_index_without_weight_map(broken):
    shard(broken)
    (broken / "model.safetensors.index.json").write_text(json.dumps({"weight_map": []}))
    refused(broken, "weight_map")


def test_shards_without_index(broken):
    shard(broken)
    (broken / "model.safetensors.index.json").unlink()
    refused(broken, "no model.safetensors.index.json")


def test_pickle_shard_reached_through_the_index_is_refused(broken, monkeypatch):
    shard(broken, suffix=".bin")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("a pickle was opened"))
    refused(broken, ".bin", "arbitrary code")


def test_top_level_pickle_is_refused(broken):
    (broken / "model.safetensors").unlink()
    (broken / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    refused(broken, "pytorch_model.bin", "arbitrary code")


def test_index_pointing_outside_the_model_directory_is_refused(broken, tmp_path):
    shard(broken)
    outside = tmp_path / "outside"
    outside.mkdir()
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    shutil.move(str(broken / "model-00001-of-00002.safetensors"), outside / "stolen.safetensors")
    index["weight_map"] = {
        k: ("../outside/stolen.safetensors" if v.startswith("model-00001") else v) for k, v in index["weight_map"].items()
    }
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    refused(broken, "outside the model directory")


@pytest.mark.parametrize(
    "field,value", [("n_heads", 0), ("n_layers", -3), ("d_model", 2.5), ("vocab_size", True), ("max_sequence_length", 0)]
)
def test_impossible_config_sizes(broken, field, value):
    edit_config(broken, **{field: value})
    refused(broken, field, "whole number >= 1")


def test_width_not_divisible_by_heads(broken):
    edit_config(broken, n_heads=5)
    refused(broken, "not divisible")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused(broken, value):
    tensors = load_file(str(broken / "model.safetensors"))
    name = sorted(n for n in tensors if "blocks.1" in n)[0]
    tensors[name].view(-1)[0] = value
    save_file(tensors, str(broken / "model.safetensors"), metadata={"format": "pt"})
    refused(broken, "NaN or infinite", name)


@pytest.mark.parametrize("device,needle", [("potato", "Unknown device"), ("mps", "cpu or cuda"), ("cuda:7", "GPU")])
def test_bad_devices(tiny_dlm_dir, device, needle):
    if device == "cuda:7" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has 8 GPUs")
    refused(tiny_dlm_dir, needle, device=device)


def test_offload_folder_is_removed_with_the_model(tiny_dlm_dir, monkeypatch):
    import gc
    import tempfile

    made = []
    real = tempfile.mkdtemp

    def mkdtemp(*a, **k):
        made.append(real(*a, **k))
        return made[-1]

    monkeypatch.setattr(tempfile, "mkdtemp", mkdtemp)
    handle = load_model(tiny_dlm_dir, device="cpu", device_map={"": "cpu"})
    # a dict map without "disk" needs no folder; "auto" may spill, so it gets one
    handle2 = load_model(tiny_dlm_dir, device="cpu", device_map="auto")
    assert made and all(Path(m).exists() for m in made)
    del handle, handle2
    gc.collect()
    assert not any(Path(m).exists() for m in made)


# --- 5-7. output paths, sweeps, one length check ----------------------------------------------------------


def test_length_checks_agree_everywhere(tiny_dlm):
    with pytest.raises(SapError, match="context of 256"):
        perplexity(tiny_dlm, EvalSpec(seqlen=1024, nsamples=1))
    with pytest.raises(PruneSpecError, match="context of 256"):
        prune(tiny_dlm, PruneSpec("wanda", 0.5, calibration=CalibrationSpec(seqlen=1024, nsamples=1)))
    with pytest.raises(SweepSpecError, match="context of 256"):
        run_sweep(tiny_dlm, SweepSpec(methods=("magnitude",), sparsities=(0.5,), eval=EvalSpec(seqlen=1024, nsamples=1)))
    with pytest.raises(DecodeSpecError, match="max_sequence_length 256"):
        generate(tiny_dlm, "To be", DecodeSpec(gen_length=512, steps=512, block_length=512))
    perplexity(tiny_dlm, EvalSpec(seqlen=256, nsamples=1, draws=2))  # the limit itself is fine


def test_a_failing_sweep_keeps_the_old_csv_and_the_finished_rows(tiny_dlm, tmp_path, monkeypatch):
    from sap_core import evaluate
    from sap_core.sweep import SweepWriter

    out = tmp_path / "sweep.csv"
    out.write_text("the previous result\n")
    before = hashes(out)
    spec = SweepSpec(methods=("magnitude",), sparsities=(0.3, 0.5), eval=EvalSpec(seqlen=16, nsamples=2, draws=2))
    calls = {"n": 0}
    real = evaluate.perplexity

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise SapError("disk on fire")
        return real(*a, **k)

    monkeypatch.setattr(evaluate, "perplexity", flaky)
    writer = SweepWriter(out)
    with pytest.raises(SapError, match="disk on fire"):
        run_sweep(tiny_dlm, spec, on_row=writer.add)
    assert hashes(out) == before
    assert writer.partial == partial_path(out) and list(load_sweep(writer.partial)["method"]) == ["dense"]
    monkeypatch.setattr(evaluate, "perplexity", real)
    writer = SweepWriter(out)
    df = run_sweep(tiny_dlm, spec, on_row=writer.add)
    writer.finish(df)
    assert len(load_sweep(out)) == 3 and not writer.partial.exists()


def test_sweep_save_is_atomic(tmp_path, monkeypatch):
    import pandas as pd

    out = tmp_path / "s.csv"
    out.write_text("old\n")
    real = Path.write_text

    def boom(self, *a, **k):
        if self.name.startswith("."):  # the temporary sibling: half written, then the disk fills up
            real(self, "half")
            raise OSError(28, "No space left on device")
        return real(self, *a, **k)

    monkeypatch.setattr(Path, "write_text", boom)
    with pytest.raises(OutputPathError, match="disk is full"):
        save_sweep(pd.DataFrame({"a": [1]}), out)
    assert out.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == ["s.csv"]


# --- 8. non-finite and mistyped values --------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        (dict(temperature=float("nan")), "temperature must be a finite"),
        (dict(temperature=float("inf")), "temperature must be a finite"),
        (dict(cfg_scale=float("nan")), "cfg_scale must be a finite"),
        (dict(cfg_scale=float("-inf")), "cfg_scale must be a finite"),
        (dict(seed=2**70), "seed must be in"),
        (dict(seed=-1), "seed must be in"),
        (dict(gen_length=32.0), "gen_length must be a whole number"),
        (dict(steps="8"), "steps must be a whole number"),
        (dict(block_length=True), "block_length must be a whole number"),
        (dict(temperature="hot"), "temperature must be a number"),
    ],
)
def test_decode_spec_refuses_at_construction(kwargs, needle):
    with pytest.raises(DecodeSpecError) as info:
        DecodeSpec(**kwargs)
    assert needle in one_line(info.value)


def test_decode_spec_accepts_numpy_numbers():
    spec = DecodeSpec(gen_length=np.int64(8), steps=np.int32(8), temperature=np.float32(0.5))
    assert type(spec.gen_length) is int and spec.temperature == 0.5


def test_all_nan_attention_record_is_refused(tiny_dlm, tmp_path):
    from sap_core.attention import AttentionRecorder

    traj = generate(tiny_dlm, "To be", DecodeSpec(gen_length=4, steps=4, block_length=4), recorder=AttentionRecorder())
    traj.mass[:] = np.nan
    path = traj.save(tmp_path / "nan")
    with pytest.raises(TrajectoryError, match="NaN or infinite"):
        Trajectory.load(path)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(sparsity=float("nan")),
        dict(sparsity=float("inf")),
        dict(percdamp=float("inf")),
        dict(pattern="²:4"),
        dict(pattern="2:4:8"),
        dict(sparsity="0.5"),
    ],
)
def test_prune_spec_refuses_bad_values(kwargs):
    spec = PruneSpec(**{"method": "sparsegpt", "sparsity": 0.5, **kwargs})
    with pytest.raises(PruneSpecError) as info:
        spec.validate()
    one_line(info.value)


@pytest.mark.parametrize("kwargs", [dict(seed=2**70), dict(eps=float("nan"))])
def test_calibration_spec_refuses_bad_values(kwargs):
    with pytest.raises(PruneSpecError):
        CalibrationSpec(**kwargs).validate()


def test_eval_spec_refuses_bad_values():
    for kwargs in (dict(seed=2**70), dict(seqlen=64.0), dict(draws="8")):
        with pytest.raises(SweepSpecError):
            EvalSpec(**kwargs).validate()
    with pytest.raises(SweepSpecError):
        SweepSpec(methods=("magnitude",), sparsities=(float("nan"),)).validate()


def test_pattern_with_unicode_digits():
    with pytest.raises(PruneSpecError, match="N:M"):
        parse_pattern("²:4")
    assert parse_pattern(" 2 : 4 ") == (2, 4)


# --- 10. prompts ------------------------------------------------------------------------------------------


def test_non_utf8_prompt_bytes(tiny_dlm):
    with pytest.raises(DecodeSpecError, match="not UTF-8"):
        generate(tiny_dlm, b"\xff\xfe bad", DecodeSpec(gen_length=4, steps=4, block_length=4))
    traj = generate(tiny_dlm, b"To be", DecodeSpec(gen_length=4, steps=4, block_length=4))
    assert list(traj.final_tokens[: traj.prompt_length]) == tiny_dlm.encode("To be")


@pytest.mark.parametrize("ids,needle", [([1, 10**9], "1000000000"), ([1, -2], "-2"), ([1, 2.5], "2.5"), (5, "list of token ids")])
def test_prompt_ids_outside_the_vocabulary(tiny_dlm, ids, needle):
    with pytest.raises(DecodeSpecError) as info:
        generate(tiny_dlm, ids, DecodeSpec(gen_length=4, steps=4, block_length=4))
    assert needle in one_line(info.value)


# --- 9. paths of trajectories ----------------------------------------------------------------------------


def test_trajectory_paths_with_and_without_suffix(tiny_dlm, tmp_path):
    traj = generate(tiny_dlm, "To be", DecodeSpec(gen_length=4, steps=4, block_length=4))
    written = traj.save(tmp_path / "run")
    assert written == tmp_path / "run.npz" and written.is_file() and not (tmp_path / "run").exists()
    for form in (tmp_path / "run", tmp_path / "run.npz"):
        assert np.array_equal(Trajectory.load(form).tokens, traj.tokens)
    assert npz_path("x.npz") == Path("x.npz")
    with pytest.raises(TrajectoryError, match="No trajectory"):
        Trajectory.load(tmp_path / "missing")
    (tmp_path / "junk.npz").write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(TrajectoryError, match="not a trajectory"):
        Trajectory.load(tmp_path / "junk.npz")


# --- 11. fingerprints ----------------------------------------------------------------------------------------


def test_a_variant_refuses_another_models_weights(tiny_dlm, other_dlm, variant, tmp_path):
    dense = {n: p.clone() for n, p in other_dlm.module.named_parameters()}
    with pytest.raises(PruneSpecError, match="another model"):
        with variant.applied(other_dlm):
            pass
    with pytest.raises(PruneSpecError, match="another model"):
        variant.apply_to_copy(other_dlm)
    with pytest.raises(PruneSpecError, match="another model"):
        variant.save(tmp_path / "v", other_dlm)
    assert not (tmp_path / "v").exists()
    assert all(torch.equal(p, dense[n]) for n, p in other_dlm.module.named_parameters())
    with variant.applied(tiny_dlm):  # its own model is fine
        pass


def test_fingerprint_tolerates_a_change_of_dtype(tiny_dlm_dir, variant):
    bf16 = load_model(tiny_dlm_dir, device="cpu", dtype="bfloat16")
    with variant.applied(bf16):
        assert bf16.module.blocks[0].attn_out.weight.dtype == torch.bfloat16


# --- the command line -----------------------------------------------------------------------------------------


def run_cli(capsys, *argv) -> tuple[int, str]:
    code = main([*argv, "--quiet"] if argv[0] != "--help" else list(argv))
    err = capsys.readouterr().err
    return code, err


def error_line(err: str) -> str:
    lines = [l for l in err.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def no_load(monkeypatch):
    """Fail the test if a command loads the model: output checks must come first."""
    from sap_core.cli import common

    monkeypatch.setattr(common, "load", lambda args: pytest.fail("the model was loaded before the output check"))


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["generate", "--out", "{dir}"], "is a directory"),
        (["generate", "--trajectory", "{file}/t"], "is a file"),
        (["analyze", "--csv", "{file}"], "is a file"),
        (["evaluate", "--out", "{file}/x.json"], "is a file"),
        (["sweep", "--out", "{dir}"], "is a directory"),
        (["sweep", "--plot", "{dir}/p.png", "--out", "{dir}/s.csv"], None),
        (["prune", "--method", "magnitude", "--save", "{file}"], "is a file"),
        (["prune", "--method", "magnitude", "--save", "{user}"], "not a SinkScope variant"),
        (["prune", "--method", "magnitude", "--save", "{model}"], "loaded model's directory"),
    ],
)
def test_cli_checks_output_paths_before_any_work(capsys, no_load, tmp_path, tiny_dlm_dir, argv, needle):
    f = tmp_path / "file"
    f.write_text("keep")
    user = tmp_path / "user"
    user.mkdir()
    (user / "config.json").write_text("{}")
    fill = dict(dir=tmp_path, file=f, user=user, model=tiny_dlm_dir)
    argv = [a.format(**fill) for a in argv] + ["--model", str(tiny_dlm_dir)]
    before = hashes(tmp_path, tiny_dlm_dir)
    if needle is None:  # a good plot path: the command goes on to load (and our fixture stops it)
        with pytest.raises(pytest.fail.Exception):
            main(argv)
        return
    code, err = run_cli(capsys, *argv)
    assert code == 2 and needle in error_line(err)
    assert hashes(tmp_path, tiny_dlm_dir) == before


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["generate", "--temperature", "nan"], "temperature must be a finite"),
        (["generate", "--cfg-scale", "inf"], "cfg_scale must be a finite"),
        (["generate", "--seed", str(2**70)], "seed must be in"),
        (["generate", "--gen-length", "3.5"], "invalid int value"),
        (["generate", "--prompt", "caf\udce9"], "not UTF-8"),
        (["prune", "--pattern", "²:4"], "N:M"),
        (["prune", "--calib-seed", str(2**70)], "seed"),
        (["sweep", "--eval-seed", str(2**70)], "seed"),
        (["sweep", "--sparsities", "nan"], "sparsity must be a number in [0, 1)"),
        (["analyze", "--trajectory", "/no/such.npz"], "No trajectory"),
    ],
)
def test_cli_bad_values_are_one_line_errors(capsys, no_load, argv, needle):
    code, err = run_cli(capsys, *argv)
    assert code == 2 and needle in error_line(err)


def test_cli_corrupt_model_and_bad_device(capsys, broken):
    (broken / "config.json").write_text("[]")
    code, err = run_cli(capsys, "evaluate", "--model", str(broken), "--device", "cpu")
    assert code == 2 and "config.json" in error_line(err)
    code, err = run_cli(capsys, "evaluate", "--device", "potato")
    assert code == 2 and "Unknown device 'potato'" in error_line(err)


def test_cli_length_check(capsys, tiny_dlm_dir, tmp_path):
    out = tmp_path / "e.json"
    code, err = run_cli(capsys, "evaluate", "--model", str(tiny_dlm_dir), "--seqlen", "1024", "--out", str(out))
    assert code == 2 and "context of 256" in error_line(err) and not out.exists()


def test_cli_prune_save_overwrite_and_trajectory_round_trip(capsys, tiny_dlm_dir, tmp_path):
    save = tmp_path / "v"
    base = ["prune", "--model", str(tiny_dlm_dir), "--method", "magnitude", "--save", str(save)]
    assert run_cli(capsys, *base, "--sparsity", "0.3")[0] == 0 and is_variant_dir(save)
    before = hashes(save)
    code, err = run_cli(capsys, *base, "--sparsity", "0.5")
    assert code == 2 and "--overwrite" in error_line(err) and hashes(save) == before
    assert run_cli(capsys, *base, "--sparsity", "0.5", "--overwrite")[0] == 0
    assert json.loads((save / "pruning.json").read_text())["sparsity"] == 0.5
    # --trajectory X writes and prints X.npz; analyze accepts X and X.npz
    traj = tmp_path / "t"
    code, err = run_cli(
        capsys,
        "generate",
        "--model",
        str(save),
        "--gen-length",
        "4",
        "--steps",
        "4",
        "--block-length",
        "4",
        "--record-attention",
        "--trajectory",
        str(traj),
        "--out",
        str(tmp_path / "g.json"),
    )
    assert code == 0 and f"wrote {traj}.npz" in err
    assert json.loads((tmp_path / "g.json").read_text())["trajectory"] == f"{traj}.npz"
    for form in (traj, f"{traj}.npz"):
        assert run_cli(capsys, "analyze", "--trajectory", str(form))[0] == 0


def test_cli_failing_sweep_names_the_partial_file(capsys, tiny_dlm_dir, tmp_path, monkeypatch):
    from sap_core import evaluate

    out = tmp_path / "s.csv"
    out.write_text("old\n")
    real, calls = evaluate.perplexity, {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise SapError("evaluation failed")
        return real(*a, **k)

    monkeypatch.setattr(evaluate, "perplexity", flaky)
    code, err = run_cli(
        capsys,
        "sweep",
        "--model",
        str(tiny_dlm_dir),
        "--methods",
        "magnitude",
        "--sparsities",
        "0.5",
        "--seqlen",
        "16",
        "--nsamples",
        "2",
        "--draws",
        "2",
        "--out",
        str(out),
    )
    assert code == 2 and "evaluation failed" in error_line(err)
    assert out.read_text() == "old\n" and f"are in {partial_path(out)}" in err


def _subprocess(*argv, cwd=ROOT):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "sap_core", *argv, "--quiet"], capture_output=True, text=True, cwd=cwd, env=env, timeout=300
    )


def test_cli_subprocess_save_into_model_dir(tiny_dlm_dir):
    before = hashes(tiny_dlm_dir)
    proc = _subprocess("prune", "--model", str(tiny_dlm_dir), "--method", "magnitude", "--save", str(tiny_dlm_dir))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "loaded model's directory" in error_line(proc.stderr) and hashes(tiny_dlm_dir) == before


def test_cli_subprocess_corrupt_checkpoint_and_bad_prompt_bytes(broken):
    (broken / "model.safetensors").write_bytes(b"")
    before = hashes(broken)
    proc = _subprocess("generate", "--model", str(broken), "--device", "cpu")
    assert proc.returncode == 2 and "empty" in error_line(proc.stderr) and hashes(broken) == before
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable.encode(), b"-m", b"sap_core", b"generate", b"--prompt", b"\xff\xfe", b"--quiet"],
        capture_output=True,
        cwd=ROOT,
        env=env,
        timeout=300,
    )
    err = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode == 2 and "not UTF-8" in error_line(err)


@pytest.mark.parametrize("exchange", [True, False])
def test_overwrite_swaps_directories_with_or_without_renameat2(tiny_dlm, variant, tmp_path, monkeypatch, exchange):
    from sap_core import files

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "x").write_text("a")
    if files._exchange(a, b):  # Linux: one atomic swap
        assert (b / "x").read_text() == "a" and not (a / "x").exists()
    if not exchange:
        monkeypatch.setattr(files, "_exchange", lambda *_: False)
    target = variant.save(tmp_path / "v", tiny_dlm)
    prune(tiny_dlm, PruneSpec("magnitude", 0.6)).save(target, tiny_dlm, overwrite=True)
    assert json.loads((target / "pruning.json").read_text())["sparsity"] == 0.6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "v"]
