"""Sink analysis (issue 4): hand-checked synthetic masses, the official rule, and real trajectories."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import numpy as np
import pandas as pd
import pytest
import torch

from sap_core.errors import SapError, SinkSpecError
from sap_core.sink_report import SinkReport, analyze, compare, read_csv
from sap_core.sinks import (
    LABELS,
    STATES,
    SinkSpec,
    factor_gate,
    mass_view,
    mean_factors,
    position_stats,
    reduce_mass,
    score_steps,
    sink_flags,
    sink_scores,
    step_factors,
)


def downweight_factors(summed, spec=SinkSpec(), *, gated=False, per_step=False):
    """The pruner's token factors of one sample's reduced mass, through the functions the engine calls."""
    scores, flags = score_steps(summed, spec)
    gate = factor_gate("gated" if gated else "official", position_stats(scores, flags, spec).gate)
    return step_factors(scores, gate) if per_step else mean_factors(position_stats(scores, flags, spec).mean_score, gate)


def step_downweights(summed, spec=SinkSpec(), *, gated=False):
    return downweight_factors(summed, spec, gated=gated, per_step=True)


@dataclass
class FakeTrajectory:
    """The fields of sap_core.decoding.Trajectory that the analysis reads."""

    tokens: np.ndarray
    final_tokens: np.ndarray
    prompt_length: int
    decoded_at: np.ndarray
    confidence: np.ndarray
    mass: np.ndarray | None
    valid_length: np.ndarray
    causal: bool
    mask_id: int = 99


def fake(mass: np.ndarray, prompt_length: int = 2, causal: bool = False, valid_length=None) -> FakeTrajectory:
    S, _, _, L = mass.shape
    decoded_at = np.full(L, -1, np.int64)
    decoded_at[prompt_length:] = np.arange(L - prompt_length) % S
    vl = np.full(S, L, np.int64) if valid_length is None else np.asarray(valid_length, np.int64)
    return FakeTrajectory(
        tokens=np.zeros((S, L), np.int64),
        final_tokens=np.arange(L, dtype=np.int64) + 10,
        prompt_length=prompt_length,
        decoded_at=decoded_at,
        confidence=np.full((S, L), np.nan, np.float32),
        mass=mass.astype(np.float32),
        valid_length=vl,
        causal=causal,
    )


def row_with_sink(L: int, pos: int, sink: float = 8.5) -> np.ndarray:
    """One (layer, head) mass row summing to L: ``sink`` at ``pos``, the rest shared evenly."""
    row = np.full(L, (L - sink) / (L - 1), np.float64)
    row[pos] = sink
    return row


def stack(rows: list[np.ndarray], layers: int = 2, heads: int = 2) -> np.ndarray:
    """[S, layers, heads, L] with every (layer, head) of step t equal to rows[t]."""
    return np.stack([np.broadcast_to(r, (layers, heads, r.shape[0])) for r in rows]).astype(np.float32)


def official_scores(mass2d: np.ndarray, k: float = 2.0, alpha: float = 5.0) -> torch.Tensor:
    """The official rule, written independently in torch: sigmoid(alpha (m - (mean + k std))), population std."""
    m = torch.as_tensor(mass2d, dtype=torch.float64)
    thr = m.mean(dim=1, keepdim=True) + k * m.std(dim=1, keepdim=True, unbiased=False)
    return torch.sigmoid(alpha * (m - thr))


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# --- hand-checked synthetic cases --------------------------------------------------------------


def test_fixed_sink_at_position_zero_is_stable():
    L, S = 16, 10
    traj = fake(stack([row_with_sink(L, 0)] * S))
    report = analyze(traj, SinkSpec(tau=0.01))
    assert (report.dominant == 0).all() and (report.centroid == 0).all()
    assert report.aggregate.dominant_var == 0 and report.aggregate.centroid_var == 0
    assert all(f.dominant_var == 0 and f.centroid_var == 0 for f in report.per_layer)
    assert report.positions.variance[0] == 0 and report.positions.frequency[0] == 1
    # by hand: aggregate mass 4 * 8.5 = 34 at 0 and 4 * 0.5 = 2 elsewhere; mean 4, std sqrt(60)
    expected = sigmoid(5 * (34 - (4 + 2 * math.sqrt(60))))
    assert report.scores[0, 0] == pytest.approx(expected, rel=1e-6)
    assert list(report.labels) == ["stable"] + ["none"] * (L - 1)
    assert (report.weights == 1).all()  # a stable sink is kept whole
    assert list(analyze(traj, SinkSpec(tau=0.0)).labels)[0] == "unstable"  # tau = 0: every sink counts


def test_sink_jumping_between_two_positions_has_known_variance():
    L, S = 16, 10
    traj = fake(stack([row_with_sink(L, 2 if t % 2 == 0 else 10) for t in range(S)]))
    report = analyze(traj, SinkSpec(tau=0.2))
    # dominant and centroid alternate 2, 10: population variance 4^2 = 16 tokens^2, 16 / 16^2 normalised
    assert report.aggregate.dominant_var == pytest.approx(16.0)
    assert report.aggregate.dominant_var_norm == pytest.approx(16.0 / L**2)
    assert report.aggregate.centroid_var == pytest.approx(16.0)
    assert report.per_layer[1].dominant_var == pytest.approx(16.0)
    hi = sigmoid(5 * (34 - (4 + 2 * math.sqrt(60))))
    lo = sigmoid(5 * (2 - (4 + 2 * math.sqrt(60))))
    v = ((hi - lo) / 2) ** 2  # a score alternating between hi and lo
    for j in (2, 10):
        assert report.positions.variance[j] == pytest.approx(v, rel=1e-9)
        assert report.positions.frequency[j] == 0.5
        assert report.positions.mean_score[j] == pytest.approx((hi + lo) / 2)
    assert v == pytest.approx(0.25, abs=1e-9)
    assert list(np.flatnonzero(report.labels == "unstable")) == [2, 10]
    assert report.weights[2] == pytest.approx(1 - (hi + lo) / 2) and report.weights[2] == pytest.approx(0.5)
    assert (np.delete(report.weights, [2, 10]) == 1).all()
    # above the variance, the gate closes: a sink half the time is "stable" at phi = 0.5, "transient" above
    assert list(np.flatnonzero(report.rescore(tau=0.3).labels == "stable")) == [2, 10]
    assert (report.rescore(tau=0.3).weights == 1).all()
    assert list(np.flatnonzero(report.rescore(tau=0.3, stable_min_frequency=0.6).labels == "transient")) == [2, 10]
    # hard rule: scores are exactly 0/1, variance f(1-f) = 0.25
    hard = report.rescore(rule="leave_one_out", tau=0.25)
    assert hard.positions.variance[2] == 0.25 and list(np.flatnonzero(hard.labels == "unstable")) == [2, 10]


@pytest.mark.parametrize("value", [1.0, 1 / 3, 0.1])
@pytest.mark.parametrize("rule", ["official", "leave_one_out"])
def test_uniform_mass_has_no_sinks(value, rule):
    L, S = 12, 6
    traj = fake(np.full((S, 2, 3, L), value, np.float32))
    report = analyze(traj, SinkSpec(rule=rule, epsilon=0.0))
    assert not report.is_sink.any() and not report.layer_is_sink.any()
    assert set(report.labels) == {"none"}
    assert np.isnan(report.centroid).all() and report.aggregate.sink_steps == 0
    assert math.isnan(report.aggregate.centroid_var)
    assert report.aggregate.entropy_norm == pytest.approx(1.0)
    assert report.aggregate.top_k_share == pytest.approx(4 / L)
    if rule == "official":
        assert np.allclose(report.scores, 0.5, atol=1e-6)
        summed = traj.mass.astype(np.float64).sum(axis=(1, 2))
        assert np.allclose(downweight_factors(summed), 0.5, atol=1e-6)  # the official factor: 1 - 0.5, even without a sink
        assert (report.weights == 1).all() and not report.positions.gate.any()  # the gate: no sink, nothing down-weighted
    else:
        assert (report.scores == 0).all() and (report.weights == 1).all()


def test_official_factors_are_explicit_and_the_gate_never_passes_a_non_sink():
    rng = np.random.default_rng(0)
    S, L = 10, 40
    mass = rng.gamma(2.0, 1.0, size=(S, 3, 4, L))
    mass[:, :, :, 0] += 6.0
    mass[np.arange(S), :, :, 5 + np.arange(S) % 3] += rng.uniform(2, 8, size=(S, 1, 1))
    mass = mass / mass.sum(-1, keepdims=True) * L
    traj = fake(mass.astype(np.float32))
    summed = traj.mass.astype(np.float64).sum(axis=(1, 2))
    official = official_scores(summed)
    report = analyze(traj)  # defaults: official rule, k = 2, alpha = 5, tau = 0
    assert report.spec.tau == 0
    assert np.allclose(report.scores, official.numpy(), atol=1e-6)
    # the official factors (gated=False, the default): every position, the reference code's weights
    assert np.allclose(downweight_factors(summed), 1 - official.mean(0).numpy(), atol=1e-6)  # prune_sink_sparsegpt
    assert np.allclose(step_downweights(summed), 1 - official.numpy(), atol=1e-6)  # prune_sink, per step
    assert np.allclose(downweight_factors(summed, SinkSpec(tau=0.2)), downweight_factors(summed))  # tau unused
    assert np.allclose(sink_scores(torch.as_tensor(summed, dtype=torch.float32)), official.numpy(), atol=1e-5)
    assert np.array_equal(sink_flags(summed), official.numpy() > 0.5)
    # the gate at tau = 0: every sink, never a non-sink; the factors differ from the official ones there only
    sink = report.positions.frequency > 0
    assert sink.any() and (~sink).any()
    assert np.array_equal(report.positions.gate, sink) and set(report.labels[~sink]) == {"none"}
    gated = downweight_factors(summed, gated=True)
    assert np.allclose(gated, report.weights) and np.allclose(gated[sink], downweight_factors(summed)[sink])
    assert (gated[~sink] == 1).all() and (official.mean(0).numpy()[~sink] > 0).all()  # official: a tiny down-weight
    steps = step_downweights(summed, gated=True)
    assert np.allclose(steps[:, sink], 1 - official.numpy()[:, sink], atol=1e-6) and (steps[:, ~sink] == 1).all()
    # a higher tau closes the gate on the stable sinks too, and still never opens it for a non-sink
    for tau in (0.01, 0.05, 0.3):
        stats = report.rescore(tau=tau).positions
        assert not (stats.gate & ~sink).any() and np.array_equal(stats.gate, stats.label == "unstable")
    gated = report.rescore(tau=0.05)
    gate = gated.labels == "unstable"
    assert gate.any() and not gate.all()
    assert np.allclose(gated.weights[gate], report.weights[gate]) and (gated.weights[~gate] == 1).all()
    # k and alpha change the official scores as the formula says
    again = report.rescore(k=1.0, alpha=2.0)
    assert np.allclose(again.scores, official_scores(summed, 1.0, 2.0).numpy(), atol=1e-6)


def test_leave_one_out_rule_reproduces_the_figure():
    m = np.array([[5, 18, 9, 22, 7]], np.float64)
    spec = SinkSpec(rule="leave_one_out")
    assert list(sink_flags(m, spec)[0]) == [False, True, False, True, False]
    assert list(sink_scores(m, spec)[0]) == [0, 1, 0, 1, 0]
    assert list(downweight_factors(m, spec)) == [1, 0, 1, 0, 1]  # w = 1 - s, as drawn
    # 18 exceeds the others' mean 10.75 by 7.25 = 0.594 uniform masses (12.2): epsilon 0.6 drops it
    assert list(sink_flags(m, replace(spec, epsilon=0.6))[0]) == [False, False, False, True, False]


def test_causal_normalisation_removes_the_mask_artefact():
    # every query attends uniformly to the keys it may see: key j receives H(n) - H(j) per head
    n = 32
    harmonic = np.concatenate([[0.0], np.cumsum(1 / np.arange(1, n + 1))])
    per_head = harmonic[n] - harmonic[np.arange(n)]
    mass = np.broadcast_to(per_head, (4, 2, 2, n)).copy()
    traj = fake(mass, prompt_length=n, causal=True)
    raw = analyze(traj)
    assert (raw.dominant == 0).all() and raw.is_sink[:, 0].all()  # the artefact
    expected = analyze(traj, SinkSpec(normalize="expected"))
    assert not expected.is_sink.any() and np.allclose(expected.view(), 1.0)
    per_query = mass_view(mass.sum(axis=(1, 2)), "per_query", causal=True)
    assert per_query[0, 0] == pytest.approx(harmonic[n])  # counting queries alone leaves key 0 at H(n) ~ ln n
    assert per_query[0, -1] == pytest.approx(1.0)
    # for a bidirectional model the normalised views all equal the uniform view
    dlm = fake(stack([row_with_sink(16, 3)] * 3))
    views = [analyze(dlm, SinkSpec(normalize=v)).view() for v in ("uniform", "per_query", "expected")]
    assert np.allclose(views[0], views[1]) and np.allclose(views[0], views[2])
    assert views[0][0, 3] == pytest.approx(8.5)  # a multiple of the uniform mass


def test_layer_and_head_selection_and_per_layer_figures():
    L, S = 16, 6
    mass = np.ones((S, 3, 2, L), np.float32)
    for t in range(S):
        mass[t, 1, 0] = row_with_sink(L, 3 + t)  # a moving sink in layer 1, head 0 only
    traj = fake(mass)
    full = analyze(traj)
    assert full.layer_mass.shape == (S, 3, L) and np.allclose(full.layer_mass.sum(1), full.mass)
    assert np.allclose(full.mass, mass.sum(axis=(1, 2)))
    assert list(full.layer_dominant[:, 1]) == [3 + t for t in range(S)]
    assert full.per_layer[1].dominant_var == pytest.approx(np.var(np.arange(S) + 3.0))
    assert full.per_layer[0].sink_steps == 0 and math.isnan(full.per_layer[0].centroid_var)
    one = analyze(traj, SinkSpec(layers=[1], heads=[0]))
    assert one.layers == (1,) and one.heads == (0,) and one.layer_mass.shape == (S, 1, L)
    assert np.allclose(one.mass, mass[:, 1, 0])
    assert list(one.dominant) == [3 + t for t in range(S)] and list(one.centroid) == [3.0 + t for t in range(S)]
    assert list(one.layers_frame()["layer"]) == [-1, 1]
    with pytest.raises(SinkSpecError, match="out of range"):
        analyze(traj, SinkSpec(layers=[3]))
    with pytest.raises(SinkSpecError, match="needs the full mass"):
        one.rescore(layers=None)


def test_states_and_valid_positions_of_a_causal_trajectory():
    P, G = 3, 4
    L = P + G
    valid_length = P + np.arange(G)
    mass = np.zeros((G, 1, 1, L), np.float32)
    for s, n in enumerate(valid_length):
        mass[s, 0, 0, :n] = row_with_sink(n, 0, sink=n / 2)
    traj = fake(mass, prompt_length=P, causal=True, valid_length=valid_length)
    traj.decoded_at = np.array([-1] * P + list(range(G)))
    report = analyze(traj)
    for s, n in enumerate(valid_length):
        assert np.isnan(report.scores[s, n:]).all() and np.isfinite(report.scores[s, :n]).all()
        names = report.state_names(s)
        assert names[:P] == ["prompt"] * P
        assert names[P + s] == "decoding"  # the position this step outputs
        assert names[P : P + s] == ["decoded"] * s
        assert all(x == "absent" for x in names[P + s + 1 :])
    assert report.positions.valid_steps[-1] == 0 and report.labels[-1] == "none" and report.weights[-1] == 1
    assert report.positions.valid_steps[P] == G - 1
    dlm = fake(stack([row_with_sink(8, 0)] * 4), prompt_length=2)
    dlm.decoded_at = np.array([-1, -1, 0, 0, 1, 2, 3, 3])
    names = analyze(dlm).state_names(1)
    assert names == ["prompt", "prompt", "decoded", "decoded", "decoding", "masked", "masked", "masked"]
    assert set(STATES) == {"prompt", "decoded", "decoding", "masked", "absent"}


def test_reduction_is_cached_and_rescoring_skips_it():
    rng = np.random.default_rng(1)
    traj = fake(rng.random((4, 2, 2, 10)).astype(np.float32))
    a = reduce_mass(traj)
    b = reduce_mass(traj, SinkSpec(k=3.0, tau=0.1, alpha=1.0))
    assert a.layer_mass is b.layer_mass and a.mass is b.mass  # same selection: no second pass over the mass
    c = reduce_mass(traj, SinkSpec(heads=[1]))
    assert c.layer_mass is not a.layer_mass and np.allclose(c.layer_mass, traj.mass[:, :, 1])
    from sap_core import sinks

    traj2 = fake(rng.random((4, 2, 2, 10)).astype(np.float32))
    reduce_mass(traj2)
    n = len(sinks._CACHE)
    del traj2
    assert len(sinks._CACHE) == n - 1  # the cache lets go of a dropped trajectory's reduction
    report = analyze(traj)
    again = report.rescore(k=1.0)
    fresh = analyze(traj, SinkSpec(k=1.0))
    assert np.array_equal(again.scores, fresh.scores, equal_nan=True) and np.array_equal(again.weights, fresh.weights)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(rule="soft"), "rule must be one of"),
        (dict(normalize="softmax"), "normalize must be one of"),
        (dict(alpha=0), "alpha must be > 0"),
        (dict(tau=-0.1), "tau must be finite and >= 0"),
        (dict(epsilon=-1), "epsilon must be >= 0"),
        (dict(stable_min_frequency=0), "stable_min_frequency"),
        (dict(k=float("nan")), "finite"),
        (dict(top_k=0), "top_k"),
        (dict(layers=[]), "layers is empty"),
        (dict(heads=[1, 1]), "twice"),
        (dict(layers=["a"]), "integer indices"),
    ],
)
def test_impossible_specs_say_what_to_do(kwargs, message):
    with pytest.raises(SinkSpecError, match=message) as info:
        SinkSpec(**kwargs)
    assert isinstance(info.value, SapError)


def test_user_errors_on_inputs():
    traj = fake(np.ones((3, 1, 1, 5), np.float32))
    traj.mass = None
    with pytest.raises(SinkSpecError, match="recorder=AttentionRecorder"):
        analyze(traj)
    with pytest.raises(SinkSpecError, match="sum over layers and heads first"):
        sink_scores(np.ones((2, 3, 4)))
    with pytest.raises(SinkSpecError, match="valid_length"):
        sink_scores(np.ones((2, 4)), valid_length=[4, 5])


def test_position_stats_from_scores_alone():
    scores = np.array([[0.9, 0.1, np.nan], [0.1, 0.1, np.nan], [0.9, 0.1, 0.2]])
    stats = position_stats(scores, scores > 0.5, SinkSpec(tau=0.1))
    assert list(stats.valid_steps) == [3, 3, 1]
    assert stats.frequency[0] == pytest.approx(2 / 3) and stats.variance[0] == pytest.approx(np.var([0.9, 0.1, 0.9]))
    assert list(stats.label) == ["unstable", "none", "none"]
    assert stats.weight[0] == pytest.approx(1 - np.mean([0.9, 0.1, 0.9])) and stats.weight[1] == 1
    assert set(stats.label) <= set(LABELS)


def test_exports_load_back(tmp_path):
    L, S = 16, 6
    traj = fake(stack([row_with_sink(L, 2 if t % 2 else 9) for t in range(S)]))
    report = analyze(traj, SinkSpec(tau=0.1, layers=[0, 1]))
    frames = report.to_frames()
    assert len(frames["positions"]) == L and len(frames["steps"]) == S * 3 and len(frames["layers"]) == 3
    assert len(frames["scores"]) == S * L and set(frames["scores"]["state"]) <= set(STATES)
    assert list(frames["positions"]["label"][[2, 9]]) == ["unstable", "unstable"]
    back = read_csv(report.to_csv(tmp_path / "csv"))
    assert back["spec"] == report.spec
    for name, frame in frames.items():
        pd.testing.assert_frame_equal(back[name], frame, check_dtype=False)
    loaded = SinkReport.from_json(report.to_json(tmp_path / "report.json"))
    assert (tmp_path / "report.json").read_text() == report.json_text()  # the Sink stability page's download
    assert loaded.spec == report.spec and loaded.layers == report.layers and loaded.aggregate == report.aggregate
    for name in ("mass", "layer_mass", "scores", "is_sink", "dominant", "centroid", "layer_scores", "state", "weights", "labels"):
        assert np.array_equal(
            getattr(loaded, name), getattr(report, name), equal_nan=name != "labels" and name != "is_sink" and name != "state"
        ), name
    with pytest.raises(SinkSpecError, match="SinkReport.to_json"):
        SinkReport.from_json(tmp_path / "csv" / "spec.json")


# --- real trajectories of tiny random models ---------------------------------------------------


@pytest.fixture(scope="module")
def trajectories(tiny_dlm, tiny_ar):
    from sap_core.attention import AttentionRecorder
    from sap_core.decoding import DecodeSpec
    from sap_core.diffusion import generate

    prompt = tiny_dlm.encode("To be, or not to be")
    dlm = generate(tiny_dlm, prompt, DecodeSpec(gen_length=16, steps=8, block_length=8), recorder=AttentionRecorder())
    ar = generate(tiny_ar, prompt, DecodeSpec(gen_length=8), recorder=AttentionRecorder())
    return ar, dlm


def check_invariants(report: SinkReport, traj) -> None:
    S, Ly, H, L = traj.mass.shape
    assert report.scores.shape == (S, L) and report.layer_scores.shape == (S, Ly, L)
    assert report.layer_dominant.shape == (S, Ly) and report.dominant.shape == (S,)
    assert report.weights.shape == (L,) and report.labels.shape == (L,) and len(report.per_layer) == Ly
    valid = np.arange(L)[None] < traj.valid_length[:, None]
    assert np.array_equal(report.valid, valid)
    assert np.isnan(report.scores[~valid]).all()
    s = report.scores[valid]
    assert ((s >= 0) & (s <= 1)).all()
    assert np.array_equal(report.is_sink[valid], s > 0.5) and not report.is_sink[~valid].any()
    assert (report.dominant < traj.valid_length).all() and (report.layer_dominant < traj.valid_length[:, None]).all()
    # per layer, every head's mass sums to the number of queries
    assert np.allclose(report.layer_mass.sum(-1), H * traj.valid_length[:, None], rtol=1e-4)
    assert np.allclose(report.mass, traj.mass.sum(axis=(1, 2)), rtol=1e-5, atol=1e-5)
    p = report.positions
    assert ((p.frequency >= 0) & (p.frequency <= 1)).all() and ((p.variance >= 0) & (p.variance <= 0.25)).all()
    assert set(report.labels) <= set(LABELS)
    assert ((report.weights >= 0) & (report.weights <= 1)).all()
    assert all(
        0 <= f.dominant_var_norm <= 0.25 and 0 <= f.entropy_norm <= 1 + 1e-9 for f in (report.aggregate, *report.per_layer)
    )


def test_real_dlm_trajectory(trajectories):
    _, dlm = trajectories
    report = analyze(dlm)
    check_invariants(report, dlm)
    assert not report.causal and report.valid.all()
    summed = dlm.mass.astype(np.float64).sum(axis=(1, 2))
    official = official_scores(summed)
    assert np.allclose(downweight_factors(summed), 1 - official.mean(0).numpy(), atol=1e-5)
    assert np.allclose(report.weights, np.where(report.positions.gate, 1 - official.mean(0).numpy(), 1), atol=1e-5)
    states = report.state
    assert (states[:, : report.prompt_length] == STATES.index("prompt")).all()
    assert ((states == STATES.index("decoding")).sum(1) == 2).all()  # 16 tokens in 8 steps


def test_real_ar_trajectory_and_comparison(trajectories):
    ar, dlm = trajectories
    report = analyze(ar)
    check_invariants(report, ar)
    assert report.causal and report.state[-1, -1] == STATES.index("decoding")
    # near-uniform attention of a random causal model: raw mass crowns key 0 at every step (the mask's
    # artefact); the comparison view does not
    assert (report.dominant == 0).all() and report.is_sink[:, 0].all()
    both = compare(ar, dlm)  # default: the raw view, the very numbers of each model's own analysis
    assert both.same_prompt and both.reports[0].spec.normalize == "raw"
    assert both.summary()["AR"] == asdict(report.aggregate) and both.summary()["DLM"] == asdict(analyze(dlm).aggregate)
    expected = compare(ar, dlm, normalize="expected")  # the option that corrects the causal triangle
    assert not expected.reports[0].is_sink[:, 0].all()
    readable = expected.readable_frame()
    assert readable.loc[0, "Layer"] == "all" and "AR: Var(dominant position) (tokens²)" in readable.columns
    both = expected
    frame = both.frame()
    assert list(frame["layer"]) == [-1, 0, 1]
    assert {"AR_dominant_var_norm", "DLM_dominant_var_norm", "AR_centroid_var", "DLM_top_k_share"} <= set(frame.columns)
    assert frame.loc[0, "AR_dominant_var_norm"] == both.reports[0].aggregate.dominant_var_norm
    again = compare(analyze(ar), analyze(dlm), normalize="expected")  # reports are rescored in the comparison view
    pd.testing.assert_frame_equal(again.frame(), frame)
    assert set(both.summary()) == {"AR", "DLM"}


def test_every_view_is_explained_and_absent_positions_can_be_nan():
    from sap_core.sinks import VIEW_NOTES, VIEWS

    assert set(VIEW_NOTES) == set(VIEWS) and all(len(v) == 3 and all(v) for v in VIEW_NOTES.values())
    mass = np.array([[4.0, 2.0, 0.0], [3.0, 2.0, 1.0]])
    zero = mass_view(mass, "uniform", [2, 3])
    nan = mass_view(mass, "uniform", [2, 3], absent=np.nan)
    assert zero[0, 2] == 0 and np.isnan(nan[0, 2])
    np.testing.assert_allclose(nan[0, :2], [4 / 3, 2 / 3])
    np.testing.assert_allclose(nan[1], [1.5, 1.0, 0.5])


def test_factor_gate_is_explicit_and_refuses_an_unknown_weighting():
    gate = np.array([True, False, True])
    assert factor_gate("gated", gate).tolist() == [True, False, True]
    assert factor_gate("official", gate).all() and not factor_gate("none", gate).any()
    scores = np.array([[0.2, 0.9, np.nan]])
    assert step_factors(scores, factor_gate("none", gate)).tolist() == [[1, 1, 1]]
    np.testing.assert_allclose(step_factors(scores, gate), [[0.8, 1.0, 1.0]], rtol=1e-6)
    with pytest.raises(SinkSpecError, match="factors must be one of"):
        factor_gate("sometimes", gate)
