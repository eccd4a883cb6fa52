"""Temporary files beside their destination, their permissions, and the leftovers of processes that died writing.

Every file or folder lightq writes is first made as a hidden temporary beside its destination, named
``.<final name>.<host>-<pid>.<random>.partial``, and renamed over the final name only when complete, so a reader
never sees half of it. A process killed by SIGKILL (or a power cut) cannot remove its temporary; the name says
which host and process made it, so ``remove_stale(folder)`` deletes those whose process no longer runs on this
host. A temporary made on another host of a shared filesystem is left alone: its process cannot be checked here.

``publish_mode(path)`` gives a finished file the permissions an ordinary ``open()`` would have (0666 / 0777 for
folders, less the umask): ``mkstemp`` / ``mkdtemp`` make them private to the owner.

``write_atomic(path, write)`` is the whole recipe for one file (results, tables, cached tensors): ``write`` fills
the temporary, which is published and renamed over ``path``. ``file_lock`` serialises writers across processes.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

SUFFIX = ".partial"
NAME_CHARS = 80  # of the final name kept in the temporary's name (the whole name must stay under 255 bytes)
HOST = re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname())[:40] or "host"
_TEMP_NAME = re.compile(r"^\..*\.(?P<host>[A-Za-z0-9_]+)-(?P<pid>\d+)\.[^.]+\.partial$")


def _prefix(final: Path) -> str:
    return f".{final.name[:NAME_CHARS]}.{HOST}-{os.getpid()}."


def temp_file(final: str | os.PathLike) -> Path:
    """A new empty temporary file beside ``final`` (its folder is created if missing)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_prefix(final), suffix=SUFFIX, dir=final.parent)
    os.close(fd)
    return Path(tmp)


def temp_dir(final: str | os.PathLike) -> Path:
    """A new empty temporary folder beside ``final`` (its parent is created if missing)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=_prefix(final), suffix=SUFFIX, dir=final.parent))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def publish_mode(path: str | os.PathLike) -> None:
    """Permissions of a normally created file (0666 & ~umask) or folder (0777 & ~umask), recursively."""
    path, mask = Path(path), _umask()
    if path.is_dir():
        os.chmod(path, 0o777 & ~mask)
        for child in path.rglob("*"):
            os.chmod(child, (0o777 if child.is_dir() else 0o666) & ~mask)
    else:
        os.chmod(path, 0o666 & ~mask)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    if os.name == "nt":  # os.kill(pid, 0) would send CTRL_C_EVENT there: ask psutil, else keep the temporary
        try:
            import psutil
        except ImportError:
            return True
        return psutil.pid_exists(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def stale(folder: str | os.PathLike) -> list[Path]:
    """Temporaries in ``folder`` left by processes of this host that no longer run."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for entry in folder.iterdir():
        m = _TEMP_NAME.match(entry.name)
        if m and m["host"] == HOST and not _alive(int(m["pid"])):
            found.append(entry)
    return found


def remove_stale(folder: str | os.PathLike) -> list[Path]:
    """Delete ``stale(folder)``; returns what was removed."""
    removed = stale(folder)
    for entry in removed:
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
    return removed


def write_atomic(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """``write(tmp)`` fills a temporary file beside ``path``; it gets ``publish_mode`` and replaces ``path`` in one
    rename. On any error the temporary is removed and ``path`` is left as it was."""
    path = Path(path)
    tmp = temp_file(path)
    try:
        write(tmp)
        publish_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


@contextmanager
def file_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if missing) for the ``with`` block: ``filelock.FileLock``,
    flock on POSIX and msvcrt locking on Windows; the file holds no data (it is truncated)."""
    from filelock import FileLock

    with FileLock(str(path)):
        yield
