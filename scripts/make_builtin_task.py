"""Build the built-in lm-eval task ``sinkscope_nextline`` from the held-out evaluation text.

    python scripts/make_builtin_task.py [--docs 400] [--seed 0]

Source: ``sap_core/assets/text/evaluation.txt`` (*Hamlet* and *The Tempest*), which no training or
calibration window saw (``sap_core/assets/text/README.md``). Each document: a spoken line of a play in the middle of a
speech (the line before it is spoken text too) and four passages of ``CONTEXT`` lines, one of them the lines
just before it and three the lines before other such lines of the same play at least ``FAR`` lines away;
which passage does the line continue? Every choice scores the same line (lm-eval's multiple-input form, as
WinoGrande), so how likely the line is on its own cancels and only its fit to the passage counts (with four
different lines as the choices, a 3.4M-parameter model picks by each line's own likelihood: tiny-ar scored
22.8 % ± 2.1 % on such a version, chance). Chance is 25 %. Targets are spread evenly over both plays. Writes
``sap_core/assets/tasks/sinkscope_nextline/nextline.jsonl`` (``passages``, ``line``, ``label``).
"""

from __future__ import annotations

import argparse
import json
import random
import re

from sap_core import ASSETS

TEXT = ASSETS / "text" / "evaluation.txt"
OUT = ASSETS / "tasks" / "sinkscope_nextline" / "nextline.jsonl"
CONTEXT = 4  # non-blank lines of context
FAR = 300  # the other passages end at least this many lines away
MIN_CHARS = 24  # a scored line has at least this many characters
SPEAKER = re.compile(r"^[A-Z][A-Za-z ]{0,24}\.$")  # "Ham.", "First Clown."


def spoken(line: str) -> bool:
    """A line of spoken text: not blank, not a speaker tag, a stage direction or a heading."""
    s = line.strip()
    return (
        bool(s)
        and not SPEAKER.match(s)
        and not s.startswith("[")
        and not s.isupper()
        and not s.startswith(("Scene ", "SCENE", "ACT "))
    )


def plays(text: str) -> list[list[str]]:
    """The evaluation text's plays (The Tempest starts at its title), each as its non-blank lines from its
    first act on (the list of persons before it is not dialogue)."""
    lines = [ln.rstrip() for ln in text.splitlines()]
    cut = next(i for i, ln in enumerate(lines) if ln.strip() == "THE TEMPEST")
    out = []
    for part in (lines[:cut], lines[cut:]):
        part = [ln for ln in part if ln.strip()]
        out.append(part[next(i for i, ln in enumerate(part) if ln.strip() in ("ACT I.", "ACT 1")) :])
    return out


def documents(play: list[str], n: int, rng: random.Random) -> list[dict]:
    """``n`` documents, their lines spread evenly over ``play``."""
    ok = [i for i in range(CONTEXT, len(play)) if spoken(play[i]) and spoken(play[i - 1]) and len(play[i]) >= MIN_CHARS]
    picks = [ok[round(j * (len(ok) - 1) / max(1, n - 1))] for j in range(n)]
    docs = []
    for i in picks:
        far = [j for j in ok if abs(j - i) >= FAR]
        label = rng.randrange(4)
        ends = rng.sample(far, 3)
        ends.insert(label, i)
        passages = ["\n".join(play[j - CONTEXT : j]) for j in ends]
        docs.append({"passages": passages, "line": play[i], "label": label})
    return docs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--docs", type=int, default=400, help="documents in all, split evenly over the two plays (default 400)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    docs = [d for play in plays(TEXT.read_text(encoding="utf-8")) for d in documents(play, args.docs // 2, rng)]
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    print(f"wrote {len(docs)} documents to {OUT}")


if __name__ == "__main__":
    main()
