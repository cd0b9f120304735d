"""Atomic artifact directories: build in a sibling temp dir, rename into place only on success.

Every writer goes through here: a failure, Ctrl-C, SIGTERM or SIGHUP leaves nothing behind, two never share a
target.

- ``output_scope`` turns signals into :class:`~vlexport.errors.Interrupted` and owns the locks taken inside
it.
- The lock is ``fcntl.flock`` on ``.<name>.lock`` beside the target, held from ``check_output_dir`` to the
  final rename and then removed. A second writer fails at once, ``--force`` or not: ``--force`` replaces a
  finished artifact, never one that another process is still writing (waiting could mean tens of minutes
  behind a TensorRT build; serialise on purpose with ``flock(1)``). flock dies with its process, so SIGKILL
  leaves no stale lock, only the file, which the next writer reuses and removes.
- Staging dirs are ``.<name>.<pid>-<host>.<random>.partial`` (``.parent.partial``: a derived backend's
scratch): the lock's holder removes those killed writers left; :func:`describe_partial` says what one is.
"""

from vlexport.artifact.locks import lock_path, output_scope
from vlexport.artifact.output_paths import real_target, remove_set_aside
from vlexport.artifact.staging import (
    atomic_write_bytes,
    atomic_write_text,
    check_output_dir,
    clean_stale,
    describe_partial,
    parse_staging_name,
    scratch_dir,
    staged_dir,
    tree_bytes,
)

__all__ = [
    "atomic_write_bytes",
    "atomic_write_text",
    "check_output_dir",
    "clean_stale",
    "describe_partial",
    "lock_path",
    "output_scope",
    "parse_staging_name",
    "real_target",
    "remove_set_aside",
    "scratch_dir",
    "staged_dir",
    "tree_bytes",
]
