"""Writing a user's files without ever losing one: output-path checks made before any work, and
atomic replacement of files and whole directories (write a temporary sibling, fsync, rename).

* :func:`check_output_file` / :func:`check_output_dir`: refuse, with an :class:`OutputPathError`, a path
  that cannot receive the output (a directory where a file goes, a file where a directory goes, a parent
  that is a file or is not writable), before a job starts.
* :func:`atomic_write` (a file) and :func:`atomic_directory` (a directory): the new content is written to a
  hidden sibling (same filesystem), flushed to disk, then renamed over the target. A crash at any moment
  leaves the old content or the new one, never a mix or a truncated file.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from sap_core.errors import OutputPathError

PathLike = str | Path


def _existing_parent(path: Path) -> Path:
    parent = path.parent
    while not parent.exists():
        if parent == parent.parent:
            break
        parent = parent.parent
    return parent


def _check_parent(path: Path, what: str) -> None:
    parent = _existing_parent(path)
    if not parent.is_dir():
        raise OutputPathError(f"{what} '{path}': '{parent}' is a file, not a directory; choose another place.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputPathError(f"{what} '{path}': '{parent}' is not writable; choose a directory you can write to.")


def check_output_file(path: PathLike, what: str = "Output") -> Path:
    """``path`` can receive a file (a new one, or a file to replace); else :class:`OutputPathError`."""
    path = Path(path).expanduser()
    if str(path).strip() in ("", "."):
        raise OutputPathError(f"{what}: give a file name.")
    if path.is_dir():
        raise OutputPathError(f"{what} '{path}' is a directory; give a file name (e.g. '{path / 'out'}').")
    if path.exists() and not os.access(path, os.W_OK):
        raise OutputPathError(f"{what} '{path}' exists and is not writable; choose another file.")
    _check_parent(path, what)
    return path


def check_output_dir(path: PathLike, what: str = "Output directory") -> Path:
    """``path`` can be (or become) a directory we write into; else :class:`OutputPathError`."""
    path = Path(path).expanduser()
    if str(path).strip() in ("", "."):
        raise OutputPathError(f"{what}: give a directory name.")
    if path.exists() and not path.is_dir():
        raise OutputPathError(f"{what} '{path}' is a file; give a directory.")
    if path.is_dir() and not os.access(path, os.W_OK | os.X_OK):
        raise OutputPathError(f"{what} '{path}' is not writable; choose a directory you can write to.")
    _check_parent(path, what)
    return path


def fsync_tree(root: Path) -> None:
    """Flush every file under ``root`` and the directories themselves to disk."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some filesystems do not open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    AT_FDCWD, RENAME_EXCHANGE = -100, 2
    return renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0


def atomic_write(path: PathLike, write: Callable[[Path], None], suffix: str = "") -> Path:
    """Write a file by ``write(tmp_path)`` into a hidden sibling, fsync it, and rename it over ``path``.

    ``suffix`` is given to the temporary name for writers that choose a format by extension."""
    path = check_output_file(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp" + suffix)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the mode a plain open() would
        fd = os.open(tmp_path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp_path, path)
        _fsync_dir(path.parent)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()
    return path


def atomic_write_text(path: PathLike, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda p: p.write_bytes(data))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_directory(target: PathLike) -> Iterator[Path]:
    """``with atomic_directory(dir) as tmp: <write files into tmp>``: on success ``tmp`` (a hidden
    sibling of ``dir``) is fsynced and renamed to ``dir``; an existing ``dir`` is swapped with it in one
    atomic step (``renameat2``), or, where that is unsupported, moved aside and deleted only once the new
    one is in place. On any error ``tmp`` is removed and ``dir`` is untouched.

    The caller decides whether replacing ``dir`` is allowed (see ``PrunedVariant.save``)."""
    target = Path(target).expanduser()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        yield tmp
        fsync_tree(tmp)
        if target.exists() and _exchange(tmp, target):  # one atomic step: tmp now holds the old directory
            _fsync_dir(target.parent)
            return
        old = None
        if target.exists():  # no renameat2: the old directory stays whole under .<name>.old-* until the new one is in place
            old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old-"))
            os.rmdir(old)
            os.rename(target, old)
        os.rename(tmp, target)
        _fsync_dir(target.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
