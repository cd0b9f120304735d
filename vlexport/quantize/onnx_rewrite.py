"""What the ONNX precision passes share: rewriting every component of a parent artifact, and the scratch
directory an ONNX Runtime quantizer writes into (quiet, with only its result moved into the artifact)."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from vlexport.contracts.backends import DeriveContext, Derived


def rewrite_components(ctx: DeriveContext, write: Callable[[Path, Path, bool], None]) -> Derived:
    """Apply ``write(src_path, dst_path, external)`` to every component of the parent and describe the
    results."""
    from vlexport.export.onnx import describe

    specs = {s.name: s for s in ctx.task_spec.components(ctx.config)}
    components = {}
    for name, comp in ctx.parent.components.items():
        if ctx.only is not None and name not in ctx.only:
            continue  # another precision's (pipeline._build_per_component)
        ctx.progress(f"{ctx.job.precision.name}: {name}")
        src, dst = ctx.parent_dir / comp.file, ctx.out_dir / comp.file
        write(src, dst, comp.external_data is not None)
        components[name] = describe(dst, name, specs[name].dynamic_axes, root=ctx.out_dir)
    return Derived(components)


@contextlib.contextmanager
def quiet_root_logger() -> Iterator[None]:
    """The quantizer logs "consider pre-processing" on the root logger at every call; keep the CLI
    readable."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


@contextlib.contextmanager
def quantizer_output(out_dir: Path, dst: Path) -> Iterator[Path]:
    """The path an ONNX Runtime quantizer writes to, in a scratch dir inside ``out_dir``.

    The quantizers write intermediate files beside their output; only the result (``dst.name`` and its
    external data) moves into the artifact, and the quantizer's root-logger advice stays quiet.
    """
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".quant.") as scratch, quiet_root_logger():
        yield Path(scratch) / dst.name
        for f in Path(scratch).iterdir():
            if f.name.startswith(dst.name):
                shutil.move(str(f), out_dir / f.name)


def source_view(src: Path, scratch: Path) -> Path:
    """``src`` copied into ``scratch`` (the graph and its external data), for a quantizer to read.

    ONNX Runtime's quantizers write a shape-inferred copy (``*-inferred.onnx``) beside the path they are given
    and delete it after: given the source artifact's own path, two quantizes of one artifact race on that file
    and a read-only source cannot be quantized. A source artifact is read, never written. A copy, not a link:
    onnx >= 1.20 refuses external data behind a symlink or with several hard links (its path-traversal and
    hardlink-attack checks); where the filesystem clones files (btrfs, XFS) the copy costs no bytes.
    """
    view = scratch / "source"
    view.mkdir(exist_ok=True)
    for f in src.parent.iterdir():
        if f.name.startswith(src.name) and not (view / f.name).exists():  # the graph and its ``.data``
            _clone_or_copy(f, view / f.name)
    return view / src.name


def _clone_or_copy(src: Path, dst: Path) -> None:
    ficlone = 0x40049409  # linux/fs.h FICLONE: share the extents copy-on-write
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        try:
            fcntl.ioctl(fout.fileno(), ficlone, fin.fileno())
            return
        except OSError:  # ext4, tmpfs, another filesystem: a plain copy
            pass
    shutil.copyfile(src, dst)
