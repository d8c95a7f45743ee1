"""Writing a user's files without ever losing one: output-path checks made before any work, and
atomic replacement of files and whole directories (write a temporary sibling, fsync, rename).

* :func:`check_output_file` / :func:`check_output_dir`: refuse, with an :class:`OutputPathError`, a path
  that cannot receive the output (a directory where a file goes, a file where a directory goes, a parent
  that is a file or is not writable, a name longer than the filesystem allows), before a job starts.
* :func:`atomic_write` (a file) and :func:`atomic_directory` (a directory): the new content is written to a
  hidden sibling (same filesystem), flushed to disk, then renamed over the target. A crash at any moment
  leaves the old content or the new one, never a mix or a truncated file.
* Special files: a device, FIFO or socket (``/dev/null``, ``/dev/stdout``, a named pipe) is written
  directly, never replaced (:func:`is_special`); a symbolic link is followed and its target replaced, as
  ``cp`` and editors do (:func:`output_target`).
* Temporaries are named ``.<name>.tmp-<pid>-XXXXXXXX`` (a hash stands for a name too long to fit), so that
  their name fits wherever the final name fits; one left by a process that no longer runs (killed with
  SIGKILL, a power cut) is removed by the next save to the same place. Ctrl-C and SIGTERM (the CLI turns
  it into an exception) are held off while a temporary is created or removed.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import hashlib
import os
import re
import shutil
import signal
import stat
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from sap_core.errors import OutputPathError

PathLike = str | Path
NAME_MAX = 255  # bytes in one file name on Linux filesystems (os.pathconf's PC_NAME_MAX where it answers)
_TEMP_TAIL = 8  # characters tempfile adds
_SUFFIX_ROOM = 16  # room kept for a writer's extension (.npz, .png) in a temporary's name


def _name_max(directory: Path) -> int:
    try:
        return int(os.pathconf(directory, "PC_NAME_MAX"))
    except (OSError, ValueError):
        return NAME_MAX


def is_special(path: PathLike) -> bool:
    """``path`` exists and is a device, FIFO or socket (followed through links), or a link into ``/proc``
    (``/dev/stdout`` → ``/proc/self/fd/1``): written directly, since renaming a file over it would replace
    the node (or a shell's redirection) with a regular file."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return False
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        return True
    text = str(path.absolute())
    return text.startswith("/proc/") or (text.startswith("/dev/") and path.is_symlink())


def output_target(path: PathLike) -> Path:
    """Where an output written to ``path`` lands: a symbolic link's (final) target, else ``path``."""
    path = Path(path).expanduser()
    if path.is_symlink() and not is_special(path):
        return Path(os.path.realpath(path))
    return path


def describe(path: Path) -> str:
    """What ``path`` is, in words (``a directory``, ``a FIFO (named pipe)``, ...)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return "missing"
    for test, words in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISREG, "a file"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return words
    return "not a regular file"


def _existing_parent(path: Path) -> Path:
    parent = path.parent
    while not os.path.exists(parent):
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


def _check_names(path: Path, what: str) -> None:
    """Every name in ``path`` fits the filesystem (checked before anything else looks at the path)."""
    limit = _name_max(_existing_parent(path))
    for part in path.parts:
        if len(os.fsencode(part)) > limit:
            raise OutputPathError(
                f"{what} '{path}': the name '{part[:40]}...' is {len(os.fsencode(part))} bytes; "
                f"this filesystem allows {limit}. Choose a shorter name."
            )


def check_output_file(path: PathLike, what: str = "Output") -> Path:
    """``path`` can receive a file (a new one, a file to replace, or a device/FIFO written directly); else
    :class:`OutputPathError`. Returns where the file lands (a link's target)."""
    path = Path(path).expanduser()
    if str(path).strip() in ("", "."):
        raise OutputPathError(f"{what}: give a file name.")
    _check_names(path, what)
    if is_special(path):
        if not os.access(path, os.W_OK):
            raise OutputPathError(f"{what} '{path}' is {describe(path)} that is not writable; choose another file.")
        return path
    path = output_target(path)
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
    _check_names(path, what)
    if path.exists() and not path.is_dir():
        raise OutputPathError(f"{what} '{path}' is {describe(path)}; give a directory.")
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

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    AT_FDCWD, RENAME_EXCHANGE = -100, 2
    return renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0


# --- temporaries ------------------------------------------------------------------------------------


def _stem(name: str, parent: Path) -> str:
    """``name`` for a temporary's name, or a hash of it where ``.<name>.tmp-<pid>-XXXXXXXX<suffix>`` would not fit."""
    longest = len(os.fsencode(f".{name}.old-{'0' * 10}-"))  # any pid + _TEMP_TAIL + _SUFFIX_ROOM
    if longest <= _name_max(parent):
        return name
    return "h" + hashlib.sha256(os.fsencode(name)).hexdigest()[:16]


def _prefix(name: str, parent: Path, kind: str) -> str:
    return f".{_stem(name, parent)}.{kind}-{os.getpid()}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def remove_stale_temporaries(target: PathLike) -> list[Path]:
    """Remove the temporaries SinkScope left beside ``target`` when a process writing it died (their
    names carry the writer's pid; only those of processes that no longer run are touched). Returns them."""
    target = Path(target)
    parent = target.parent
    if not parent.is_dir():
        return []
    stems = {_stem(target.name, parent)}
    pattern = re.compile(rf"^\.(?P<stem>.+)\.(?:tmp|old)-(?P<pid>\d+)-[A-Za-z0-9_]{{{_TEMP_TAIL}}}")
    removed = []
    for entry in parent.iterdir():
        m = pattern.match(entry.name)
        if not m or m["stem"] not in stems or int(m["pid"]) == os.getpid() or _alive(int(m["pid"])):
            continue
        with signals_held():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    entry.unlink()
        removed.append(entry)
    return removed


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back (they are delivered on exit) while a temporary is created or removed,
    so Ctrl-C cannot land between creating it and the ``finally`` that removes it.

    Ctrl-C is sent to the whole process, and the kernel may hand it to any thread (torch's workers, tqdm's
    monitor); Python then runs the handler in the main thread at its next instruction. So blocking the signal
    in the main thread alone is not enough: while the block runs, the Python handlers only note a signal, and
    it is raised again after the block. Outside the main thread, or where a handler was not set from Python,
    the signals are blocked for this thread instead."""
    names = (signal.SIGINT, signal.SIGTERM)
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = {s: signal.getsignal(s) for s in names}
    if any(h is None for h in before.values()):  # a handler Python cannot put back: block in this thread instead
        old = signal.pthread_sigmask(signal.SIG_BLOCK, set(names))
        try:
            yield
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
        return
    pending: list[int] = []
    for s in names:
        signal.signal(s, lambda signum, frame: pending.append(signum))
    try:
        yield
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)
        for s in dict.fromkeys(pending):
            signal.raise_signal(s)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_error(path: Path, exc: BaseException) -> OutputPathError | None:
    """An :class:`OutputPathError` for a write that failed because the disk (or the file size limit) is
    full, None for other failures. ``safetensors`` reports ENOSPC as a ``SafetensorError`` with the text."""
    code = getattr(exc, "errno", None)
    text = str(exc)
    if code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) or "No space left" in text or "File too large" in text:
        reason = "the file size limit was reached" if code == errno.EFBIG or "File too large" in text else "the disk is full"
        return OutputPathError(
            f"Writing '{path}' failed: {reason}; nothing was replaced. Free some space or choose another place."
        )
    return None


# --- writing ------------------------------------------------------------------------------------


def _write_special(path: Path, write: Callable[[Path], None], suffix: str) -> Path:
    """Write into a temporary file in the system's temporary directory, then copy it into the device or FIFO."""
    with tempfile.TemporaryDirectory(prefix="sinkscope-") as tmpdir:
        tmp = Path(tmpdir) / ("out" + suffix)
        write(tmp)
        try:
            with open(tmp, "rb") as src, open(path, "wb") as dst:
                shutil.copyfileobj(src, dst)
        except OSError as exc:
            raise OutputPathError(f"Writing to '{path}' ({describe(path)}) failed: {exc.strerror}.") from None
    return path


def atomic_write(path: PathLike, write: Callable[[Path], None], suffix: str = "") -> Path:
    """Write a file by ``write(tmp_path)`` into a hidden sibling, fsync it, and rename it over ``path``
    (a link's target); a device or FIFO is written directly. Returns where the file was written.

    ``suffix`` is given to the temporary name for writers that choose a format by extension."""
    path = check_output_file(path)
    if is_special(path):
        return _write_special(path, write, suffix)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp_path = None
    try:
        with signals_held():
            fd, tmp = tempfile.mkstemp(
                dir=path.parent, prefix=_prefix(path.name, path.parent, "tmp"), suffix=suffix[:_SUFFIX_ROOM]
            )
            os.close(fd)
            tmp_path = Path(tmp)
        write(tmp_path)
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the mode a plain open() would
        fd = os.open(tmp_path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp_path, path)
        _fsync_dir(path.parent)
    except OSError as exc:
        raise (write_error(path, exc) or exc) from None
    finally:
        if tmp_path is not None:
            with signals_held():
                if tmp_path.exists():
                    tmp_path.unlink()
    return path


def atomic_write_text(path: PathLike, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda p: p.write_bytes(data))


def _plain_modes(root: Path) -> None:
    """The modes a plain ``mkdir`` / ``open`` give under the umask (``mkdtemp`` makes 0700 directories)."""
    mask = _umask()
    for dirpath, _, filenames in os.walk(root):
        os.chmod(dirpath, 0o777 & ~mask)
        for name in filenames:
            os.chmod(os.path.join(dirpath, name), 0o666 & ~mask)


@contextlib.contextmanager
def atomic_directory(target: PathLike) -> Iterator[Path]:
    """``with atomic_directory(dir) as tmp: <write files into tmp>``: on success ``tmp`` (a hidden
    sibling of ``dir``) gets the modes of a plain ``mkdir`` / ``open`` under the umask, is fsynced and
    renamed to ``dir``; an existing ``dir`` is swapped with it in one atomic step (``renameat2``), or,
    where that is unsupported, moved aside and deleted only once the new one is in place. On any error
    (Ctrl-C and SIGTERM included) ``tmp`` is removed and ``dir`` is untouched; temporaries of a process
    killed outright are removed by the next save to ``dir``.

    The caller decides whether replacing ``dir`` is allowed (see ``PrunedVariant.save``)."""
    target = Path(target).expanduser()
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target)
    tmp = old = None
    try:
        with signals_held():
            tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=_prefix(target.name, target.parent, "tmp")))
        yield tmp
        _plain_modes(tmp)
        fsync_tree(tmp)
        if target.exists() and _exchange(tmp, target):  # one atomic step: tmp now holds the old directory
            _fsync_dir(target.parent)
            return
        if target.exists():  # no renameat2: the old directory stays whole under .<name>.old-* until the new one is in place
            with signals_held():
                old = Path(tempfile.mkdtemp(dir=target.parent, prefix=_prefix(target.name, target.parent, "old")))
                os.rmdir(old)
                os.rename(target, old)
        os.rename(tmp, target)
        _fsync_dir(target.parent)
    finally:
        with signals_held():
            if old is not None and old.exists():
                if target.exists():  # the new directory is in place
                    shutil.rmtree(old, ignore_errors=True)
                else:  # interrupted between the two renames: put the old one back
                    os.rename(old, target)
            if tmp is not None and tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
