"""One process at a time per output folder: :func:`output_lock` and :class:`FolderInUse`.

Two ``cxrgaze train`` runs into one folder would overwrite each other's ``last.pt`` and
``best.pt`` and mix their MLflow runs. A run therefore holds ``FOLDER/cxrgaze.lock`` while
it trains: a file holding the owner's process id, host and start time, locked with
``flock`` (the OS drops that lock when the process dies, however it dies) and removed
when the run ends. A second process is refused with one line naming the owner.

A lock left by a killed process is stale: nobody holds its ``flock`` and its process is
gone, so the next run takes it over silently. A lock written on another host cannot be
checked from here (a process id means nothing across machines, and ``flock`` on a network
file system may not be shared): it is never broken, the message says so and names the
file to delete once that run is known to be over.

Re-entrant within a process (``train_tracked`` holds the folder around :func:`cxrgaze.train.train`,
which takes it again). Under ``torchrun`` only rank 0 takes it (the caller decides).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

LOCK_FILE = "cxrgaze.lock"
"""The lock's name inside the folder it guards."""

_HELD: dict[Path, list[Any]] = {}
"""Folders this process holds: resolved lock path -> [file descriptor, depth]."""


class FolderInUse(RuntimeError):
    """Another process (alive, or on another host) holds the folder's lock."""


def this_host() -> str:
    return socket.gethostname()


def _proc_stat(pid: int) -> list[str] | None:
    """The fields of ``/proc/<pid>/stat`` after the command name (state first); None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2:].split()
    except (OSError, ValueError):
        return None


def process_start(pid: int) -> int | None:
    """The start time of process ``pid`` in clock ticks since boot (``/proc``; None where
    unknown): with the pid it names one process, even after the pid is reused."""
    return _start_of(_proc_stat(pid))


def _start_of(fields: list[str] | None) -> int | None:
    try:
        return None if fields is None else int(fields[19])
    except (ValueError, IndexError):
        return None


def process_alive(pid: int, started: int | None = None) -> bool:
    """Whether process ``pid`` of this host runs (and, when both are known, is the one that
    started at ``started``). A zombie (exited, not yet reaped by its parent: state ``Z`` or
    ``X`` in ``/proc``) does not run, though ``kill(pid, 0)`` still reaches it."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, another user's
    fields = _proc_stat(pid)  # read once: state and start time
    if fields and fields[0] in ("Z", "X"):
        return False
    now = _start_of(fields)
    return started is None or now is None or now == started


def owner_record() -> dict[str, Any]:
    """This process as a lock records it."""
    return {"pid": os.getpid(), "host": this_host(), "started": process_start(os.getpid())}


def _read_owner(fd: int) -> dict[str, Any] | None:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 4096)
    try:
        owner = json.loads(raw.decode())
        return owner if isinstance(owner, dict) and isinstance(owner.get("pid"), int) else None
    except (UnicodeDecodeError, ValueError):
        return None


def _refusal(folder: Path, path: Path, owner: dict[str, Any] | None) -> FolderInUse:
    if owner is None:
        return FolderInUse(f"{folder} is in use by another process (it is starting: {path} holds no process id yet); "
                           "wait for it to finish, or use another output folder")
    who = f"process {owner['pid']} on host {owner.get('host', '?')}"
    if owner.get("host") != this_host():
        return FolderInUse(f"{folder} is in use by {who} (lock {path}); a process on another host cannot be checked "
                           f"from {this_host()}, so the lock is kept: if that run is over, delete {path}")
    return FolderInUse(f"{folder} is in use by {who}, which is still running (lock {path}); wait for it to "
                       "finish or stop it, or use another output folder")


def _take(folder: Path, path: Path) -> int:
    """Lock ``path`` for this process and write the owner into it; raises :class:`FolderInUse`."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                os.close(fd)
                raise
            owner = _read_owner(fd)
            os.close(fd)
            raise _refusal(folder, path, owner) from None
        try:
            current = os.stat(path)
        except FileNotFoundError:
            current = None
        if current is None or not os.path.samestat(os.fstat(fd), current):
            os.close(fd)  # its owner removed it as we opened it: lock the new one
            continue
        owner = _read_owner(fd)
        # Nobody holds the flock: the owner is gone, unless it lives on another host (flock may
        # not reach across a network file system) or still runs here: then keep it and say so.
        elsewhere = owner is not None and owner.get("host") != this_host()
        if elsewhere or (owner is not None and owner["pid"] != os.getpid()
                         and process_alive(owner["pid"], owner.get("started"))):
            os.close(fd)
            raise _refusal(folder, path, owner)
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, (json.dumps(owner_record()) + "\n").encode())
        os.fsync(fd)
        return fd


def acquire(folder: str | Path) -> Path:
    """Hold ``folder`` (created when missing) for this process; returns the lock file.
    Raises :class:`FolderInUse` when another live process holds it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = (folder / LOCK_FILE).resolve()
    if path in _HELD:
        _HELD[path][1] += 1
    else:
        _HELD[path] = [_take(folder, path), 1]
    return path


def release(path: Path) -> None:
    """Undo one :func:`acquire`; the last one removes the lock file and drops the lock."""
    held = _HELD.get(path)
    if held is None:
        return
    held[1] -= 1
    if held[1] > 0:
        return
    del _HELD[path]
    try:
        path.unlink()  # before unlocking: a process waiting on this inode sees it gone and retries
    except FileNotFoundError:
        pass
    os.close(held[0])


@contextmanager
def output_lock(folder: str | Path) -> Iterator[Path]:
    """Hold ``folder`` for the block (see the module doc); yields the lock file."""
    path = acquire(folder)
    try:
        yield path
    finally:
        release(path)
