"""A saved variant in the app (issue 30): prune, save, load it back on the Prune page, find it in the explorer's
selector, and the Sink stability page re-scores the variant's run the explorer shows."""

from __future__ import annotations

import pytest
from test_app import generate_small, new_app, texts

pytestmark = pytest.mark.slow  # the whole app through AppTest (pyproject.toml)


def test_a_saved_variant_loads_back_and_the_stability_page_rescores_its_run(tmp_path):
    at = new_app()
    at.switch_page("pages/prune.py").run()
    at.selectbox[0].set_value("magnitude").run()
    at.button[0].click().run()  # Prune
    assert not at.exception and not at.error, texts(at.error)
    name = at.session_state["variants"][0]["name"]
    at.text_input(key=f"dir_{name}").set_value(str(tmp_path / "saved")).run()
    next(b for b in at.button if b.key == f"save_{name}").click().run()
    assert any("Saved to" in s for s in texts(at.success)), texts(at.error)

    other = new_app()  # a fresh session loads it back
    other.switch_page("pages/prune.py").run()
    other.text_input(key="load_variant_dir").set_value(str(tmp_path / "saved")).run()
    next(b for b in other.button if b.key == "load_variant").click().run()
    assert not other.exception and not other.error, texts(other.error)
    loaded = other.session_state["variants"][0]["name"]
    assert loaded == "magnitude 50% (saved)"
    assert any(f"Loaded **{loaded}**" in s for s in texts(other.success))
    other.text_input(key="load_variant_dir").set_value(str(tmp_path)).run()  # not a variant: one line
    next(b for b in other.button if b.key == "load_variant").click().run()
    assert any("is not a saved SinkScope variant" in e for e in texts(other.error))

    generate_small(other)
    assert loaded in other.selectbox(key="lab_variant").options
    other.switch_page("pages/stability.py").run()
    assert any("Re-scoring the run" in i for i in texts(other.info))  # no variant chosen: the dense run
    other.switch_page("pages/explorer.py").run()
    other.selectbox(key="lab_variant").set_value(loaded).run()
    other.radio(key="lab_shown").set_value("variant").run()
    assert not other.exception and not other.error, texts(other.error)
    other.switch_page("pages/stability.py").run()
    assert not other.exception and not other.error, texts(other.error)
    assert any(f"Re-scoring the variant **{loaded}** (replayed) of the run" in i for i in texts(other.info)), texts(other.info)


def test_shared_mode_lists_the_server_named_saves_in_the_explorers_selector(tmp_path, monkeypatch):
    import app_shared
    from app_common import cached_model
    from sap_core.pruning import PruneSpec, prune
    from sap_core.serving import ServerSettings

    (tmp_path / "models").mkdir()
    (tmp_path / "runs").mkdir()
    server = ServerSettings(shared=True, models_dir=tmp_path / "models", runs_dir=tmp_path / "runs")
    handle = cached_model("tiny-dlm", "auto", "auto")
    monkeypatch.setenv("SINKSCOPE_SHARED", "1")
    monkeypatch.setenv("SINKSCOPE_MODELS_DIR", str(tmp_path / "models"))
    monkeypatch.setenv("SINKSCOPE_RUNS_DIR", str(tmp_path / "runs"))
    app_shared.settings.clear()
    app_shared.stores.clear()
    try:
        at = generate_small(new_app())
        variant = prune(handle, PruneSpec("magnitude", 0.3))
        saved = server.saved_variant_dir(at.session_state["sid"], "magnitude 30%")  # this session's save
        variant.save(saved, handle)
        theirs = server.saved_variant_dir("another student", "magnitude 30%")  # never offered to this session
        variant.save(theirs, handle)
        at.run()
        selector = at.selectbox(key="lab_variant")
        assert f"saved: {saved.name}" in selector.options  # the server-named save, no server path
        assert f"saved: {theirs.name}" not in selector.options and str(theirs) not in selector.options
        assert not [t for t in at.text_input if t.label == "Load a saved variant (directory)"]
        selector.set_value(str(saved)).run()
        assert not at.exception and not at.error, texts(at.error)
        assert [v["name"] for v in at.session_state["variants"]] == [f"magnitude 30% ({saved.name})"]
    finally:
        app_shared.settings.clear()
        app_shared.stores.clear()
