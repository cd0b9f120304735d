"""Atomic artifact directories: build in a sibling temp dir, rename into place only on success."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from vlexport.errors import UsageError


def check_output_dir(out: Path, *, force: bool) -> None:
    """Fail early (before any expensive work) on an existing or unwritable output directory."""
    if out.exists() and not force:
        raise UsageError(f"Output directory {out} already exists. Pass --force to replace it, or choose another -o.")
    if out.exists() and not out.is_dir():
        raise UsageError(f"Output path {out} exists and is not a directory. Choose another -o.")
    parent = next(p for p in out.absolute().parents if p.exists())
    if not parent.is_dir():
        raise UsageError(f"Cannot write to {out}: {parent} is a file, not a directory. Choose another -o.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"Cannot write to {out}: {parent} is not writable. Choose another -o.")


@contextlib.contextmanager
def staged_dir(out: str | Path, *, force: bool = False) -> Iterator[Path]:
    """Yield a temp dir next to ``out``; on success it replaces ``out``, on any failure (Ctrl-C too) it is removed."""
    out = Path(out)
    check_output_dir(out, force=force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it 0700; the artifact should get the usual permissions
    try:
        yield tmp
        if out.exists():
            # Move the old one aside first so a failure between the two renames loses nothing.
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``path`` whole or not at all: a temp file beside it, renamed into place (reports, JSON rows)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
