"""The house has one direction (issue 27): the layer and cycle contracts (`lint-imports`, pyproject.toml) and the
rule that an import inside a function is only for a heavy or optional dependency, with its reason beside it."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REASON = "# lazy:"


def _modules() -> list[Path]:
    """sap_core's modules (its assets' files are data that lm-eval loads by path, not modules of the package)."""
    return [p for p in sorted((ROOT / "sap_core").rglob("*.py")) if "assets" not in p.relative_to(ROOT / "sap_core").parts]


def _function_imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    found.append((node.lineno, ast.get_source_segment(path.read_text(), node) or ""))
    return found


def _has_reason(lines: list[str], lineno: int) -> bool:
    """A ``# lazy: <reason>`` on the import's line, or on the comment line just above the block of imports
    (blank lines and other imports between them) that the import belongs to."""
    if REASON in lines[lineno - 1]:
        return True
    i = lineno - 2
    while i >= 0:
        text = lines[i].strip()
        if text.startswith("#"):
            return text.startswith(REASON)
        if text and not text.startswith(("import ", "from ", ")")) and not text.endswith(","):
            return False
        i -= 1
    return False


def test_every_import_inside_a_function_says_why():
    missing = []
    for path in _modules():
        lines = path.read_text().splitlines()
        for lineno, text in _function_imports(path):
            if not _has_reason(lines, lineno):
                missing.append(f"{path.relative_to(ROOT)}:{lineno}: {text.splitlines()[0]}")
    assert not missing, "imports inside functions without a '# lazy: <reason>' comment:\n" + "\n".join(missing)


# The entry points that must start without torch: the CLI (``--help``) and the shared server's start-up checks
# (``sinkscope app`` refuses bad settings before Streamlit or torch start).
LIGHT_ENTRIES = ("cli", "serving.py")


def test_a_function_import_of_sap_core_is_made_only_by_the_light_entry_points():
    """Below the entry points a sap_core module imports another at module level: an import hidden in a function
    is how the cycles of issue 27 crept in. The CLI and the server's start-up checks import lazily so that they
    start without torch."""
    hidden = []
    for path in _modules():
        if path.relative_to(ROOT / "sap_core").parts[0] in LIGHT_ENTRIES:
            continue
        for lineno, text in _function_imports(path):
            if "sap_core" in text.split("import")[0] or text.startswith("from ."):
                hidden.append(f"{path.relative_to(ROOT)}:{lineno}: {text.splitlines()[0]}")
    assert not hidden, "\n".join(hidden)


def test_lint_imports_keeps_every_contract():
    linter = shutil.which("lint-imports") or str(Path(sys.executable).parent / "lint-imports")
    out = subprocess.run([linter, "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
