"""``python -m sap_core animate``: a trajectory from ``generate --record-attention --trajectory`` to a GIF or HTML."""

from __future__ import annotations

import json
import re

import pytest
from PIL import Image
from test_cli import run


@pytest.fixture(scope="module")
def trajectories(tmp_path_factory):
    d = tmp_path_factory.mktemp("animate")
    with_mass, without = d / "traj.npz", d / "plain.npz"
    for path, extra in ((with_mass, ["--record-attention"]), (without, [])):
        r = run(
            "generate",
            "--model",
            "tiny-dlm",
            "--prompt",
            "ROMEO.\n",
            "--gen-length",
            "8",
            "--steps",
            "8",
            "--block-length",
            "8",
            "--quiet",
            "--trajectory",
            path,
            *extra,
        )
        assert r.returncode == 0, r.stderr
    return with_mass, without


def test_animate_writes_a_gif_and_an_html(trajectories, tmp_path):
    traj, _ = trajectories
    gif = tmp_path / "out" / "sinks.gif"
    r = run("animate", "--trajectory", traj, "--out", gif, "--model", "tiny-dlm")
    assert r.returncode == 0, r.stderr
    assert "8 steps" in r.stderr
    image = Image.open(gif)
    assert image.format == "GIF" and image.n_frames == 8
    html = tmp_path / "sinks.html"
    r = run("animate", "--trajectory", traj, "--out", html, "--model", "tiny-dlm", "--color-range", "per-step", "--layer", "2")
    assert r.returncode == 0, r.stderr
    data = json.loads(re.search(r"const D = (\{.*?\});\n", html.read_text(), re.S).group(1).replace("<\\/", "</"))
    assert data["steps"] == 8 and data["tokens"][:2] == ["[BOS]", "RO"] and data["trail_name"] == "layer 2"
    assert len(set(data["layer_hi"])) > 1  # per-step colour range


def test_animate_says_what_to_do(trajectories, tmp_path):
    traj, plain = trajectories
    r = run("animate", "--trajectory", tmp_path / "none.npz", "--out", tmp_path / "a.gif")
    assert r.returncode == 2 and "generate --record-attention --trajectory" in r.stderr
    r = run("animate", "--trajectory", plain, "--out", tmp_path / "a.gif")
    assert r.returncode == 2 and "has no attention mass" in r.stderr
    r = run("animate", "--trajectory", traj, "--out", tmp_path / "a.png")
    assert r.returncode == 2 and "must end in .gif or .html" in r.stderr
    r = run("animate", "--trajectory", traj, "--out", tmp_path / "a.gif", "--layer", "99")
    assert r.returncode == 2 and "layer 99 was not analysed" in r.stderr
    assert not list(tmp_path.iterdir())
