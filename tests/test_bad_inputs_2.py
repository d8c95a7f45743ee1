"""Hostile and careless input, second round (issue 21): device files, links, paired outputs, interrupted
saves, hostile files, every allocation guarded. Each case is met as the user meets it (the CLI through
``main`` or a subprocess, the library call a script makes) and asserts a one-line error and that nothing
was lost."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from test_bad_inputs import edit_config, error_line, hashes, one_line, refused, run_cli

from sap_core.errors import ModelLoadError, SapError
from sap_core.models import load_model
from sap_core.sweep import SweepSpecError, estimates_path, load_sweep, partial_path

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread_module")  # conftest.py
QUICK_EVAL = ["--seqlen", "16", "--nsamples", "2", "--draws", "2"]
QUICK_SWEEP = ["sweep", "--methods", "magnitude", "--sparsities", "0.5", *QUICK_EVAL]


def _subprocess(*argv, **kwargs) -> subprocess.Popen | subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "sap_core", *argv, "--quiet"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=300,
        **kwargs,
    )


@pytest.fixture
def broken(tiny_dlm_dir, tmp_path):
    """A fresh copy of the tiny model to damage."""
    return Path(shutil.copytree(tiny_dlm_dir, tmp_path / "model"))


def device_node(path: Path, minor: int) -> Path:
    """A character device like /dev/null (minor 3) or /dev/full (minor 7), made in ``path`` (root only)."""
    try:
        os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, minor))
    except PermissionError:
        pytest.skip("making a device node needs root (CAP_MKNOD)")
    return path


# --- 1. data loss: devices, links, the sweep's CSV + estimates pair ------------------------------------------


def test_out_to_a_device_writes_into_it_and_leaves_the_node(capsys, tiny_dlm_dir, tmp_path):
    null = device_node(tmp_path / "null", 3)
    code, err = run_cli(capsys, "evaluate", "--model", str(tiny_dlm_dir), *QUICK_EVAL, "--out", str(null))
    assert code == 0 and stat.S_ISCHR(null.stat().st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["null"]  # no temporary, no sibling


def test_out_to_a_full_device_is_one_line(capsys, tiny_dlm_dir, tmp_path):
    full = device_node(tmp_path / "full", 7)
    code, err = run_cli(capsys, "evaluate", "--model", str(tiny_dlm_dir), *QUICK_EVAL, "--out", str(full))
    assert code == 2 and "No space left on device" in error_line(err)
    assert stat.S_ISCHR(full.stat().st_mode) and sorted(p.name for p in tmp_path.iterdir()) == ["full"]


def test_out_and_trajectory_to_a_fifo_stream_into_it(capsys, tiny_dlm_dir, tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got = {}

    def reader():
        with open(fifo, "rb") as f:
            got["data"] = f.read()

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    code, err = run_cli(
        capsys,
        "generate",
        "--model",
        str(tiny_dlm_dir),
        "--gen-length",
        "4",
        "--steps",
        "4",
        "--block-length",
        "4",
        "--out",
        str(fifo),
    )
    thread.join(30)
    assert code == 0 and json.loads(got["data"])["text"] is not None
    assert stat.S_ISFIFO(fifo.stat().st_mode) and sorted(p.name for p in tmp_path.iterdir()) == ["pipe"]


def test_out_to_dev_stdout_prints_the_json(capfd, tiny_dlm_dir):
    from sap_core.cli import main

    assert main(["evaluate", "--model", str(tiny_dlm_dir), *QUICK_EVAL, "--out", "/dev/stdout", "--quiet"]) == 0
    assert json.loads(capfd.readouterr().out)["ppl"] > 1  # /dev/stdout is fd 1 (here pytest's capture file)
    assert os.path.islink("/dev/stdout") or stat.S_ISCHR(os.stat("/dev/stdout").st_mode)


def test_sweep_out_and_plot_to_a_device(capsys, tiny_dlm_dir, tmp_path, monkeypatch):
    null = device_node(tmp_path / "null", 3)
    monkeypatch.chdir(tmp_path)
    import plotly.graph_objects as go

    drawn = []  # kaleido starts a browser: stand in for it, the path handling around it is the real one
    monkeypatch.setattr(go.Figure, "write_image", lambda self, path, **k: (drawn.append(path), Path(path).write_bytes(b"PNG")))
    code, err = run_cli(capsys, *QUICK_SWEEP, "--model", str(tiny_dlm_dir), "--out", str(null), "--plot", str(null))
    assert code == 0 and f"wrote {null}" in err and len(drawn) == 1 and stat.S_ISCHR(null.stat().st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["null"]  # no partial file or estimates left


def test_out_that_is_a_link_replaces_the_target_and_keeps_the_link(capsys, tiny_dlm_dir, tmp_path):
    target = tmp_path / "real" / "e.json"
    target.parent.mkdir()
    target.write_text("old")
    link = tmp_path / "e.json"
    link.symlink_to(target)
    code, err = run_cli(capsys, "evaluate", "--model", str(tiny_dlm_dir), *QUICK_EVAL, "--out", str(link))
    assert code == 0 and link.is_symlink() and os.readlink(link) == str(target)
    assert json.loads(target.read_text())["ppl"] > 1
    dangling = tmp_path / "d.json"
    dangling.symlink_to(tmp_path / "real" / "new.json")  # a link to a file not yet there: created, as cp does
    assert run_cli(capsys, "evaluate", "--model", str(tiny_dlm_dir), *QUICK_EVAL, "--out", str(dangling))[0] == 0
    assert dangling.is_symlink() and json.loads((tmp_path / "real" / "new.json").read_text())["ppl"] > 1


def _sweep(capsys, model_dir, out, *extra) -> tuple[int, str]:
    return run_cli(capsys, *QUICK_SWEEP, "--model", str(model_dir), "--out", str(out), *extra)


def test_a_sweep_interrupted_between_its_csv_and_estimates_is_never_read_as_a_pair(capsys, tiny_dlm_dir, tmp_path, monkeypatch):
    from sap_core import files

    out = tmp_path / "s.csv"
    assert _sweep(capsys, tiny_dlm_dir, out)[0] == 0
    first = load_sweep(out)
    assert set(first.attrs["estimates"]) == set(first["label"])
    real, calls = files.atomic_write, []

    def interrupted_after_the_first_file(path, *a, **k):  # Ctrl-C between the two renames of the result
        if ".partial" not in Path(path).name:
            calls.append(Path(path).name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(path, *a, **k)

    monkeypatch.setattr(files, "atomic_write", interrupted_after_the_first_file)
    monkeypatch.setattr("sap_core.sweep.atomic_write", interrupted_after_the_first_file)
    code, err = _sweep(capsys, tiny_dlm_dir, out, "--eval-seed", "7")
    assert code == 130
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        df = load_sweep(out)
    kept = df.attrs.get("estimates")
    # whichever file the interruption left new, the CSV and the estimates read back belong to one run
    if kept:
        assert all(np.allclose(kept[row.label].mean(), row.nll) for row in df.itertuples())
    else:
        assert any("another run" in str(w.message) for w in caught)


def test_older_sweep_pairs_without_a_hash_still_load(capsys, tiny_dlm_dir, tmp_path):
    out = tmp_path / "s.csv"
    assert _sweep(capsys, tiny_dlm_dir, out)[0] == 0
    side = estimates_path(out)
    with np.load(side) as data:
        old = {k: data[k] for k in data.files if k != "csv_sha256"}
    np.savez_compressed(side, **old)  # as SinkScope wrote it before issue 21
    assert set(load_sweep(out).attrs["estimates"]) == set(load_sweep(out)["label"])


def test_a_sweep_without_estimates_removes_the_previous_runs(tiny_ar, tmp_path):
    from sap_core.evaluate import EvalSpec
    from sap_core.sweep import SweepSpec, run_sweep, save_sweep

    out = tmp_path / "s.csv"
    np.savez_compressed(estimates_path(out), row0=np.zeros((2, 2)), labels=np.array(["dense"]))  # an older run's
    df = run_sweep(
        tiny_ar,
        SweepSpec(methods=("magnitude",), sparsities=(0.5,), eval=EvalSpec(seqlen=16, nsamples=2, draws=2, prefix="To be")),
    )
    save_sweep(df, out)
    assert not estimates_path(out).exists() and "estimates" not in load_sweep(out).attrs


def test_ctrl_c_after_the_sweep_is_written_exits_0(capsys, tiny_dlm_dir, tmp_path, monkeypatch):
    import pandas as pd

    out = tmp_path / "s.csv"

    def interrupted(self, *a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(pd.DataFrame, "to_string", interrupted)  # Ctrl-C while the summary is printed
    run_cli_verbose = main_without_quiet(*QUICK_SWEEP, "--model", str(tiny_dlm_dir), "--out", str(out))
    code, err = run_cli_verbose(capsys)
    assert code == 0 and len(load_sweep(out)) == 2 and not partial_path(out).exists()


def main_without_quiet(*argv):
    from sap_core.cli import main

    def run(capsys):
        code = main(list(argv))
        return code, capsys.readouterr().err

    return run


def test_ctrl_c_during_a_sweep_names_the_partial_file(capsys, tiny_dlm_dir, tmp_path):
    out = tmp_path / "s.csv"
    out.write_text("old\n")

    def press_ctrl_c_after_the_first_row():
        deadline = time.monotonic() + 240
        while not partial_path(out).exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=press_ctrl_c_after_the_first_row, daemon=True).start()
    code, err = run_cli(
        capsys,
        *QUICK_SWEEP[:3],
        "--sparsities",
        "0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9",
        *QUICK_EVAL,
        "--model",
        str(tiny_dlm_dir),
        "--out",
        str(out),
    )
    assert code == 130 and "error: interrupted" in err
    rows = len(load_sweep(partial_path(out)))
    assert f"the {rows} finished row(s) are in {partial_path(out)}" in err and out.read_text() == "old\n"


# --- 2. interrupted saves leave no litter; a full disk is one line -------------------------------------------


def _prune_save(capsys, model_dir, save, *extra):
    return run_cli(capsys, "prune", "--model", str(model_dir), "--method", "magnitude", "--save", str(save), *extra)


def test_sigterm_during_prune_save_overwrite_leaves_no_temporary(capsys, tiny_dlm_dir, tmp_path, monkeypatch):
    from sap_core.models.llada import LLaDAModelLM

    save = tmp_path / "v"
    assert _prune_save(capsys, tiny_dlm_dir, save)[0] == 0
    before = hashes(save)
    real = LLaDAModelLM.save_pretrained

    def save_then_sigterm(self, directory, *a, **k):
        real(self, directory, *a, **k)  # the weights are in the hidden temporary: now `kill <pid>`
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(LLaDAModelLM, "save_pretrained", save_then_sigterm)
    handler = signal.getsignal(signal.SIGTERM)
    code, err = _prune_save(capsys, tiny_dlm_dir, save, "--overwrite", "--sparsity", "0.7")
    assert code == 143 and "error: terminated" in err
    assert hashes(save) == before and sorted(p.name for p in tmp_path.iterdir()) == ["v"]
    assert signal.getsignal(signal.SIGTERM) is handler  # main's handler is put back


def test_the_next_save_removes_temporaries_of_a_killed_save(capsys, tiny_dlm_dir, tmp_path):
    save = tmp_path / "v"
    dead = subprocess.Popen(["true"])
    dead.wait()  # a pid that no longer runs: the save that wrote these was killed with SIGKILL
    (tmp_path / f".v.tmp-{dead.pid}-abcd1234").mkdir()
    (tmp_path / f".v.tmp-{dead.pid}-abcd1234" / "model.safetensors").write_bytes(b"\0" * 1000)
    (tmp_path / f".v.old-{dead.pid}-wxyz_987").mkdir()
    alive = tmp_path / f".v.tmp-{os.getppid()}-efgh5678"  # a running process's: left alone
    alive.mkdir()
    mine = tmp_path / "notes.txt"
    mine.write_text("mine")
    assert _prune_save(capsys, tiny_dlm_dir, save)[0] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([alive.name, "notes.txt", "v"])


@pytest.fixture
def small_disk(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("mounting a small tmpfs needs root in a privileged container")
    yield disk
    subprocess.run(["umount", str(disk)], check=False)


def test_a_save_that_cannot_fit_on_the_disk_is_refused_before_the_work(capsys, tiny_dlm_dir, small_disk):
    code, err = _prune_save(capsys, tiny_dlm_dir, small_disk / "v")
    assert code == 2 and "disk space" in error_line(err) and list(small_disk.iterdir()) == []


def test_the_disk_filling_up_during_a_save_is_one_line(tiny_dlm_dir, tmp_path):
    import resource

    def limit_file_size():  # what a disk filling up mid-write does, without a disk to fill: writes past 40 KB fail
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (40_000, 40_000))

    save = tmp_path / "v"
    proc = _subprocess(
        "prune", "--model", str(tiny_dlm_dir), "--method", "magnitude", "--save", str(save), preexec_fn=limit_file_size
    )
    assert proc.returncode == 2 and "file size limit" in error_line(proc.stderr), proc.stderr
    assert list(tmp_path.iterdir()) == []


# --- 3. hostile files -------------------------------------------------------------------------------------

DEEP = "[" * 100_000 + "]" * 100_000


def test_a_deeply_nested_config_is_one_line(capsys, broken):
    (broken / "config.json").write_text(DEEP)
    code, err = run_cli(capsys, "generate", "--model", str(broken), "--device", "cpu")
    assert code == 2 and "nested too deeply" in error_line(err)


def test_deeply_nested_index_and_trajectory_metadata(capsys, broken, tiny_dlm_dir, tmp_path):
    (broken / "model.safetensors.index.json").write_text(DEEP)
    refused(broken, "nested too deeply")
    traj = tmp_path / "t.npz"
    zeros = np.zeros((2, 3), np.int64)
    np.savez_compressed(
        traj,
        meta=np.array(DEEP),
        tokens=zeros,
        final_tokens=zeros[0],
        decoded_at=zeros[0],
        confidence=zeros.astype(np.float32),
        valid_length=zeros[:, 0],
        step_seconds=np.zeros(2),
    )
    code, err = run_cli(capsys, "analyze", "--trajectory", str(traj))
    assert code == 2 and "not a trajectory" in error_line(err)


def write_safetensors(path: Path, shapes: dict[str, tuple[int, ...]]) -> Path:
    """A float32 safetensors file of zeros with these tensors; large ones are left sparse (no disk used)."""
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = int(np.prod(shape)) * 4
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        f.truncate(8 + len(raw) + offset)
    return path


def test_a_config_of_100000_layers_beside_one_named_block_is_refused_at_once(broken):
    edit_config(broken, n_layers=100_000)
    write_safetensors(broken / "model.safetensors", {"model.transformer.blocks.99999.attn_norm.weight": (32,)})
    assert (broken / "model.safetensors").stat().st_size < 1000
    refused(broken, "declares 100000 layers", "tensors for 1 of them")


def test_declared_weights_beyond_the_free_memory_are_refused_before_allocation(broken):
    from safetensors import safe_open

    from sap_core.memory import free_memory

    with safe_open(str(broken / "model.safetensors"), "pt") as f:
        shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    vocab = free_memory("cpu")[0] // (32 * 4)  # the embedding and the LM head: twice the free RAM
    for name in ("model.transformer.wte.weight", "model.transformer.ff_out.weight"):
        shapes[name] = (vocab, 32)
    edit_config(broken, vocab_size=vocab)
    write_safetensors(broken / "model.safetensors", shapes)  # sparse: the sizes agree, the disk holds nothing
    with pytest.raises(SapError) as info:
        load_model(broken, device="cpu")
    assert "of host RAM" in one_line(info.value) and "refused" in str(info.value)


def test_overlapping_tensor_data_is_one_line(broken):
    file = broken / "model.safetensors"
    data = file.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    norms = sorted(k for k in header if k.endswith("attn_norm.weight"))
    header[norms[1]]["data_offsets"] = header[norms[0]]["data_offsets"]  # same size: the second overlaps the first
    raw = json.dumps(header, separators=(",", ":")).encode().ljust(n)
    assert len(raw) == n
    file.write_bytes(data[:8] + raw + data[8 + n :])
    refused(broken, "overlaps")


@pytest.mark.parametrize(
    "field,value,needle",
    [
        ("rope_theta", "abc", "rope_theta is 'abc'; it must be a finite number > 0"),
        ("rms_norm_eps", -1, "rms_norm_eps is -1; it must be a finite number > 0"),
        ("causal", "no", "causal is 'no'; it must be true or false"),
        ("weight_tying", 1, "weight_tying is 1"),
        ("mlp_ratio", 2.5, "mlp_ratio is 2.5"),
        ("activation_type", 3, "activation_type is 3; it must be a string"),
        ("attention_dropout", 2.0, "attention_dropout is 2.0"),
    ],
)
def test_every_field_the_family_reads_is_checked_at_load(capsys, broken, field, value, needle):
    edit_config(broken, **{field: value})
    code, err = run_cli(capsys, "generate", "--model", str(broken), "--device", "cpu")
    assert code == 2 and needle in error_line(err)


def test_dream_fields_are_checked_at_load(tmp_path):
    from sap_core.models.checkpoint import check_fields
    from sap_core.models.dream import CONFIG_FIELDS

    for field, value in (("hidden_act", "sigmoidish"), ("rope_scaling", "yes"), ("rope_theta", float("nan"))):
        with pytest.raises(ModelLoadError, match=field):
            check_fields(tmp_path, {field: value}, CONFIG_FIELDS)


def test_a_fifo_as_config_json_is_named_a_fifo(broken):
    (broken / "config.json").unlink()
    os.mkfifo(broken / "config.json")
    refused(broken, "FIFO")


# --- 6. one guard for every large allocation of a run ---------------------------------------------------------


def test_a_long_generation_without_capture_meets_the_guard(capsys, tmp_path):
    from conftest import make_model_dir

    from sap_core.memory import free_memory

    # 65,280 steps x 65,280 positions (the case: 31.8 GiB of token and confidence arrays), or more
    # where the machine has more memory, so that the arrays exceed the free RAM everywhere.
    n = max(65_280, int((2 * free_memory("cpu")[0] / 12) ** 0.5) // 16 * 16)
    model = make_model_dir(tmp_path / "long", max_sequence_length=n + 64)
    g = str(n)
    code, err = run_cli(
        capsys, "generate", "--model", str(model), "--device", "cpu", "--gen-length", g, "--steps", g, "--block-length", g
    )
    line = error_line(err)
    assert code == 2 and "Generation" in line and "tokens and confidences" in line and "of host RAM" in line


# --- 5. library calls raise the project's errors -------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_sweep(tmp_path_factory, tiny_dlm):
    from sap_core.evaluate import EvalSpec
    from sap_core.sweep import SweepSpec, run_sweep, save_sweep

    out = tmp_path_factory.mktemp("sweep") / "s.csv"
    save_sweep(
        run_sweep(tiny_dlm, SweepSpec(methods=("magnitude",), sparsities=(0.5,), eval=EvalSpec(seqlen=16, nsamples=2, draws=2))),
        out,
    )
    return out


@pytest.mark.parametrize(
    "damage,needle",
    [
        (lambda csv: csv.write_bytes(os.urandom(4096)), "binary"),
        (lambda csv: csv.write_bytes(b""), "empty"),
        (lambda csv: csv.write_text(csv.read_text().replace("\ndense,0.0,dense,", "\ndense,0.0,dense,high,", 1)), "not a number"),
        (lambda csv: csv.write_text('method,sparsity\n"unclosed,1\n'), "not a sweep CSV"),
        (lambda csv: estimates_path(csv).write_bytes(b"PK\x03\x04 not a zip"), "damaged"),
        (lambda csv: (csv.unlink(), csv.mkdir()), "is a directory"),
    ],
)
def test_load_sweep_refuses_what_is_not_a_sweep(saved_sweep, tmp_path, damage, needle):
    csv = tmp_path / "s.csv"
    shutil.copy(saved_sweep, csv)
    shutil.copy(estimates_path(saved_sweep), estimates_path(csv))
    damage(csv)
    with pytest.raises(SweepSpecError) as info:
        load_sweep(csv)
    assert needle in one_line(info.value)


def test_a_prompt_with_a_lone_surrogate_is_a_project_error(tiny_dlm):
    from sap_core.decoding import DecodeSpec
    from sap_core.diffusion import generate

    with pytest.raises(SapError, match="lone surrogate"):
        generate(tiny_dlm, "caf\ud800", DecodeSpec(gen_length=4, steps=4, block_length=4))


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(k="2"),
        dict(alpha=True),
        dict(tau=[0.1]),
        dict(top_k="4"),
        dict(layers=["0"]),
        dict(layers=[0.5]),
        dict(rule=["official"]),
    ],
)
def test_sink_spec_refuses_mistyped_values_at_construction(kwargs):
    from sap_core.errors import SinkSpecError
    from sap_core.sinks import SinkSpec

    with pytest.raises(SinkSpecError) as info:
        SinkSpec(**kwargs)
    one_line(info.value)


def test_calibration_text_given_as_bytes_is_refused_before_the_work(tiny_dlm):
    from sap_core.errors import PruneSpecError
    from sap_core.pruning import CalibrationSpec, PruneSpec, prune

    with pytest.raises(PruneSpecError, match="must be text"):
        prune(tiny_dlm, PruneSpec("wanda", 0.5, calibration=CalibrationSpec(text=b"To be, or not to be" * 50)))


# --- 7. small things: long names, modes, what a path is ------------------------------------------------------


def test_legal_250_byte_names_are_written(capsys, tiny_dlm_dir, tmp_path):
    out = tmp_path / ("o" * 245 + ".json")
    traj = tmp_path / ("t" * 250)  # written as t...t.npz: 254 bytes
    quick = ["--gen-length", "4", "--steps", "4", "--block-length", "4"]
    code, err = run_cli(
        capsys,
        "generate",
        "--model",
        str(tiny_dlm_dir),
        *quick,
        "--out",
        str(out),
        "--record-attention",
        "--trajectory",
        str(traj),
    )
    assert code == 0 and json.loads(out.read_text())["text"] is not None and Path(f"{traj}.npz").is_file()
    save = tmp_path / ("v" * 250)
    assert _prune_save(capsys, tiny_dlm_dir, save)[0] == 0 and (save / "pruning.json").is_file()
    assert _prune_save(capsys, tiny_dlm_dir, save, "--overwrite", "--sparsity", "0.7")[0] == 0
    assert json.loads((save / "pruning.json").read_text())["sparsity"] == 0.7
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([out.name, f"{traj.name}.npz", save.name])


@pytest.mark.parametrize(
    "argv",
    [
        ["generate", "--out", "{long}"],
        ["prune", "--method", "magnitude", "--save", "{long}"],
        ["sweep", "--out", "{csv}"],  # fits, but its companions <name>.partial.csv and <name>.estimates.npz would not
    ],
)
def test_names_too_long_are_refused_before_the_work(capsys, tiny_dlm_dir, tmp_path, monkeypatch, argv):
    from sap_core.cli import common

    monkeypatch.setattr(common, "load", lambda args: pytest.fail("the model was loaded before the output check"))
    fill = dict(long=tmp_path / ("x" * 256), csv=tmp_path / ("s" * 245 + ".csv"))
    code, err = run_cli(capsys, *[a.format(**fill) for a in argv], "--model", str(tiny_dlm_dir))
    assert code == 2 and "this filesystem allows 255" in error_line(err) and list(tmp_path.iterdir()) == []


def test_a_saved_variant_follows_the_umask(capsys, tiny_dlm_dir, tmp_path):
    old = os.umask(0o022)
    try:
        save = tmp_path / "v"
        assert _prune_save(capsys, tiny_dlm_dir, save)[0] == 0
    finally:
        os.umask(old)
    assert save.stat().st_mode & 0o777 == 0o755
    assert {p.name: p.stat().st_mode & 0o777 for p in save.iterdir()}["model.safetensors"] == 0o644
    assert all(p.stat().st_mode & 0o777 == 0o644 for p in save.iterdir())
