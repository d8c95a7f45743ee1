"""The README and docs/ stay true to the code: every command the README shows parses with today's command line,
every file it names exists, the GIF it opens with is small, and every relative link (and its #anchor) resolves."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from sap_core.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def fenced_blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


def readme_commands() -> list[list[str]]:
    """The ``python -m sap_core ...`` lines of the README's bash blocks, continuation lines joined, comments dropped."""
    commands = []
    for block in fenced_blocks(README.read_text(encoding="utf-8"), "bash"):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words[:3] == ["python", "-m", "sap_core"]:
                commands.append(words[3:])
    return commands


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped (not - or _), spaces to hyphens."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    for heading in re.findall(r"^#{1,6} (.+)$", text, flags=re.M):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def test_readme_shows_the_ci_commands_as_written():
    text = README.read_text(encoding="utf-8")
    assert "pip install -r requirements.txt && streamlit run app.py" in fenced_blocks(text, "bash")[0]
    assert "bash .ci/run" in fenced_blocks(text, "bash")[1]


@pytest.mark.parametrize("argv", readme_commands(), ids=lambda a: " ".join(a)[:60])
def test_readme_command_parses(argv):
    args = build_parser().parse_args(argv)  # an unknown subcommand, flag or choice raises UsageError
    assert callable(args.func)


def test_readme_shows_commands():
    assert {argv[0] for argv in readme_commands()} >= {"generate", "analyze", "animate", "prune", "evaluate", "sweep"}


def test_readme_python_imports():
    """The names the README's Python example imports exist (running it is the explorer's and pruning's tests' job)."""
    (block,) = fenced_blocks(README.read_text(encoding="utf-8"), "python")
    imports = [line for line in block.splitlines() if line.startswith(("from ", "import "))]
    assert imports
    exec("\n".join(imports), {})


def test_readme_scripts_exist():
    names = set(re.findall(r"(?:scripts|bench)/\w+\.py", README.read_text(encoding="utf-8")))
    assert names, "the README names no script"
    assert [n for n in sorted(names) if not (ROOT / n).is_file()] == []


def test_readme_gif_is_small():
    gif = ROOT / "docs" / "explorer.gif"
    assert "](docs/explorer.gif)" in README.read_text(encoding="utf-8")
    assert gif.read_bytes()[:6] == b"GIF89a"
    assert gif.stat().st_size < 2_000_000


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_resolve(page):
    broken = []
    for target in LINK.findall(page.read_text(encoding="utf-8")):
        if re.match(r"[a-z]+:", target):  # http(s):, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(target)
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(target)
    assert broken == []
