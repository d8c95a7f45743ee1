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
