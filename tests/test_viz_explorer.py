"""The explorer's view and exports (sap_core.animation) and its attention map (sap_core.viz): pure
functions of a sink report, checked against the report's own numbers."""

from __future__ import annotations

import base64
import json
import re

import numpy as np
import pytest
from PIL import Image

from sap_core import animation, viz
from sap_core.attention import AttentionRecorder
from sap_core.decoding import DecodeSpec
from sap_core.diffusion import generate
from sap_core.sink_report import analyze
from sap_core.sinks import STATES, SinkSpec


@pytest.fixture(scope="module")
def run(tiny_dlm):
    traj = generate(tiny_dlm, "To be, or not", DecodeSpec(8, 8, 4, "low_confidence", 0.0, 0.0, 0), recorder=AttentionRecorder())
    report = analyze(traj, SinkSpec(k=0.5))  # a low threshold: sinks at most steps of this random model
    tokens = animation.readable_tokens(tiny_dlm.decode, traj.final_tokens)
    return traj, report, tokens


def test_readable_tokens_make_whitespace_visible():
    assert animation.readable_tokens(lambda ids: {1: "a b", 2: "\n"}[ids[0]], [1, 2]) == ["a␣b", "⏎"]


def test_spec_validates_before_any_work(run):
    _, report, tokens = run
    with pytest.raises(animation.AnimationSpecError, match="color_range"):
        animation.AnimationSpec(color_range="auto")
    with pytest.raises(animation.AnimationSpecError, match="frame_ms"):
        animation.AnimationSpec(frame_ms=1)
    with pytest.raises(animation.AnimationSpecError, match="layer 7 was not analysed"):
        animation.explorer_data(report, tokens, animation.AnimationSpec(layer=7))
    with pytest.raises(animation.AnimationSpecError, match="token texts"):
        animation.explorer_data(report, tokens[:-1])


def test_color_limits_fixed_or_per_step():
    values = np.array([[[1.0, 2.0, np.nan]], [[1.0, 8.0, 0.5]]])
    assert animation.color_limits(values, "global").tolist() == [[0, 8.0], [0, 8.0]]
    assert animation.color_limits(values, "per-step")[:, 1].tolist() == [2.0, 8.0]
    hi = animation.color_limits(values, "global99")[:, 1]
    assert hi[0] == hi[1] and 2.0 < hi[0] < 8.0


def test_explorer_data_round_trips_the_report(run):
    traj, report, tokens = run
    data = animation.explorer_data(report, tokens)
    S, L, nL = report.n_steps, report.length, len(report.layers)
    assert (data["steps"], data["length"], data["layers"]) == (S, L, list(report.layers))
    state = np.frombuffer(base64.b64decode(data["state"]), np.uint8).reshape(S, L)
    assert (state == report.state).all()
    q = np.frombuffer(base64.b64decode(data["layer_mass"]), np.uint8).reshape(S, nL, L)
    expected = animation.layer_step_mass(report)
    assert ((q == 255) == np.isnan(expected)).all()
    decoded = q * data["qmax"] / 254
    ok = ~np.isnan(expected)
    assert np.abs(decoded[ok] - expected[ok]).max() <= data["qmax"] / 254 / 2 + 1e-9  # one byte, rounded
    for s in range(S):
        flat = np.zeros(nL * L, bool)
        flat[data["sinks"][s]] = True
        assert (flat.reshape(nL, L) == report.layer_is_sink[s]).all()
    assert data["dominant"] == report.dominant.tolist()
    assert all(data["layer_hi"][0] == hi for hi in data["layer_hi"])  # fixed range by default
    per_step = animation.explorer_data(report, tokens, animation.AnimationSpec(color_range="per-step"))
    assert per_step["layer_hi"] == animation.color_limits(expected, "per-step")[:, 1].round(3).tolist()


def test_view_steps_thin_a_long_run_and_keep_the_last_step():
    assert animation.view_steps(16, 6, 64).tolist() == list(range(16))  # small: every step
    steps = animation.view_steps(2048, 6, 2048)  # 2048 x 7 x 2048 values: 29 M
    stride = steps[1] - steps[0]
    assert stride == 3 and steps[-1] == 2047 and (np.diff(steps[:-1]) == stride).all()
    assert len(steps) * 7 * 2048 <= animation.MAX_VIEW_VALUES + 7 * 2048  # within budget (plus the last step)
    assert animation.view_steps(10, 1, 1, max_values=4).tolist() == [0, 5, 9]


def test_explorer_data_of_a_thinned_run_follows_its_steps(run):
    _, report, tokens = run
    S, L, nL = report.n_steps, report.length, len(report.layers)
    data = animation.explorer_data(report, tokens, max_values=(nL + 1) * L * 3)  # room for 3 steps: stride ceil(S/3)
    keep = animation.view_steps(S, nL, L, (nL + 1) * L * 3)
    assert data["step_ids"] == keep.tolist() and data["steps"] == len(keep) and data["total_steps"] == S
    assert data["stride"] == keep[1] - keep[0] > 1 and keep[-1] == S - 1
    q = np.frombuffer(base64.b64decode(data["layer_mass"]), np.uint8).reshape(len(keep), nL, L)
    full = np.frombuffer(base64.b64decode(animation.explorer_data(report, tokens)["layer_mass"]), np.uint8).reshape(S, nL, L)
    assert (q == full[keep]).all()
    state = np.frombuffer(base64.b64decode(data["state"]), np.uint8).reshape(len(keep), L)
    assert (state == report.state[keep]).all()
    assert data["dominant"] == report.dominant[keep].tolist() and len(data["captions"]) == len(data["sinks"]) == len(keep)
    for i, s in enumerate(keep):
        assert sorted(data["sinks"][i]) == np.flatnonzero(report.layer_is_sink[s].reshape(-1)).tolist()


def test_sinks_tables_name_the_tokens(run):
    _, report, tokens = run
    frame = animation.sinks_frame(report, tokens)
    assert len(frame) == int(report.is_sink.sum()) > 0
    for row in frame.itertuples():
        assert report.is_sink[row.step, row.position] and row.token_text == tokens[row.position]
        assert row.state == STATES[report.state[row.step, row.position]]
    s = int(frame["step"].iloc[0])
    listed = animation.sinks_at_step(report, tokens, s)
    assert sorted(p for p, _, _ in listed) == sorted(frame.loc[frame["step"] == s, "position"])
    assert [m for _, _, m in listed] == sorted([m for _, _, m in listed], reverse=True)
    positions = animation.positions_frame(report, tokens)
    assert positions["token_text"].tolist() == tokens and list(positions.columns).index("token_text") == 2
    masked_now = animation.tokens_at_step(report, tokens, 0)
    assert [t == "[mask]" for t in masked_now] == [st == STATES.index("masked") for st in report.state[0]]


def test_html_is_self_contained_and_carries_the_run(run):
    _, report, tokens = run
    page = animation.explorer_html(report, tokens).replace("<\\/", "</")
    assert "<script src" not in page and "http" not in page  # no library, no network
    data = json.loads(re.search(r"const D = (\{.*?\});\n", page, re.S).group(1))
    assert data["tokens"] == tokens and data["captions"][0].startswith(("sinks at this step", "no sink"))


def test_gif_has_a_frame_per_step_and_draws_the_sinks_red(run, tmp_path):
    _, report, tokens = run
    out = animation.write_animation(report, tmp_path / "sinks.gif", tokens)
    gif = Image.open(out)
    assert gif.format == "GIF" and gif.n_frames == report.n_steps
    step = int(np.argmax(report.is_sink.sum(1)))
    gif.seek(step)
    pixels = np.asarray(gif.convert("RGB")).reshape(-1, 3)
    red = (pixels == (229, 57, 53)).all(1).sum()
    assert red > 0 and report.is_sink[step].any()
    gif.seek(int(np.argmin(report.is_sink.sum(1))))
    if not report.is_sink[gif.tell()].any():
        assert not (np.asarray(gif.convert("RGB")).reshape(-1, 3) == (229, 57, 53)).all(1).any()


def test_write_animation_keeps_an_existing_file_on_failure(run, tmp_path):
    _, report, tokens = run
    target = tmp_path / "sinks.html"
    target.write_text("keep me")
    with pytest.raises(animation.AnimationSpecError, match="layer"):
        animation.write_animation(report, target, tokens, animation.AnimationSpec(layer=42))
    with pytest.raises(animation.AnimationSpecError, match=".gif or .html"):
        animation.write_animation(report, tmp_path / "sinks.png", tokens)
    assert target.read_text() == "keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["sinks.html"]
    animation.write_animation(report, target, tokens)
    assert target.read_text().startswith("<!DOCTYPE html>")


def test_attention_map_is_square_with_tokens_on_both_axes():
    rng = np.random.default_rng(0)
    amap = rng.random((5, 5))
    amap /= amap.sum(1, keepdims=True)
    fig = viz.attention_map_figure(amap, 3, 1, 0, ["a", "b", "c", "d", "e"])
    assert fig.layout.yaxis.scaleanchor == "x" and list(fig.layout.xaxis.ticktext) == ["a", "b", "c", "d", "e"]
    assert fig.data[0].customdata[1][4] == ["1 'b'", "4 'e'"]
    assert fig.data[0].colorscale[0][1] == viz.PROBABILITY_SCALE[0][1]
    many = viz.attention_map_figure(np.eye(120), 0, 0, 0)
    assert many.layout.xaxis.ticktext is None  # too many positions for labels: the hover names them


def test_per_layer_view_is_each_layers_mass_over_its_mean(run):
    """The explorer's per-layer view ([steps, layers, positions]) against a direct computation: each
    layer's mass at a step divided by its mean over that step's valid positions, NaN beyond them."""
    _, report, _ = run
    got = animation.layer_step_mass(report)
    mass = report.layer_mass.astype(np.float64)
    assert got.shape == mass.shape
    for s in range(mass.shape[0]):
        n = int(report.valid[s].sum())
        for layer in range(mass.shape[1]):
            row = mass[s, layer, :n]
            np.testing.assert_allclose(got[s, layer, :n], row / row.mean(), rtol=1e-12)
            assert np.isnan(got[s, layer, n:]).all()
    np.testing.assert_allclose(
        animation.step_mass(report)[0, : int(report.valid[0].sum())],
        report.mass[0, : int(report.valid[0].sum())] / report.mass[0, : int(report.valid[0].sum())].mean(),
        rtol=1e-6,
    )


def test_a_sink_still_masked_is_called_masked_not_by_its_final_token(run):
    """The caption at step t names a sink's token as it is at t: a position still masked reads 'masked'."""
    _, report, tokens = run
    data = animation.explorer_data(report, tokens)
    masked_code = STATES.index("masked")
    seen = 0
    for s in range(report.n_steps):
        caption = data["captions"][s]
        listed = animation.sinks_at_step(report, tokens, s)
        for j, text, _ in listed[:8]:
            if report.state[s, j] == masked_code:
                seen += 1
                assert text == "[mask]" and f"{j} masked " in caption and f"{j} '{tokens[j]}'" not in caption
            else:
                assert text == tokens[j] and f"{j} '{tokens[j]}'" in caption
    assert seen > 0, "no masked sink in this run: the test checks nothing"


def test_gif_labels_are_thinned_not_dropped_and_keep_every_sink():
    """Past ~96 positions the GIF writes every k-th known token plus every sink, none closer than a label."""
    masked, decoded = STATES.index("masked"), STATES.index("decoded")
    states = np.full(300, decoded, np.int8)
    states[250:] = masked
    sinks = np.array([0, 10, 101, 260])  # 260: a masked sink, labelled "[mask]"
    cell = 5.0
    every = 4
    got = animation._thinned_labels(sinks, states, every, cell)
    assert set(sinks.tolist()) <= set(got)
    assert all(states[j] != masked for j in got if j not in sinks)
    xs = sorted(got)
    assert all((b - a) * cell >= every * cell - 0.5 for a, b in zip(xs, xs[1:]))
    assert len(got) > 50  # thinned, not dropped


def test_gif_of_a_long_run_writes_labels(tiny_dlm):
    traj = generate(tiny_dlm, "To be", DecodeSpec(120, 8, 120, "low_confidence", 0.0, 0.0, 0), recorder=AttentionRecorder())
    report = analyze(traj, SinkSpec(k=0.5))
    tokens = animation.readable_tokens(tiny_dlm.decode, traj.final_tokens)
    frame = np.asarray(animation.gif_frames(report, tokens)[-1].convert("L"))
    band = frame[50 + 220 + 4 : -24, 56:-16]  # under the bars, above the position ticks: the token labels
    inked = (band < 128).any(0)
    assert inked.mean() > 0.2  # labels are written across the whole run (the old GIF wrote none past 96)


def test_export_names_say_which_run_and_are_safe():
    name = animation.export_name(
        "sinks", "tiny-dlm", "ROMEO.\n", animation.run_settings(DecodeSpec(64, 64, 16, temperature=0.8)), "gif"
    )
    assert name == "sinks_tiny-dlm_romeo_64tok-64steps-b16-low-confidence-t0.8-cfg0-seed0.gif"
    assert animation.run_settings(DecodeSpec(12, 12, 12, temperature=0.5, seed=3), causal=True) == "12tok-causal-t0.5-seed3"
    hostile = animation.export_name("positions", "/models/LLaDA-8B/", "Ünï ✓ <b>/../../etc/passwd" * 9, "x" * 500, "csv")
    assert len(hostile) <= 120 and hostile.endswith(".csv") and hostile.startswith("positions_llada-8b_")
    assert re.fullmatch(r"[a-z0-9._-]+", hostile) and ".." not in hostile and "/" not in hostile
    assert animation.export_name("sinks", "", "", "", "html") == "sinks_run_run_run.html"


def test_html_export_with_about_names_the_run_and_escapes_it(run):
    _, report, tokens = run
    about = [("Model", "tiny-dlm"), ("Prompt", "To be, or not <script>alert(1)</script>")]
    page = animation.html_bytes(report, tokens, about=about).decode()
    data = json.loads(re.search(r"const D = (\{.*?\});\n", page.replace("<\\/", "</"), re.S).group(1))
    assert data["about"] == [list(row) for row in about]
    assert "alert(1)</script>" not in page  # carried as JSON with '</' escaped (written into the page as text)
    assert animation.explorer_data(report, tokens)["about"] is None  # the app's view: no header, no margins


def test_head_grid_carries_every_head_per_step_within_its_budget(run):
    traj, report, tokens = run
    S, L, nL, nH = report.n_steps, report.length, len(report.layers), len(report.heads)
    assert traj.mass.shape == (S, nL, nH, L)  # the trajectory's record is [step, layer, head, L]
    data = animation.explorer_data(report, tokens, head_mass=traj.mass)["heads"]
    assert data["heads"] == list(report.heads) and data["step_ids"] == list(range(S))
    q = np.frombuffer(base64.b64decode(data["mass"]), np.uint8).reshape(S, nL, nH, L)
    expected = animation.head_step_mass(report, traj.mass)
    for s in (0, S - 1):
        for layer in range(nL):
            n = int(report.valid[s].sum())
            row = traj.mass[s, layer, :, :n].astype(np.float64)
            np.testing.assert_allclose(expected[s, layer, :, :n], row / row.mean(-1, keepdims=True), rtol=1e-9)
    ok = ~np.isnan(expected)
    assert ((q == 255) == ~ok).all()
    assert np.abs(q[ok] * data["qmax"] / 254 - expected[ok]).max() <= data["qmax"] / 254 / 2 + 1e-9
    # a tight budget: every k-th carried step and the last, and the payload shrinks with it
    small = animation.explorer_data(report, tokens, head_mass=traj.mass, max_head_values=nL * nH * L * 3)["heads"]
    assert small["step_ids"][-1] == S - 1 and 2 <= len(small["step_ids"]) <= 4
    assert len(base64.b64decode(small["mass"])) == len(small["step_ids"]) * nL * nH * L
    assert animation.explorer_data(report, tokens)["heads"] is None
    with pytest.raises(animation.AnimationSpecError, match="trajectory's mass"):
        animation.explorer_data(report, tokens, head_mass=traj.mass[:, :, :, :-1])


def test_every_export_says_which_run_it_is(run, tiny_dlm, tmp_path):
    """Issue 31 item 5: the provenance (model, prompt, settings) is built once in the core; the CSV carries it as
    columns, the JSON under "run" (and still reads back), the HTML header names the layer shown and opens at the
    step given, the GIF has a caption line."""
    import io

    import pandas as pd

    from sap_core.sink_report import SinkReport, provenance, with_provenance

    traj, report, tokens = run
    about = provenance(tiny_dlm, traj, report.spec)
    assert about.model.startswith(f"{tiny_dlm.name} · llada") and about.prompt == traj.prompt
    assert "steps, block" in about.decoding and about.sinks.startswith("official rule, k = 0.5")
    pruned = provenance(tiny_dlm, traj, report.spec, "wanda 50%, replayed")  # a variant's run names the variant
    assert pruned.model == about.model + " · pruned variant wanda 50%, replayed"
    assert f"_{tiny_dlm.name}-wanda-50-replayed_" in animation.export_name(
        "sink-report", f"{tiny_dlm.name}-wanda 50%, replayed", "x", "s", "json"
    )
    csv = pd.read_csv(io.StringIO(with_provenance(report.positions_frame(), about).to_csv(index=False)))
    assert (csv["model"] == about.model).all() and (csv["prompt"] == about.prompt).all() and len(csv) == report.length
    doc = json.loads(report.json_text(about))
    assert doc["run"]["prompt"] == traj.prompt and doc["run"]["sinks"] == about.sinks
    (tmp_path / "r.json").write_text(report.json_text(about))
    assert np.array_equal(SinkReport.from_json(tmp_path / "r.json").labels, report.labels)
    rows = dict(animation.about_rows(about, animation.AnimationSpec(layer=3), 5, "out"))
    assert "step × position map: layer 3" in rows["View"] and "opens at step 5" in rows["View"]
    page = animation.html_bytes(report, tokens, about=list(rows.items()), start_step=5).decode()
    assert '"start":5' in page
    plain, captioned = animation.gif_frames(report, tokens)[0], animation.gif_frames(report, tokens, caption=about.line())[0]
    assert captioned.height == plain.height + 20 and captioned.width == plain.width
    assert about.line().startswith(f"{tiny_dlm.name} · “")
