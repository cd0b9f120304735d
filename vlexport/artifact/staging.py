"""Staging: build in a sibling ``.<name>.<pid>-<host>.<random>.partial`` directory, rename into place only on
success; checks before the work (the output path, free space), the partials killed writers left, scratch
directories for a derived build's parent, and report files written whole or not at all."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from vlexport.artifact.locks import (
    LOCAL,
    PathLike,
    acquire,
    human_size,
    output_scope,
    unwritable_error,
    writer_tag,
)
from vlexport.artifact.output_paths import real_target, remove_set_aside
from vlexport.errors import SIGNALS, CheckError, UsageError, interrupts_as_exceptions, signals_held

Sources = PathLike | Iterable[PathLike | None] | None  # the model directories an output must stay out of


_TAG_RE = r"(?P<pid>\d+)-(?P<host>[A-Za-z0-9-]*)"


_STAGING_RES = (  # the last one: a release before the locks
    re.compile(rf"^\.(?P<name>.+)\.{_TAG_RE}\.[a-z0-9_]+\.(?P<kind>partial|parent\.partial)$"),
    re.compile(rf"^\.(?P<name>.+)\.{_TAG_RE}\.(?P<kind>old)$"),
    re.compile(r"^\.(?P<name>.+)\.[a-z0-9_]{8}\.(?P<kind>partial|parent\.partial)$"),
)


# ---------------------------------------------------------------- checks before the work
def _display(out: Path) -> Path:
    """The path to name in messages: the user's output, never a scratch dir of ours."""
    absolute = Path(os.path.abspath(out))
    for scratch, user_out in reversed(LOCAL.scratch):
        if absolute == scratch or scratch in absolute.parents:
            return user_out
    return out


def _as_paths(source_dir: Sources) -> list[Path]:
    items = [source_dir] if source_dir is None or isinstance(source_dir, (str, Path)) else list(source_dir)
    return [Path(s) for s in items if s is not None]


def check_output_dir(out: PathLike, *, force: bool, source_dir: Sources = None) -> None:
    """Fail early (before any expensive work) on an output path that cannot or must not be replaced.

    Refused whatever ``force`` says: the current directory or one above it, the source model directory
    (``source_dir``: one or several), a directory inside it or above it, a path that is or lies under a
    regular file, an unwritable place, an output another process is writing. An existing artifact needs
    ``force``. Inside :func:`output_scope` (staged_dir opens one) this also creates the missing parents, takes
    the output's lock (held until the scope ends) and removes what killed writers left. Messages name ``out``
    as given.
    """
    out = Path(out)
    display = _display(out)
    target = out.resolve()
    cwd = Path.cwd().resolve()
    if out.name in ("", ".", "..") or target == cwd or target in cwd.parents:
        raise UsageError(
            f"-o {display} is the current directory{' or above it' if target != cwd else ''}: the "
            "output directory is replaced as a whole. Name a new directory, e.g. -o ./artifact."
        )
    for src in _as_paths(source_dir):
        source = src.resolve()
        how = (
            "is"
            if target == source
            else "is inside"
            if source in target.parents
            else "contains"
            if target in source.parents
            else None
        )
        if how:
            raise UsageError(
                f"-o {display} {how} the source model directory {src}: exporting there would replace "
                "the model being exported. Choose an -o outside it."
            )
    if out.exists() and not out.is_dir():
        raise UsageError(f"Output path {display} exists and is a file, not a directory. Choose another -o.")
    parent = next(p for p in Path(os.path.abspath(out)).parents if p.exists())
    if not parent.is_dir():
        raise UsageError(
            f"Cannot write to {display}: {parent} is a file, not a directory. Choose another -o."
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"Cannot write to {display}: {parent} is not writable. Choose another -o.")
    if LOCAL.scopes:
        scope = LOCAL.scopes[-1]
        missing = [p for p in Path(os.path.abspath(out)).parents if not p.exists()]
        for d in reversed(missing):
            try:
                d.mkdir()
            except FileExistsError:
                continue
            except OSError as e:
                raise unwritable_error(display, d.parent, e) from None
            scope.made.append(d)
        acquire(out, display)
        scope.locks.append(str(out.resolve()))
        clean_stale(out)
    if out.exists() and not force:
        raise UsageError(
            f"Output directory {display} already exists. Pass --force to replace it, or choose another -o."
        )


def _check_space(out: Path, display: Path, expected_bytes: int | None) -> None:
    free = shutil.disk_usage(Path(os.path.abspath(out)).parent).free
    if expected_bytes and free < expected_bytes:
        raise CheckError(
            f"Not enough space for {display}: the artifact needs at least {human_size(expected_bytes)} (its "
            f"weights alone) and its filesystem has {human_size(free)} free. Free some space or choose "
            "another -o; nothing was written."
        )


def tree_bytes(path: PathLike) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def _no_space(e: BaseException) -> bool:
    """ENOSPC / EDQUOT, also when a library wrapped it (torch's C++ writers raise RuntimeError with the
    text)."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(e) or "Disk quota exceeded" in str(e):
            return True
        e = e.__cause__ or e.__context__  # type: ignore[assignment]
    return False


# ---------------------------------------------------------------- staging and stale partials
def parse_staging_name(name: str) -> dict[str, str] | None:
    """``{"name", "kind", "pid", "host"}`` of a staging / set-aside directory name (pid, host: '' for old
    ones)."""
    m = next((m for pattern in _STAGING_RES if (m := pattern.match(name))), None)
    return {"pid": "", "host": "", **m.groupdict()} if m else None


def describe_partial(directory: PathLike) -> str | None:
    """What a vlexport staging directory is, for a user who passed one as an artifact (None: it is not
    one)."""
    path = Path(directory)
    info = parse_staging_name(path.name)
    if info is None:
        return None
    writer = f"pid {info['pid']} on {info['host']}" if info["pid"] else "an earlier vlexport"
    if info["pid"] and info["host"] == writer_tag().split("-", 1)[1]:
        try:
            os.kill(int(info["pid"]), 0)  # signal 0: only asks whether the process exists
            writer += ", still running"
        except ProcessLookupError:
            writer += ", gone: killed before it could clean up"
        except PermissionError:
            writer += ", still running"
    what = "set-aside copy of" if info["kind"] == "old" else "unfinished staging directory for"
    return (
        f"{path} is the {what} {path.parent / info['name']}, not an artifact (its writer: {writer}). "
        f"The next export to {path.parent / info['name']} removes it; or delete it."
    )


def clean_stale(out: PathLike) -> list[Path]:
    """Remove the staging dirs killed writers of ``out`` left (a set-aside ``.old`` goes back when ``out`` is
    missing). Call it with the lock held: then no other writer of ``out`` is alive."""
    out = Path(os.path.abspath(out))
    done = []
    for entry in sorted(out.parent.iterdir()):
        info = parse_staging_name(entry.name)
        if info is None or info["name"] != out.name or not entry.is_dir():
            continue
        if f"{info['pid']}-{info['host']}" == writer_tag():
            continue  # ours: a derived backend's scratch parent, still in use
        if info["kind"] == "old" and not out.exists():
            entry.rename(out)  # killed between its two renames: the previous artifact goes back
        else:
            remove_set_aside(entry)
        done.append(entry)
    return done


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _make_staging(out: Path, suffix: str) -> Path:
    parent = Path(os.path.abspath(out)).parent
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.{writer_tag()}.", suffix=suffix, dir=parent))
    tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it 0700; the artifact should get the usual permissions
    return tmp


def _readable(tmp: Path) -> None:
    """Give external data files the read bits the umask allows: onnx >= 1.23 creates them 0600 (its checker
    opens them so), which a server running as another user (Triton's container) could not read. Only those:
    a file a user kept private stays so."""
    bits = 0o444 & ~_umask()
    for f in tmp.rglob("*.data"):
        if f.is_file() and not f.is_symlink() and (f.stat().st_mode & bits) != bits:
            f.chmod((f.stat().st_mode | bits) & 0o7777)


def _commit(tmp: Path, out: Path) -> None:
    _readable(tmp)
    if not out.exists():
        tmp.rename(out)
        return
    # Move the old one aside first so a failure between the two renames loses nothing (clean_stale restores
    # it).
    old = out.parent / f".{out.name}.{writer_tag()}.old"
    remove_set_aside(old)
    out.rename(old)
    try:
        tmp.rename(out)
    except BaseException:
        old.rename(out)
        raise
    remove_set_aside(old)


@contextlib.contextmanager
def staged_dir(
    out: PathLike, *, force: bool = False, expected_bytes: int | None = None, source_dir: Sources = None
) -> Iterator[Path]:
    """Yield a temp dir next to ``out``; on success it replaces ``out``, on any failure it is removed.

    Failures include Ctrl-C, SIGTERM, SIGHUP (:class:`Interrupted`) and a full disk (ENOSPC, EDQUOT: a
    CheckError naming ``out`` and ``expected_bytes``, the caller's size estimate, checked against the free
    space first).
    """
    given, out = Path(out), real_target(out)  # a symlinked -o: its target is written, the link stays
    display = _display(given)
    with output_scope():
        if (
            display == given
        ):  # a signal from here on interrupts this write: what was committed before is not news
            SIGNALS.committed = None
        check_output_dir(out, force=force, source_dir=source_dir)
        _check_space(out, display, expected_bytes)
        tmp: Path | None = None
        try:
            try:
                # Held: a signal between mkdtemp and this assignment would leave a partial no handler knows of
                # (seen under load: SIGINT right as the staging dir appeared). Delivered at the block's end,
                # with tmp set, so the cleanup below removes it.
                with signals_held():
                    tmp = _make_staging(out, ".partial")
            except OSError as e:
                raise unwritable_error(display, Path(os.path.abspath(out)).parent, e) from None
            try:
                yield tmp
            except BaseException as e:
                if not _no_space(e):
                    raise
                written = human_size(tree_bytes(tmp))
                need = (
                    f"at least {human_size(expected_bytes)} (its weights alone)" if expected_bytes else "more"
                )
                raise CheckError(
                    f"No space left on the filesystem of {display} while writing the artifact: it needs "
                    f"{need}; {written} had been written when the disk filled. Free some space or choose "
                    "another -o; nothing was written."
                ) from None
            with signals_held():
                _commit(tmp, out)
                if display == given:  # a scratch parent is not the user's output
                    SIGNALS.committed = given
        except BaseException:
            if tmp is not None:
                with signals_held():
                    shutil.rmtree(tmp, ignore_errors=True)
            raise


@contextlib.contextmanager
def scratch_dir(out: PathLike, *, expected_bytes: int | None = None) -> Iterator[Path]:
    """A temp dir beside ``out`` for intermediate work (a derived backend's parent), always removed; messages
    about paths inside it name ``out``. Call it inside the scope that holds ``out``'s lock."""
    out = Path(out)
    with output_scope():
        _check_space(out, out, expected_bytes)
        Path(os.path.abspath(out)).parent.mkdir(parents=True, exist_ok=True)
        scratch: Path | None = None
        try:
            with signals_held():  # as in staged_dir: no signal between mkdtemp and the cleanup knowing of it
                scratch = _make_staging(out, ".parent.partial")
                LOCAL.scratch.append((scratch, out))
            yield scratch
        finally:
            if scratch is not None:
                LOCAL.scratch.remove((scratch, out))
                with signals_held():
                    shutil.rmtree(scratch, ignore_errors=True)


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write ``path`` whole or not at all: a temp file beside it, renamed into place (also on SIGTERM /
    SIGHUP)."""
    path = Path(path)
    with interrupts_as_exceptions():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{writer_tag()}.", suffix=".partial", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600; as readable as write_text's files
            with signals_held():
                os.replace(tmp, path)
        except BaseException as e:
            with signals_held(), contextlib.suppress(OSError):
                os.unlink(tmp)
            if _no_space(e):
                raise CheckError(
                    f"No space left on the filesystem of {path} to write it ({human_size(len(data))}); "
                    "nothing was written. Free some space or choose another path."
                ) from None
            raise


def atomic_write_text(path: PathLike, text: str) -> None:
    """Write ``path`` whole or not at all: a temp file beside it, renamed into place (reports, JSON rows)."""
    atomic_write_bytes(path, text.encode())
