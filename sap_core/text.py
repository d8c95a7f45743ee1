"""Text as a model reads it: token ids of a text (evaluation and calibration windows) and the model's length limit;
and a prompt as the app shows it (:func:`shown_prompt`).

Below :mod:`sap_core.evaluate` and :mod:`sap_core.pruning`, which both cut texts into windows of a length
the model must accept.
"""

from __future__ import annotations

import functools

from sap_core.errors import SapError
from sap_core.models import ModelHandle


@functools.lru_cache(maxsize=4)
def text_ids(tokenizer, text: str) -> tuple[int, ...]:
    """Token ids of ``text`` without special tokens (evaluation windows, calibration windows). Cached (the
    last few tokenizer and text pairs): a sweep scores and calibrates on the same texts some 30 times each,
    and tokenizing the shipped evaluation text is about a tenth of a tiny-dlm evaluation (``bench/eval_cost.py``:
    first call against in a sweep)."""
    try:  # verbose=False: the text is cut into windows, never fed whole; no "sequence too long" warning
        return tuple(tokenizer.encode(text, add_special_tokens=False, verbose=False))
    except TypeError:  # a tokenizer without the verbose flag
        return tuple(tokenizer.encode(text, add_special_tokens=False))


def check_length(handle: ModelHandle, length: int, what: str, error=SapError) -> None:
    """Raise ``error`` when ``length`` tokens exceed the model's context (:attr:`ModelHandle.max_length`)."""
    limit = handle.max_length
    if limit is not None and length > limit:
        raise error(f"{what} is {length} tokens, more than the model's context of {limit} tokens; lower it to {limit} or less.")


def shown_prompt(text: str, limit: int = 60) -> str:
    """A prompt as every page shows it: in curly quotes, each newline as ``⏎`` (spaces kept), cut to ``limit``
    characters with ``…``: ``'ROMEO.\\n'`` shows as ``“ROMEO.⏎”``."""
    cut = text if len(text) <= limit else text[: limit - 1] + "…"
    return "“" + cut.replace("\n", "⏎") + "”"
