"""The AR vs DLM page (issue 13), driven by AppTest: its numbers are the Sink stability page's, and the
across-prompts panel runs for real."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from conftest import SCREENSHOTS, generate_in_browser, idle, needs_chromium, no_streamlit_exception
from streamlit.testing.v1 import AppTest

from sap_core.sink_report import analyze
from sap_core.sinks import SinkSpec

pytestmark = pytest.mark.slow  # the whole app through AppTest (pyproject.toml)

APP = str(Path(__file__).resolve().parents[1] / "app.py")
PAGE = "pages/ar_vs_dlm.py"


def texts(elements) -> list[str]:
    return [str(e.value) for e in elements]


def app_with_generation(kind: int = 0) -> AppTest:
    from app_common import MODEL_KINDS

    at = AppTest.from_file(APP, default_timeout=300)
    at.session_state["model_kind"] = MODEL_KINDS[kind]
    at.run()
    assert not at.exception
    at.switch_page("pages/explorer.py").run()
    form = {n.label: n for n in at.number_input}
    form["Generation length"].set_value(16)
    if "Steps" in form and not form["Steps"].disabled:  # a causal model decodes one token per step
        form["Steps"].set_value(16)
    at.button[0].click().run()  # "Generate"
    assert not at.exception and not at.error, texts(at.error)
    return at


def button(at: AppTest, label: str):
    (found,) = [b for b in at.button if b.label == label]
    return found


def test_other_model_side_by_side_equals_the_sink_stability_numbers():
    at = app_with_generation()
    at.switch_page(PAGE).run()
    assert not at.exception and not at.error
    assert at.text_input(key="other_model").value == "tiny-ar"
    assert at.radio(key="ar_view").value == "raw"
    button(at, "Run the other model on this prompt").click().run()
    assert not at.exception and not at.error, texts(at.error)
    dlm_traj, ar_traj = at.session_state["trajectory"], at.session_state["other_trajectory"]
    assert ar_traj.causal and not dlm_traj.causal and ar_traj.prompt == dlm_traj.prompt
    spec = at.session_state["sink_spec"] if "sink_spec" in at.session_state else SinkSpec(tau=0.05)
    ar, dlm = analyze(ar_traj, spec), analyze(dlm_traj, spec)  # what each model's Sink stability page shows
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["AR: Var(dominant position)"] == f"{ar.aggregate.dominant_var:.1f} tok²"
    assert metrics["DLM: Var(dominant position)"] == f"{dlm.aggregate.dominant_var:.1f} tok²"
    assert metrics["DLM: distinct dominant positions"] == str(len(set(dlm.dominant.tolist())))
    table = at.dataframe[0].value
    assert table.loc[0, "Layer"] == "all"
    assert table.loc[0, "AR: Var(dominant position) (tokens²)"] == pytest.approx(ar.aggregate.dominant_var)
    assert table.loc[0, "DLM: Top-k mass share"] == pytest.approx(dlm.aggregate.top_k_share)
    for i, layer in enumerate(dlm.per_layer):
        assert table.loc[i + 1, "DLM: Var(dominant position) (tokens²)"] == pytest.approx(layer.dominant_var)
    assert len(at.get("plotly_chart")) == 2

    # a normalised view is an option, explained, and changes the AR numbers
    at.radio(key="ar_view").set_value("expected").run()
    assert not at.exception
    assert any("Distorts:" in c for c in texts(at.caption))
    expected_ar = analyze(ar_traj, SinkSpec(**{**spec.to_dict(), "normalize": "expected"}))
    assert at.dataframe[0].value.loc[0, "AR: Var(dominant position) (tokens²)"] == pytest.approx(
        expected_ar.aggregate.dominant_var
    )


def test_across_prompts_panel_runs_and_plots_error_bars():
    at = app_with_generation()
    at.switch_page(PAGE).run()
    form = {n.label: n for n in at.number_input}
    form["Prompts"].set_value(2)
    form["Prompt length (tokens)"].set_value(6)
    button(at, "Run across prompts").click().run()
    assert not at.exception and not at.error, texts(at.error)
    stats = at.session_state["sinkstats"]
    assert stats.n_prompts == 2 and stats.labels == ("tiny-dlm", "tiny-ar") and stats.decode.gen_length == 16
    table = at.dataframe[0].value
    assert list(table.columns[:4]) == ["Statistic", "tiny-dlm", "tiny-ar", "DLM − AR"]
    summary = stats.summary()
    row = summary[(summary["layer"] == -1) & (summary["statistic"] == "dominant_var") & (summary["group"] == "tiny-dlm")].iloc[0]
    assert table.loc[0, "tiny-dlm"] == f"{row['mean']:.3g} ± {row['se']:.2g}"
    figure = at.get("plotly_chart")[-1].proto.spec
    assert "error_y" in figure and "standard error" in figure
    assert len(at.get("download_button")) == 2


def test_other_model_defaults_to_the_dlm_when_an_ar_is_active_and_refuses_the_same_kind():
    at = app_with_generation(kind=1)  # the built-in AR twin
    at.switch_page(PAGE).run()
    assert not at.exception
    assert at.text_input(key="other_model").value == "tiny-dlm"
    at.text_input(key="other_model").set_value("tiny-ar").run()
    button(at, "Run the other model on this prompt").click().run()
    assert not at.exception
    assert any("pick a model of the other kind" in e for e in texts(at.error))


@needs_chromium
def test_ar_vs_dlm_in_a_browser(app_url, page):
    """The page as a user sees it: side-by-side trajectories and the across-prompts error bars (screenshots)."""
    from playwright.sync_api import expect

    generate_in_browser(page, app_url, 32)
    page.locator("[data-testid='stSidebarNav']").get_by_role("link", name="AR vs DLM", exact=True).click()
    page.get_by_role("button", name="Run the other model on this prompt").click()
    expect(page.get_by_text("Sink trajectories, same axes and colour range", exact=False)).to_be_visible()
    page.shot("side-by-side")
    # Cancel (the first: the ablation section below has its own): disabled while idle; enabled while a long run
    # (512 prompts) goes, and it stops that run
    expect(page.get_by_role("button", name="Cancel").first).to_be_disabled()
    # no form on this page: a typed value commits on Enter and reruns (the cost follows it); a click sent while
    # that rerun runs can be lost, so wait for it as a user waits for the cost line
    prompts = page.get_by_role("spinbutton", name="Prompts")
    prompts.fill("512")
    prompts.press("Enter")
    expect(page.get_by_text("Cost: 512 prompts", exact=False)).to_be_visible()
    idle(page)
    page.get_by_role("button", name="Run across prompts").click()
    expect(page.get_by_text("Across prompts: ", exact=False)).to_be_visible()  # the progress bar: it runs
    page.get_by_role("button", name="Cancel").first.click()
    expect(page.get_by_text("Across-prompts run cancelled", exact=False)).to_be_visible()
    expect(page.get_by_role("button", name="Cancel").first).to_be_disabled()
    expect(page.get_by_text("Across 512 prompts", exact=False)).to_have_count(0)  # no result kept
    prompts.fill("4")
    prompts.press("Enter")
    expect(page.get_by_text("Cost: 4 prompts", exact=False)).to_be_visible()
    idle(page)
    page.get_by_role("button", name="Run across prompts").click()
    expect(page.get_by_text("Across 4 prompts: mean ± 1 standard error")).to_be_visible()
    time.sleep(1.5)  # let plotly finish drawing
    page.shot("ar-vs-dlm")
    charts = page.locator("[data-testid='stPlotlyChart']")
    assert charts.count() == 3
    for i, name in enumerate(("trajectories", "per-layer", "across-prompts")):
        charts.nth(i).scroll_into_view_if_needed()
        charts.nth(i).screenshot(path=str(SCREENSHOTS / f"test_ar_vs_dlm_in_a_browser-{name}.png"))
    no_streamlit_exception(page)
