"""The Compare page's Benchmarks section through AppTest: real scoring of dense + a variant, cost, bad input."""

from __future__ import annotations

import pytest
from test_app import dense_fingerprint, new_app, texts

pytestmark = pytest.mark.slow


def test_benchmarks_section_scores_dense_and_a_variant():
    at = new_app()
    at.switch_page("pages/prune.py").run()
    at.selectbox[0].set_value("magnitude")
    at.button[0].click().run()
    before = dense_fingerprint()
    at.switch_page("pages/compare.py").run()
    assert {t.label: t for t in at.text_input}["Tasks"].value == "sinkscope_nextline"
    nums = {n.label: n for n in at.number_input}
    nums["Documents"].set_value(2).run()
    nums = {n.label: n for n in at.number_input}
    nums["mc_num"].set_value(4).run()
    cost = [c for c in texts(at.caption) if c.startswith("Cost:")]
    assert cost and "8 requests × 2 model(s) × mc_num 4 / batch 4 = 16 forward passes" in cost[0]
    [b for b in at.button if b.label == "Score benchmarks"][0].click().run()
    assert not at.exception and not at.error, texts(at.error)
    table = at.dataframe[-1].value
    assert list(table["model"]) == ["dense", "magnitude 50%"] and list(table["n"]) == [2, 2]
    assert "±" in table.iloc[0, 3]
    assert any(c.startswith("From the last run: sinkscope_nextline, 2 documents, mc_num 4") for c in texts(at.caption))
    assert any(b.label == "Download benchmarks (CSV)" for b in at.get("download_button"))
    assert [b for b in at.button if b.label == "Cancel"][0].disabled
    assert dense_fingerprint() == before


def test_benchmarks_section_bad_task_and_confirmation():
    at = new_app()
    at.switch_page("pages/compare.py").run()
    {t.label: t for t in at.text_input}["Tasks"].set_value("no_such_task").run()
    assert any("Unknown lm-eval task 'no_such_task'" in e for e in texts(at.error))
    assert [b for b in at.button if b.label == "Score benchmarks"][0].disabled
    {t.label: t for t in at.text_input}["Tasks"].set_value("sinkscope_nextline").run()
    nums = {n.label: n for n in at.number_input}
    nums["mc_num"].set_value(1024).run()
    nums = {n.label: n for n in at.number_input}
    nums["Documents"].set_value(400).run()
    assert [b for b in at.button if b.label == "Score benchmarks"][0].disabled
    box = [c for c in at.checkbox if c.label.startswith("Run it anyway")][0]
    box.check().run()
    assert not [b for b in at.button if b.label == "Score benchmarks"][0].disabled
