"""Every page of the Streamlit app, driven by AppTest on the built-in DLM: happy paths, bad input, isolation."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from streamlit.testing.v1 import AppTest

APP = str(Path(__file__).resolve().parents[1] / "app.py")
TIMEOUT = 300


def new_app() -> AppTest:
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.run()
    assert not at.exception
    return at


def texts(elements) -> list[str]:
    return [str(e.value) for e in elements]


def generate_small(at: AppTest) -> AppTest:
    at.switch_page("pages/explorer.py").run()
    form = {n.label: n for n in at.number_input}
    form["Generation length"].set_value(16)
    form["Steps"].set_value(16)
    at.button[0].click().run()  # "Generate" (the form's submit button)
    assert not at.exception and not at.error, texts(at.error)
    return at


def dense_fingerprint() -> float:
    from app_common import cached_model
    handle = cached_model("tiny-dlm", "auto", "auto")
    return float(sum(p.double().abs().sum() for p in handle.module.parameters()))


def test_model_page_shows_the_builtin_dlm():
    at = new_app()
    assert any("tiny-dlm" in c for c in texts(at.caption))
    table = at.table[0].value
    assert table.loc["layers", "value"] == "6" and table.loc["causal", "value"] == "False"
    assert "capture record" in " ".join(at.table[1].value.index)


def test_bad_model_path_keeps_the_app_working():
    at = new_app()
    # AppTest keeps only the page in its element tree on reruns under st.navigation, so the sidebar's
    # widgets are set through their session-state keys, which is what a user's clicks change.
    at.session_state["model_kind"] = "Local directory"
    at.session_state["model_path"] = "/no/such/model"
    at.run()
    assert not at.exception
    assert any("No model at '/no/such/model'" in e for e in texts(at.error))
    assert any("built-in model" in i for i in texts(at.info))
    at.session_state["model_kind"] = "Built-in DLM (tiny-dlm)"
    at.run()
    assert not at.error and any("tiny-dlm" in c for c in texts(at.caption))


def test_explorer_generates_and_its_settings_do_not_rerun_the_model(monkeypatch):
    at = generate_small(at=new_app())
    assert any("16 steps" in s for s in texts(at.success))
    assert '"steps":16' in at.get("iframe")[0].proto.srcdoc  # the whole run, sent once to the browser view
    import sap_core.diffusion as diffusion
    calls = []
    monkeypatch.setattr(diffusion, "generate", lambda *a, **k: calls.append(1))
    at.radio[0].set_value("per-step").run()  # colour range
    assert not at.exception and calls == []
    assert '"steps":16' in at.get("iframe")[0].proto.srcdoc


def test_explorer_rejects_impossible_settings():
    at = new_app()
    at.switch_page("pages/explorer.py").run()
    form = {n.label: n for n in at.number_input}
    form["Generation length"].set_value(30)
    at.button[0].click().run()
    assert any("divisible by block_length" in e for e in texts(at.error))
    assert not at.exception


def test_stability_page_rescores_without_the_model():
    at = new_app()
    at.switch_page("pages/stability.py").run()
    assert any("Denoising explorer" in i for i in texts(at.info))  # nothing to analyse yet
    generate_small(at)
    at.switch_page("pages/stability.py").run()
    assert not at.exception and not at.error
    before = at.metric[1].value
    at.slider[3].set_value(0.0).run()  # tau = 0: every sink counts as unstable
    assert int(at.metric[2].value) == 0  # no stable sink at tau = 0
    assert len(at.get("download_button")) >= 2 and before is not None


def test_prune_page_makes_a_variant_and_leaves_the_dense_model_alone():
    at = new_app()
    fingerprint = dense_fingerprint()
    at.switch_page("pages/prune.py").run()
    at.selectbox[0].set_value("wanda")
    nums = {n.label: n for n in at.number_input}
    nums["Calibration samples"].set_value(2)
    nums["Calibration length"].set_value(32)
    at.button[0].click().run()
    assert not at.exception and not at.error, texts(at.error)
    assert any("sparsity 0.500" in s for s in texts(at.success))
    assert dense_fingerprint() == fingerprint
    other = new_app()  # another browser session sees none of this session's variants
    other.switch_page("pages/prune.py").run()
    assert any("No variants yet" in i for i in texts(other.info))


def test_prune_page_reports_bad_calibration():
    at = new_app()
    at.switch_page("pages/prune.py").run()
    at.selectbox[0].set_value("wanda")
    nums = {n.label: n for n in at.number_input}
    nums["Calibration length"].set_value(4096)
    at.button[0].click().run()
    assert at.error and not at.exception


def test_compare_page_side_by_side_and_sweep_errors():
    at = new_app()
    at.switch_page("pages/prune.py").run()
    at.selectbox[0].set_value("magnitude")
    at.button[0].click().run()
    at.switch_page("pages/compare.py").run()
    nums = {n.label: n for n in at.number_input}
    nums["Generation length"].set_value(16)
    nums["Steps"].set_value(16)
    at.button[0].click().run()  # Compare
    assert not at.exception and not at.error, texts(at.error)
    assert any("divergence step" in m for m in texts(at.markdown))
    at.multiselect[1].set_value([])  # sweep with no method
    submit = [b for b in at.button if b.label == "Run sweep"][0]
    submit.click().run()
    assert any("at least one method" in e for e in texts(at.error))
