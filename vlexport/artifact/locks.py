"""Output locks: ``fcntl.flock`` on ``.<name>.lock`` beside the target, held from ``check_output_dir`` to the
final rename, and the output scopes that own them (signals become :class:`~vlexport.errors.Interrupted` inside
one). A second writer fails at once; flock dies with its process, so SIGKILL leaves no stale lock."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import shutil
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from vlexport.artifact.output_paths import real_target
from vlexport.errors import CheckError, UsageError, interrupts_as_exceptions, signals_held

PathLike = str | Path


class _Local(threading.local):
    """Per thread: the output locks held (by resolved path), the open output scopes, the live scratch dirs."""

    def __init__(self) -> None:
        self.locks: dict[str, _Lock] = {}
        self.scopes: list[_Scope] = []
        self.scratch: list[tuple[Path, Path]] = []  # (scratch dir, the user's output it serves)


LOCAL = _Local()


# ---------------------------------------------------------------- output locks
@dataclass
class _Lock:
    path: Path
    fd: int
    count: int = 1


@dataclass
class _Scope:
    locks: list[str] = field(default_factory=list)
    # parent dirs check_output_dir created (removed on failure)
    made: list[Path] = field(default_factory=list)


def lock_path(out: PathLike) -> Path:
    out = real_target(out)  # two links to one directory share its lock
    return Path(os.path.abspath(out)).parent / f".{out.name}.lock"


def writer_tag() -> str:
    return f"{os.getpid()}-{re.sub(r'[^A-Za-z0-9-]', '-', socket.gethostname())[:40]}"


def acquire(out: Path, display: Path) -> None:
    """Take (or, held by this thread already, re-enter) the lock of ``out``; fail at once when another holds
    it."""
    key = str(out.resolve())
    if key in LOCAL.locks:
        LOCAL.locks[key].count += 1
        return
    path = lock_path(out)
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise unwritable_error(display, path.parent, e) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 200, 0).decode(errors="replace").strip() or "pid unknown"
            os.close(fd)
            who = "export in this process" if owner.startswith(f"pid {os.getpid()} ") else "vlexport process"
            raise UsageError(
                f"Another {who} ({owner}) is writing {display}; wait for it or choose another -o "
                f"(its lock: {path})."
            ) from None
        # The previous holder removes the file as it lets go: the lock we got must be on the file still there.
        with contextlib.suppress(FileNotFoundError):
            st, now = os.fstat(fd), os.stat(path)
            if (st.st_dev, st.st_ino) == (now.st_dev, now.st_ino):
                break
        os.close(fd)
    with contextlib.suppress(OSError):  # who holds it, for the loser's message; best effort on a full disk
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    LOCAL.locks[key] = _Lock(path, fd)


def _release(key: str) -> None:
    lock = LOCAL.locks[key]
    lock.count -= 1
    if lock.count == 0:
        del LOCAL.locks[key]
        with contextlib.suppress(OSError):
            # still holding it: a waiter that opened this file sees the inode change and retries
            lock.path.unlink()
        os.close(lock.fd)


@contextlib.contextmanager
def output_scope() -> Iterator[None]:
    """Signals raise :class:`Interrupted` inside; locks ``check_output_dir`` takes are held, made parents
    undone."""
    with interrupts_as_exceptions():
        scope = _Scope()
        LOCAL.scopes.append(scope)
        ok = False
        try:
            yield
            ok = True
        finally:
            LOCAL.scopes.remove(scope)
            with signals_held():
                for key in reversed(scope.locks):
                    _release(key)
                for made in reversed(scope.made if not ok else []):
                    with contextlib.suppress(OSError):
                        made.rmdir()


def human_size(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def unwritable_error(display: Path, where: Path, e: OSError) -> CheckError | UsageError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return CheckError(
            f"No space left to write {display}: the filesystem of {where} is full "
            f"({human_size(shutil.disk_usage(where).free)} free). Free some space or choose another -o."
        )
    return UsageError(
        f"Cannot write to {display}: {where} is not writable ({e.strerror}). Choose another -o."
    )
