"""The Denoising explorer page under AppTest on the built-in models: a causal model hides the
masked-diffusion options, and after a failed run the stored result is labelled as the previous one."""

from __future__ import annotations

import pytest
from test_app import generate_small, new_app, texts

pytestmark = pytest.mark.slow  # the whole app through AppTest (pyproject.toml)


def test_causal_model_hides_the_dlm_options_and_generates():
    at = new_app()
    at.session_state["model_kind"] = "Built-in AR twin (tiny-ar)"
    at.switch_page("pages/explorer.py").run()
    labels = [n.label for n in at.number_input]
    assert "Block length" not in labels and "CFG scale" not in labels
    assert "Remasking" not in [s.label for s in at.selectbox]
    form = {n.label: n for n in at.number_input}
    form["Generation length"].set_value(12)
    at.button[0].click().run()
    assert not at.exception and not at.error, texts(at.error)
    assert any(s.startswith("12 steps in") and "causal, one token per step" in s for s in texts(at.success))


def test_a_failed_run_labels_the_stored_result_as_the_previous_run():
    at = generate_small(new_app())
    assert any("16 tokens · 16 steps, block 16" in s for s in texts(at.success))
    form = {n.label: n for n in at.number_input}
    form["Generation length"].set_value(30)  # not divisible by the block length: the run fails
    at.button[0].click().run()
    assert any("divisible by block_length" in e for e in texts(at.error))
    assert not at.success
    assert any("previous run" in w and "16 tokens" in w for w in texts(at.warning))


def test_attention_map_follows_the_view_or_the_typed_step():
    at = generate_small(new_app())
    at.number_input(key="step").set_value(7)  # what the browser view commits into its hidden step box as it steps
    recompute = next(b for b in at.button if b.label == "Recompute map")
    recompute.click().run()
    assert not at.exception and not at.error
    step, layer, head, amap = at.session_state["attention"]
    assert (step, layer, head) == (7, 0, 0) and amap.shape[0] == amap.shape[1]
    assert at.number_input(key="map_step").value == 7  # the greyed box shows the step used, not the last step
    at.toggle(key="map_follow").set_value(False).run()
    assert at.number_input(key="map_step").value == 7  # typing starts from the view's step
    at.number_input(key="map_step").set_value(3).run()
    next(b for b in at.button if b.label == "Recompute map").click().run()
    assert at.session_state["attention"][0] == 3
    assert any("Attention map: step 3" in str(c.proto) for c in at.get("plotly_chart"))


def test_lengths_are_bounded_by_the_models_context_and_an_impossible_spec_says_why():
    at = new_app()
    at.switch_page("pages/explorer.py").run()
    form = {n.label: n for n in at.number_input}
    for name in ("Generation length", "Steps", "Block length"):
        assert form[name].max == 511, name  # tiny-dlm's context (512) less a prompt token, not a fixed 2048; as Compare's
    assert "context of 512 tokens" in form["Generation length"].help
    assert any("at most 511" in c for c in texts(at.caption))
    form["Generation length"].set_value(511)  # the prompt's tokens do not fit beside 511 generated ones
    form["Steps"].set_value(64)
    at.button[0].click().run()
    assert not at.exception
    assert any("exceeds the model's max_sequence_length 512" in e for e in texts(at.error)), texts(at.error)
    assert not at.success
    form = {n.label: n for n in at.number_input}
    form["Generation length"].set_value(16)
    form["Steps"].set_value(32)  # more steps than tokens: the spec's one-line error, no traceback
    at.button[0].click().run()
    assert not at.exception
    assert any("cannot exceed gen_length" in e for e in texts(at.error)), texts(at.error)
