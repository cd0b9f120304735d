"""The weight files' integrity: only safetensors are loaded (no pickle), their headers are checked before
loading, and a sha256 of the files is recorded in the manifest and re-checked by ``vlexport validate``."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any

from vlexport.errors import CheckError

# Weight files are hashed in chunks this size: disk speed, flat memory (BLIP-2 is 14 GB).
HASH_CHUNK = 4 << 20


_HASHES: dict[
    tuple[Any, ...], str
] = {}  # (path, size, mtime, inode per file) -> sha256: one hash per process


def check_safetensors(path: Path) -> str:
    """Check that a safetensors file is complete (header parses, data size matches); return its header.

    A truncated download otherwise fails deep inside from_pretrained with an unhelpful message.
    """
    size = path.stat().st_size
    try:
        with path.open("rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n <= 0 or 8 + n > size:
                raise ValueError("header length past end of file")
            header = f.read(n).decode("utf-8")
        meta = json.loads(header)
        end = max((v["data_offsets"][1] for k, v in meta.items() if k != "__metadata__"), default=0)
    except (struct.error, ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise CheckError(
            f"{path} is not a valid safetensors file ({e}). Re-download or re-save the weights."
        ) from None
    if 8 + n + end != size:
        raise CheckError(
            f"{path} is truncated or corrupt: its header describes {8 + n + end} bytes, the file has {size}. "
            "Re-download or re-save the weights."
        )
    return header


def weights_sha256(directory: Path) -> str:
    """sha256 over the names and bytes of a directory's *.safetensors files (sorted), streamed in chunks.

    Memoised per process on each file's size, mtimes and inode: an export resolves its model more than once (a
    derived backend's parent, the benchmark's variants), and BLIP-2's 14 GB is hashed once."""
    shards = sorted(directory.glob("*.safetensors"))
    stats = [(s.name, s.stat()) for s in shards]  # stat follows the HF cache's symlinks to the blobs
    key = (
        str(directory.resolve()),
        *((n, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino) for n, st in stats),
    )
    if key not in _HASHES:
        digest, buf = hashlib.sha256(), bytearray(HASH_CHUNK)
        view = memoryview(buf)
        for shard in shards:
            digest.update(shard.name.encode() + b"\0")
            with shard.open("rb") as f:
                while n := f.readinto(buf):
                    digest.update(view[:n])
        _HASHES[key] = digest.hexdigest()
    return _HASHES[key]


def check_unchanged(origin: dict[str, Any], weights: Path, directory: Path) -> None:
    """The eager reference must be the model that was exported: the recorded hash of the weights must hold."""
    recorded = origin.get("sha256")  # none: a hub origin, or a manifest from before the content hash
    if recorded is not None and (now := weights_sha256(weights)) != recorded:
        raise CheckError(
            f"The weights in {weights} changed since {directory} was exported (sha256 {recorded[:16]} "
            "recorded, "
            f"{now[:16]} now): validating against them would compare the artifact with another model. "
            "Re-export, "
            "or restore the weights."
        )
