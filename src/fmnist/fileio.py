"""Atomic output: each file or folder is written beside its target as ``.{name}.{pid}.{random}.tmp``, flushed,
then renamed, so a crash or a power cut leaves the old output or the new one. A later write of the same
target removes temporaries whose process no longer exists. File-system errors become OutputErrors naming
the target, not the temporary."""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import urllib.error
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import OutputError, Terminated

log = logging.getLogger(__name__)

# OSErrors that say nothing about the file system: they pass through unchanged.
_NOT_FILE_ERRORS = (ConnectionError, TimeoutError, socket.gaierror, socket.herror, urllib.error.URLError)


def _umask() -> int:
    """This process's umask, read without setting it (``os.umask`` sets it for every thread meanwhile)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)  # no /proc (not Linux): the only way there is
    os.umask(mask)
    return mask


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if path.is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        pass
    return True


def remove_stale_temps(target: str | os.PathLike) -> list[Path]:
    """Remove ``target``'s temporaries whose process no longer exists; return what was removed."""
    target = Path(target)
    pattern = re.compile(rf"\.{re.escape(target.name)}\.(\d+)\.[a-z0-9_]+\.tmp")
    removed = []
    try:
        entries = list(os.scandir(target.parent))
    except OSError:
        return removed  # the folder is missing or unreadable: creating the temporary will say so
    for entry in entries:
        m = pattern.fullmatch(entry.name)
        if m is None or not 0 < int(m[1]) < 2**31 or _process_exists(int(m[1])):
            continue
        path = Path(entry.path)
        try:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(path)
            else:
                path.unlink()
        except OSError as e:
            log.warning("cannot remove %s, left by process %s that no longer exists: %s", path, m[1], e.strerror or e)
            continue
        log.info("removed %s, left by process %s that no longer exists", path, m[1])
        removed.append(path)
    return removed


def os_reason(e: OSError) -> str:
    """The system's words for ``e`` (``No space left on device``), else its message, on one line."""
    return e.strerror or " ".join(str(e).split()) or type(e).__name__


def _inside(path: object, folder: Path) -> Path | None:
    """``path`` relative to ``folder`` when it is ``folder`` or below it, else None."""
    try:
        path, folder = Path(os.path.abspath(os.fsdecode(path))), Path(os.path.abspath(folder))
    except (TypeError, ValueError):  # not a path at all
        return None
    return path.relative_to(folder) if path == folder or folder in path.parents else None


def _as_output_error(e: BaseException, target: Path, temp: Path) -> BaseException:
    """An error raised while ``temp`` was being filled, as an :class:`OutputError` about ``target`` where it
    is one; errors about other files, or not about files, pass through (programming errors keep their traceback)."""
    if isinstance(e, RuntimeError) and isinstance(e.__context__, (KeyboardInterrupt, Terminated)):
        # a stop signal inside torch.save makes its zip writer fail on the half-written record: report the stop
        return e.__context__
    if isinstance(e, OutputError):  # from a write nested inside a staging folder
        rel = _inside(e.path, temp)
        return e if rel is None else OutputError(target / rel, e.reason)
    if isinstance(e, RuntimeError) and isinstance(e.__context__, OSError):
        # torch.save reports a failed write as a RuntimeError raised while handling the OSError
        converted = _as_output_error(e.__context__, target, temp)
        return e if converted is e.__context__ else converted
    if not isinstance(e, OSError) or isinstance(e, _NOT_FILE_ERRORS):
        return e
    if e.filename is None:
        return OutputError(target, os_reason(e))
    rel = _inside(e.filename, temp)
    return e if rel is None else OutputError(target / rel, os_reason(e))


@contextlib.contextmanager
def _naming_the_output(target: Path, temp: Path) -> Iterator[None]:
    """Re-raise a file-system error from writing ``temp`` as an :class:`OutputError` naming ``target``."""
    try:
        yield
    except BaseException as e:
        converted = _as_output_error(e, target, temp)
        if converted is e:
            raise
        raise converted from e


def _stage(target: Path, folder: bool) -> Path:
    """A new temporary beside ``target``, its folder made and stale temporaries removed; errors name ``target``."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(target)
        return _make_temp(target, folder, mode=0o777 if folder else 0o666)
    except OSError as e:  # the folder cannot be made, or holds no room for even an empty file
        raise OutputError(target, os_reason(e)) from e


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; rename it onto ``target`` if the block succeeds."""
    target = Path(target)
    tmp = _stage(target, folder=False)
    try:
        with _naming_the_output(target, tmp):
            yield tmp
        try:
            _fsync(tmp)  # the bytes reach the disk before the name does
            os.replace(tmp, target)
            _fsync(target.parent)
        except OSError as e:
            raise OutputError(target, os_reason(e)) from e
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty staging folder beside ``target``; it replaces ``target`` whole if the block succeeds,
    else it is removed and ``target`` is left as it was."""
    target = Path(target)
    staging = _stage(target, folder=True)
    old, committed = None, False
    try:
        with _naming_the_output(target, staging):
            yield staging
        try:
            for folder, _, files in os.walk(staging, topdown=False):  # every file and folder, staging last
                for name in files:
                    _fsync(Path(folder) / name)
                _fsync(Path(folder))
            # the previous output is renamed aside, not deleted, until the new one is in place: an
            # interruption between the two renames puts it back (below) rather than leave half a folder
            if os.path.lexists(target):
                old = _make_temp(target, folder=target.is_dir() and not target.is_symlink())
                os.replace(target, old)  # onto the empty placeholder that reserved the name
            os.replace(staging, target)
            _fsync(target.parent)
            committed = True
        except OSError as e:
            raise OutputError(target, os_reason(e)) from e
    finally:
        if not committed and old is not None and not os.path.lexists(target):
            try:
                os.replace(old, target)
            except OSError as e:  # leave it where it is: it is the only copy
                log.warning("cannot put %s back in place of %s: %s", old, target, os_reason(e))
            old = None
        _remove(staging)
        if old is not None:
            _remove(old)


def _make_temp(target: Path, folder: bool, mode: int | None = None) -> Path:
    """A new, empty temporary file or folder beside ``target``, named after it and this process; ``mode``
    (less the umask) replaces tempfile's 0600/0700, so outputs look like any other file."""
    prefix = f".{target.name}.{os.getpid()}."
    if folder:
        path = Path(tempfile.mkdtemp(prefix=prefix, suffix=".tmp", dir=target.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=target.parent)
        os.close(fd)
        path = Path(name)
    if mode is not None:
        try:
            path.chmod(mode & ~_umask())
        except BaseException:
            _remove(path)
            raise
    return path


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        for _ in range(10):  # a writer thread still running (TensorBoard's) may add a file while the tree goes
            shutil.rmtree(path, ignore_errors=True)
            if not os.path.lexists(path):
                return
        log.warning("cannot remove %s", path)
    else:
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_csv(path: str | os.PathLike, rows: list[dict], columns: list[str] | None = None) -> None:
    """``rows`` as CSV with a header of ``columns`` (by default every key, in order of first appearance; None as
    an empty field): pandas' ``DataFrame.from_records(rows).to_csv(index=False)`` bytes, but for an int column
    with gaps, which pandas writes as floats."""
    columns = columns or list(dict.fromkeys(k for row in rows for k in row))
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
