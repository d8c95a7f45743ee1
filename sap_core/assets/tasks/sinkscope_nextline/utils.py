"""Loads the task's local data (no hub): ``nextline.jsonl`` beside this file, made by scripts/make_builtin_task.py."""

import json
from pathlib import Path

DATA = Path(__file__).with_name("nextline.jsonl")


def load(**_metadata):
    import datasets

    if not DATA.is_file():
        from sap_core.errors import SapError

        raise SapError(
            f"The data of the task 'sinkscope_nextline' is missing ({DATA}); make it with "
            "'python scripts/make_builtin_task.py' or reinstall SinkScope from a full clone."
        )
    rows = [json.loads(line) for line in DATA.read_text(encoding="utf-8").splitlines() if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
