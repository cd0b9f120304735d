"""Output paths that are links: a symlinked ``-o`` is written through, a link set aside is unlinked, never
followed (helpers of the staging and the locks)."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path


def real_target(out: str | os.PathLike[str]) -> Path:
    """``out``, or where it points when it is a symlink: a symlinked output is written through (its target is
    replaced and the link stays), never replaced by a directory of its own."""
    out = Path(out)
    return Path(os.path.realpath(out)) if out.is_symlink() else out


def remove_set_aside(path: Path) -> None:
    """Remove a directory we set aside or staged; a symlink (an older version set links aside) is unlinked,
    never followed: rmtree refuses links, and ignoring that left ``.old`` entries behind for good."""
    if path.is_symlink():
        with contextlib.suppress(OSError):
            path.unlink()
    else:
        shutil.rmtree(path, ignore_errors=True)
