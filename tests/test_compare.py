"""Generation comparison: dense vs pruned variants with the same prompt, spec and seed (issue 6)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sap_core.compare import compare_generations, divergence_step, position_agreement, states_after_steps, step_agreement
from sap_core.decoding import DecodeSpec, Trajectory
from sap_core.diffusion import generate
from sap_core.errors import Cancelled, SapError
from sap_core.pruning import PruneSpec, numbered, prune
from sap_core.sinks import SinkSpec

SPEC = DecodeSpec(gen_length=16, steps=8, block_length=8, seed=3)
PROMPT = "To be, or not to be"


def _state(handle):
    return {k: v.detach().clone() for k, v in handle.module.state_dict().items()}


def _same_state(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def magnitude_30(tiny_dlm):
    return prune(tiny_dlm, PruneSpec("magnitude", 0.3))


def test_dense_against_itself_never_diverges(tiny_dlm):
    identity = prune(tiny_dlm, PruneSpec("magnitude", 0.0))  # a variant that changes nothing
    comparison = compare_generations(tiny_dlm, {"identity": identity, "same handle": tiny_dlm}, PROMPT, SPEC)
    assert [r.label for r in comparison.runs] == ["dense", "identity", "same handle"]
    for run in comparison.runs:
        assert run.divergence_step is None
        assert run.agreement.shape == (SPEC.gen_length,) and run.agreement.all()
        assert run.agreement_rate == 1.0
        np.testing.assert_array_equal(run.step_agreement, np.ones(SPEC.steps))
        assert run.text == comparison.dense.text
        np.testing.assert_array_equal(run.trajectory.tokens, comparison.dense.trajectory.tokens)


def test_a_differing_variant_shows_its_divergence_step(tiny_dlm, magnitude_30):
    before = _state(tiny_dlm)
    comparison = compare_generations(tiny_dlm, [magnitude_30], PROMPT, SPEC)
    assert _same_state(before, _state(tiny_dlm)), "the shared dense model was modified"
    dense, run = comparison.dense, comparison.variants[0]
    assert run.label == "magnitude 30%"  # PruneSpec.label
    d = run.divergence_step
    assert d is not None and 0 <= d < SPEC.steps
    # Same states up to d, different state after step d; step_agreement is 1 before d and below 1 at d.
    a, b = states_after_steps(dense.trajectory), states_after_steps(run.trajectory)
    assert (a[:d] == b[:d]).all() and (a[d] != b[d]).any()
    np.testing.assert_array_equal(run.step_agreement[:d], 1.0)
    assert run.step_agreement[d] < 1.0
    # Per-position agreement is the final-token comparison; the texts differ accordingly.
    expected = dense.trajectory.generated_ids == run.trajectory.generated_ids
    np.testing.assert_array_equal(run.agreement, expected)
    assert run.agreement_rate == pytest.approx(expected.mean())
    assert (run.text == dense.text) == bool(expected.all())
    # The variant's run is the variant's own generation, and the dense run the dense one.
    with magnitude_30.applied(tiny_dlm):
        direct = generate(tiny_dlm, PROMPT, SPEC)
    np.testing.assert_array_equal(direct.final_tokens, run.trajectory.final_tokens)
    np.testing.assert_array_equal(generate(tiny_dlm, PROMPT, SPEC).final_tokens, dense.trajectory.final_tokens)


def test_timing_table_and_json(tiny_dlm, magnitude_30):
    comparison = compare_generations(tiny_dlm, {"m30": magnitude_30}, PROMPT, SPEC)
    for run in comparison.runs:
        assert run.step_seconds.shape == (SPEC.steps,) and (run.step_seconds > 0).all()
        assert run.seconds == pytest.approx(run.step_seconds.sum())
    table = comparison.table()
    assert list(table["label"]) == ["dense", "m30"]
    assert list(table.columns[:4]) == ["label", "text", "divergence_step", "agreement_rate"]
    assert table["divergence_step"].isna().tolist() == [True, comparison["m30"].divergence_step is None]
    data = comparison.to_dict()
    import json

    back = json.loads(json.dumps(data))
    assert back["runs"][1]["divergence_step"] == comparison["m30"].divergence_step
    assert len(back["runs"][0]["step_seconds"]) == SPEC.steps


def test_progress_counts_all_steps_and_cancel_restores_weights(tiny_dlm, magnitude_30):
    calls = []
    compare_generations(tiny_dlm, [magnitude_30], PROMPT, SPEC, progress=lambda d, t, m: calls.append((d, t)))
    assert calls[-1] == (2 * SPEC.steps, 2 * SPEC.steps)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)

    before = _state(tiny_dlm)

    def cancel_in_variant(done, total, message):
        if done > SPEC.steps + 2:
            raise Cancelled("stop")

    with pytest.raises(Cancelled):
        compare_generations(tiny_dlm, [magnitude_30], PROMPT, SPEC, progress=cancel_in_variant)
    assert _same_state(before, _state(tiny_dlm))


def test_causal_model_compares_token_by_token(tiny_ar):
    variant = prune(tiny_ar, PruneSpec("magnitude", 0.9))
    spec = DecodeSpec(gen_length=6, seed=0)
    comparison = compare_generations(tiny_ar, [variant], PROMPT, spec)
    run = comparison.variants[0]
    assert run.trajectory.n_steps == 6 and run.step_agreement.shape == (6,)
    assert run.divergence_step is None or 0 <= run.divergence_step < 6


def _traj(tokens, final, prompt_length=2):
    tokens = np.asarray(tokens, np.int64)
    S, L = tokens.shape
    return Trajectory(
        tokens=tokens,
        final_tokens=np.asarray(final, np.int64),
        prompt_length=prompt_length,
        decoded_at=np.full(L, -1),
        confidence=np.zeros((S, L), np.float32),
        mass=None,
        valid_length=np.full(S, L),
        step_seconds=np.full(S, 0.01),
        causal=False,
        mask_id=9,
        spec=DecodeSpec(gen_length=L - prompt_length, steps=S, block_length=L - prompt_length),
    )


def test_divergence_and_agreement_on_handmade_trajectories():
    M = 9
    dense = _traj([[1, 2, M, M, M], [1, 2, 5, M, M], [1, 2, 5, 6, M]], [1, 2, 5, 6, 7])
    # Same tokens, but position 4 decoded before 3 at step 1: the states differ after step 1.
    other = _traj([[1, 2, M, M, M], [1, 2, 5, M, M], [1, 2, 5, M, 7]], [1, 2, 5, 6, 7])
    assert divergence_step(dense, dense) is None
    assert divergence_step(dense, other) == 1
    np.testing.assert_array_equal(position_agreement(dense, other), [True, True, True])
    np.testing.assert_allclose(step_agreement(dense, other), [1.0, 1 / 3, 1.0])
    # A different final token only: divergence at the last step.
    last = _traj(dense.tokens, [1, 2, 5, 6, 8])
    assert divergence_step(dense, last) == 2
    np.testing.assert_array_equal(position_agreement(dense, last), [True, True, False])
    with pytest.raises(SapError):
        divergence_step(dense, _traj(dense.tokens[:2], dense.final_tokens))
    with pytest.raises(SapError):
        divergence_step(dense, _traj([[3, 2, M, M, M]] + dense.tokens[1:].tolist(), dense.final_tokens))


def test_duplicate_labels_are_refused(tiny_dlm, magnitude_30):
    with pytest.raises(SapError, match="unique"):
        compare_generations(tiny_dlm, {"dense": magnitude_30}, PROMPT, SPEC)


def test_two_variants_of_one_spec_are_numbered(tiny_dlm, magnitude_30):
    again = prune(tiny_dlm, PruneSpec("magnitude", 0.3))
    comparison = compare_generations(tiny_dlm, [magnitude_30, again], PROMPT, SPEC)
    assert [r.label for r in comparison.runs] == ["dense", "magnitude 30%", "magnitude 30% #2"]
    assert comparison.variants[0].text == comparison.variants[1].text  # same spec, same weights


def test_numbered_and_prune_spec_labels():
    assert numbered("wanda 50%", []) == "wanda 50%"
    assert numbered("wanda 50%", ["wanda 50%", "wanda 50% #2"]) == "wanda 50% #3"
    assert PruneSpec("wanda", 0.55).label == "wanda 55%"
    assert PruneSpec("wanda", 0.505).label == "wanda 50.5%"  # two sparsities, two labels
    assert PruneSpec("sparsegpt", 0.5, "2:4").label == "sparsegpt 2:4"
    assert PruneSpec("gated_sink_wanda", 0.5, sink=SinkSpec(tau=0.05)).label == "gated_sink_wanda 50%, tau=0.05"
