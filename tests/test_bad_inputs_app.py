"""Hostile input through the app (issue 12), driven by AppTest: an error message, nothing lost, the app keeps working."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest
from test_bad_inputs import hashes

from sap_core.models import BUILTIN_MODELS

pytestmark = pytest.mark.slow  # the whole app through AppTest (pyproject.toml)

APP = str(Path(__file__).resolve().parents[1] / "app.py")


def texts(elements) -> list[str]:
    return [str(e.value) for e in elements]


def test_prune_page_save_refuses_the_model_dir_and_replaces_a_variant_only_when_confirmed(tmp_path):
    at = AppTest.from_file(APP, default_timeout=300)
    at.run()
    at.switch_page("pages/prune.py").run()
    at.selectbox[0].set_value("magnitude")
    at.button[0].click().run()  # Prune
    assert not at.exception and not at.error, texts(at.error)
    name = "magnitude 50%"
    model_dir = BUILTIN_MODELS["tiny-dlm"]
    before = hashes(model_dir)

    at.text_input(key=f"dir_{name}").set_value(str(model_dir)).run()
    at.button(key=f"save_{name}").click().run()
    assert not at.exception and any("loaded model's directory" in e for e in texts(at.error))
    assert hashes(model_dir) == before

    target = tmp_path / "variant"
    at.text_input(key=f"dir_{name}").set_value(str(target)).run()
    assert any(str(target.resolve()) in c for c in texts(at.caption))  # the absolute path is shown
    at.button(key=f"save_{name}").click().run()
    assert not at.error and any("Saved to" in s for s in texts(at.success))
    assert json.loads((target / "pruning.json").read_text())["achieved_sparsity"] > 0.49
    saved = hashes(target)

    at.button(key=f"save_{name}").click().run()  # again, without confirmation
    assert any("overwrite" in e for e in texts(at.error)) and hashes(target) == saved
    at.checkbox(key=f"overwrite_{name}").check().run()
    at.button(key=f"save_{name}").click().run()
    assert not at.error and any("Saved to" in s for s in texts(at.success))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]

    user = tmp_path / "users-files"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    at.text_input(key=f"dir_{name}").set_value(str(user)).run()
    at.button(key=f"save_{name}").click().run()
    assert any("not a SinkScope variant" in e for e in texts(at.error)) and (user / "notes.txt").read_text() == "mine"
    at.switch_page("pages/model.py").run()  # the app keeps working
    assert not at.exception and not at.error


def test_a_corrupt_model_directory_is_a_message_and_the_app_keeps_working(tmp_path):
    broken = Path(shutil.copytree(BUILTIN_MODELS["tiny-dlm"], tmp_path / "model"))
    (broken / "model.safetensors").write_bytes((broken / "model.safetensors").read_bytes()[:1000])
    before = hashes(broken)
    at = AppTest.from_file(APP, default_timeout=300)
    at.run()
    at.session_state["model_kind"] = "Local directory"
    at.session_state["model_path"] = str(broken)
    at.run()
    assert not at.exception
    assert any("truncated" in e and "model.safetensors" in e for e in texts(at.error))
    assert hashes(broken) == before
    at.session_state["model_kind"] = "Built-in DLM (tiny-dlm)"
    at.run()
    assert not at.exception and not at.error


@pytest.mark.parametrize(
    "record,warned,shown",
    [
        ([1, 2, 3], "holds a JSON list", None),
        (
            {"label": "wanda 50%", "pattern": "2:4", "achieved_sparsity": "n/a", "sparsity": 0.5},
            "achieved_sparsity is 'n/a'",
            "wanda 50%",
        ),
        ("[" * 100_000 + "]" * 100_000, "cannot be read", None),
    ],
)
def test_the_model_page_shows_what_a_damaged_pruning_record_holds(tmp_path, record, warned, shown):
    """Issue 21: a variant whose pruning.json is a list, or holds "n/a" where a number belongs, is a warning."""
    variant = Path(shutil.copytree(BUILTIN_MODELS["tiny-dlm"], tmp_path / "variant"))
    (variant / "pruning.json").write_text(record if isinstance(record, str) else json.dumps(record))
    at = AppTest.from_file(APP, default_timeout=300)
    at.run()
    at.session_state["model_kind"] = "Local directory"
    at.session_state["model_path"] = str(variant)
    at.run()
    assert not at.exception and not at.error
    assert any(warned in w for w in texts(at.warning)), texts(at.warning)
    if shown:
        assert any(shown in m and "pattern 2:4" in m for m in texts(at.markdown))
    assert any("Memory estimate" in h for h in texts(at.subheader))  # the rest of the page is there
