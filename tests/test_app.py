"""Every page of the Streamlit app, driven by AppTest on the built-in DLM: happy paths, bad input, isolation."""

from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

pytestmark = pytest.mark.slow  # the whole app through AppTest (pyproject.toml)

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
    assert any("ROMEO" in i and "16 tokens in 16 steps" in i for i in texts(at.info))  # which generation is re-scored
    assert any("Independent of the sliders" in c for c in texts(at.caption))
    assert [m.label for m in at.metric][0] == "Dominant-sink variance"
    heads = next(d.value for d in at.dataframe if "head" in d.value.columns)  # the heads ranked by sink score
    assert heads["rank"].tolist() == list(range(1, len(heads) + 1)) and heads["score"].is_monotonic_decreasing
    sliders = {s.label: s for s in at.slider}
    assert sliders["ε (leave-one-out margin)"].disabled and not sliders["k (std multiples)"].disabled
    positions = at.dataframe[0].value
    assert "token_text" in positions.columns and positions["token_text"].iloc[0] != ""
    sliders["tau (variance threshold)"].set_value(0.25).run()  # above every score variance: no sink is unstable
    assert int(at.metric[1].value) == 0 and at.session_state["sink_spec"].tau == 0.25
    {s.label: s for s in at.slider}["tau (variance threshold)"].set_value(0.0).run()  # tau = 0: every sink is unstable
    assert int(at.metric[2].value) == 0 and int(at.metric[1].value) > 0
    assert at.session_state["sink_spec"].tau == 0.0
    at.selectbox[0].set_value("leave_one_out").run()
    sliders = {s.label: s for s in at.slider}
    assert not sliders["ε (leave-one-out margin)"].disabled and sliders["alpha (sharpness)"].disabled
    assert at.session_state["sink_spec"].rule == "leave_one_out" and not at.exception
    bars = at.get("plotly_chart")[1].proto.spec
    assert '"range":[-0.5,' in bars.replace(" ", "")  # the per-position figure's fixed x range
    assert len(at.get("download_button")) >= 2


def test_sink_settings_default_to_the_core_default_before_the_stability_page():
    from sap_core.sinks import SinkSpec

    at = new_app()
    at.switch_page("pages/compare.py").run()
    assert "sink_spec" not in at.session_state
    tau = SinkSpec().tau
    assert any(f"tau = {tau:g})" in c for c in texts(at.caption))


def test_landing_page_links_every_step_and_checks_memory(tmp_path):
    at = new_app()
    links = at.get("page_link")
    # every page in the story's order, this page itself, then the guided start's "next" link
    assert [l.proto.page for l in links] == ["explorer", "stability", "ar_vs_dlm", "prune", "tau", "compare", "", "explorer"]
    assert any("fits in the available RAM" in c for c in texts(at.caption))
    at.number_input[0].set_value(1024).run()  # past the built-in model's 512 positions
    assert any("maximum sequence length (512)" in w for w in texts(at.warning))
    totals = at.table[1].value
    assert "total: a generation with capture" in totals.index


def test_model_page_shows_the_pruning_record_of_a_saved_variant(tmp_path):
    from app_common import cached_model
    from sap_core.pruning import PruneSpec, prune

    handle = cached_model("tiny-dlm", "auto", "auto")
    prune(handle, PruneSpec("magnitude", 0.3)).save(tmp_path / "pruned", handle)
    at = new_app()
    at.session_state["model_kind"] = "Local directory"
    at.session_state["model_path"] = str(tmp_path / "pruned")
    at.run()
    assert not at.exception and not at.error
    assert "Pruning record" in texts(at.subheader)
    assert any("**magnitude 30%**" in m and "achieved sparsity 0.3" in m for m in texts(at.markdown))


def test_prune_page_makes_a_variant_and_leaves_the_dense_model_alone():
    at = new_app()
    fingerprint = dense_fingerprint()
    at.switch_page("pages/prune.py").run()
    cancel = [b for b in at.button if b.label == "Cancel"][0]
    assert cancel.disabled  # nothing runs
    at.selectbox[0].set_value("wanda").run()
    assert any("**wanda**" in m and "Wanda" in m for m in texts(at.markdown))  # the method's description
    nums = {n.label: n for n in at.number_input}
    nums["Calibration samples"].set_value(2)
    nums["Calibration length"].set_value(32)
    at.button[0].click().run()
    assert not at.exception and not at.error, texts(at.error)
    assert any("Made **wanda 50%**" in s and "achieved sparsity 0.500" in s for s in texts(at.success))  # PruneSpec.label
    settings = at.table[0].value
    assert settings.loc["calibration", "value"] == "2 windows × 32 tokens, seed 0"
    assert "sink rule" not in settings.index and "variance threshold tau" not in settings.index  # wanda uses neither
    assert len(at.get("plotly_chart")) == 1
    assert dense_fingerprint() == fingerprint
    assert [b for b in at.button if b.label == "Cancel"][0].disabled
    at.selectbox[0].set_value("magnitude").run()
    at.button[0].click().run()
    settings = at.table[-1].value
    assert "calibration" not in settings.index and settings.loc["method", "value"] == "magnitude"
    at.button[0].click().run()  # the same spec again: no identical "#2", a pointer to the one there is
    assert any("**magnitude 50%** has exactly these settings already" in i for i in texts(at.info)), texts(at.info)
    assert not at.success
    assert [v["name"] for v in at.session_state["variants"]] == ["wanda 50%", "magnitude 50%"]
    import app_shared  # the server's stores: the rooms the prunes held became their variants, nothing is left held

    assert app_shared.stores()[1]._held == {}
    [b for b in at.button if b.label == "Show magnitude 50%"][0].click().run()
    assert at.session_state["prune_open"] == "magnitude 50%"
    other = new_app()  # another browser session sees none of this session's variants
    other.switch_page("pages/prune.py").run()
    assert any("No variants yet" in i for i in texts(other.info))


def test_prune_page_bounds_calibration_by_the_context():
    # a window longer than the model's context (which once failed only after the click) cannot be entered:
    # the input stops at the context, and sparsity starts at 0.05 (0% would be the dense model itself)
    at = new_app()
    at.switch_page("pages/prune.py").run()
    nums = {n.label: n for n in at.number_input}
    assert nums["Calibration length"].max == 512 and "context (512 tokens)" in nums["Calibration length"].help
    assert at.slider[0].min == 0.05 and "dense model itself" in at.slider[0].help


def test_compare_page_side_by_side_perplexity_and_a_one_point_sweep():
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
    assert any("Divergence step" in c for c in texts(at.caption))
    strip = at.get("plotly_chart")[0].proto.spec
    assert "Final tokens compared" in strip and '"type":"heatmap"' in strip.replace(" ", "")
    assert any(c.startswith("From the last run: the prompt “ROMEO.⏎”") for c in texts(at.caption))

    nums = {n.label: n for n in at.number_input}
    nums["Windows"].set_value(2)
    nums["Monte Carlo draws"].set_value(2)
    [b for b in at.button if b.label == "Compute perplexity"][0].click().run()
    assert not at.exception and not at.error, texts(at.error)
    table = at.dataframe[1].value
    assert list(table["model"]) == ["dense", "magnitude 50%"]
    assert table["paired"].iloc[1] and table["se_delta"].iloc[1] > 0 and table["delta_ppl"].iloc[0] == 0
    assert any("noise" in m for m in texts(at.markdown))

    ms = {m.label: m for m in at.multiselect}
    ms["Methods"].set_value(["magnitude"])
    ms["Sparsities"].set_value([0.5])
    [b for b in at.button if b.label == "Run sweep"][0].click().run()
    assert not at.exception and not at.error, texts(at.error)
    figure = at.get("plotly_chart")[-1].proto.spec
    assert "Perplexity after pruning: change against the dense model" in figure  # the Δ view, paired errors
    sweep = at.dataframe[-1].value
    assert list(sweep["method"]) == ["dense", "magnitude"] and sweep["sparsity"].iloc[1] == 0.5
    assert sweep["ppl"].iloc[0] == pytest.approx(table["ppl"].iloc[0])  # the same evaluation settings as the table
    assert len(at.get("download_button")) == 1


def test_compare_page_labels_the_earlier_result_after_a_failed_run():
    at = new_app()
    at.switch_page("pages/compare.py").run()
    nums = {n.label: n for n in at.number_input}
    nums["Generation length"].set_value(16)
    nums["Steps"].set_value(16)
    at.button[0].click().run()
    nums = {n.label: n for n in at.number_input}
    nums["Generation length"].set_value(511)  # with the prompt's tokens, past the built-in model's 512 positions
    at.button[0].click().run()
    assert at.error and not at.exception
    assert any(
        c.startswith("From an earlier run (the last run failed): the prompt") and "16 steps" in c for c in texts(at.caption)
    )


def test_compare_page_sweep_errors():
    at = new_app()
    at.switch_page("pages/compare.py").run()
    ms = {m.label: m for m in at.multiselect}
    ms["Methods"].set_value([])  # sweep with no method
    submit = [b for b in at.button if b.label == "Run sweep"][0]
    submit.click().run()
    assert any("at least one method" in e for e in texts(at.error))


def test_the_compare_sweep_uses_the_sink_settings_of_the_stability_page():
    at = generate_small(new_app())
    at.switch_page("pages/stability.py").run()
    {s.label: s for s in at.slider}["tau (variance threshold)"].set_value(0.1).run()
    at.switch_page("pages/compare.py").run()
    assert any("tau = 0.1)" in c for c in texts(at.caption))
    ms = {m.label: m for m in at.multiselect}
    ms["Methods"].set_value(["gated_sink_wanda"])
    ms["Sparsities"].set_value([0.5])
    nums = {n.label: n for n in at.number_input}
    nums["Windows"].set_value(2)
    nums["Monte Carlo draws"].set_value(2)
    [b for b in at.button if b.label == "Run sweep"][0].click().run()
    assert not at.exception and not at.error, texts(at.error)
    sweep = at.dataframe[-1].value
    assert list(sweep["label"])[1] == "gated_sink_wanda 50%, tau=0.1"
    at.switch_page("pages/stability.py").run()  # the settings survive the visit to another page
    assert {s.label: s for s in at.slider}["tau (variance threshold)"].value == 0.1


def test_compare_page_perplexity_on_the_causal_twin():
    import math

    at = new_app()
    at.switch_page("pages/compare.py")
    at.session_state["model_kind"] = "Built-in AR twin (tiny-ar)"
    at.run()
    assert any(c.startswith("Next-token perplexity") for c in texts(at.caption))
    {n.label: n for n in at.number_input}["Windows"].set_value(2)
    [b for b in at.button if b.label == "Compute perplexity"][0].click().run()
    assert not at.exception and not at.error, texts(at.error)
    table = at.dataframe[0].value
    assert list(table["model"]) == ["dense"] and math.isfinite(table["ppl"].iloc[0]) and table["ppl"].iloc[0] > 1
    assert any("Only the dense model" in m for m in texts(at.markdown))


def test_the_sidebar_names_the_model_the_host_set(monkeypatch, tmp_path):
    from app_common import MODEL_KINDS, model_kind_label

    assert [model_kind_label(k) for k in MODEL_KINDS] == list(MODEL_KINDS)  # the built-in models: as before
    monkeypatch.setenv("SINKSCOPE_MODEL", str(tmp_path / "LLaDA-8B-Instruct"))
    monkeypatch.setenv("SINKSCOPE_AR_MODEL", str(tmp_path / "Llama-3-8B") + "/")
    assert model_kind_label(MODEL_KINDS[0]) == "This server's model (LLaDA-8B-Instruct)"  # not "Built-in DLM"
    assert model_kind_label(MODEL_KINDS[1]) == "This server's AR model (Llama-3-8B)"
    assert model_kind_label(MODEL_KINDS[2]) == "Local directory"
