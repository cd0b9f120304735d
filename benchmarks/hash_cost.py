"""Cost of the per-file content hashes (manifest.file_sha256: sha256 streamed in 8 MiB blocks), seconds per
GB.

    python benchmarks/hash_cost.py [DIR ...] [--synthetic-gb 4] [--out benchmarks/results/hash_cost.json]

For each artifact DIR (its manifest's hashed files) and a synthetic file of --synthetic-gb GB of random bytes:
one pass with the file evicted from the page cache first (posix_fadvise DONTNEED: a first `validate` after a
copy or reboot) and one warm pass (the file just read: a `triton` right after `validate`). sha256 is CPU-bound
at ~1-2 GB/s on one core, so the cost is per byte and the same for any model: a full-size BLIP-2 artifact
costs its size in GB times the s/GB measured here.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

from vlexport.contracts.manifest import Manifest, file_sha256


def _evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _time(paths: list[Path], *, cold: bool) -> dict[str, float]:
    if cold:
        for p in paths:
            _evict(p)
    size = sum(p.stat().st_size for p in paths)
    start = time.perf_counter()
    for p in paths:
        file_sha256(p)
    seconds = time.perf_counter() - start
    return {"gb": size / 1e9, "seconds": seconds, "s_per_gb": seconds / (size / 1e9)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dirs", nargs="*", type=Path)
    ap.add_argument("--synthetic-gb", type=float, default=4.0)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/hash_cost.json"))
    args = ap.parse_args()
    rows = []
    for d in args.dirs:
        manifest = Manifest.read(d)
        paths = [d / rel for rel in manifest.hashed_files()]
        rows.append(
            {
                "what": str(d),
                "backend": manifest.backend,
                "cold": _time(paths, cold=True),
                "warm": _time(paths, cold=False),
            }
        )
    if args.synthetic_gb > 0:
        path = args.out.parent / ".hash_cost.bin"
        block = os.urandom(64 << 20)
        with path.open("wb") as f:
            for _ in range(int(args.synthetic_gb * 1e9) // len(block)):
                f.write(block)
        try:
            os.sync()
            rows.append(
                {
                    "what": f"synthetic {args.synthetic_gb:g} GB",
                    "cold": _time([path], cold=True),
                    "warm": _time([path], cold=False),
                }
            )
        finally:
            path.unlink()
    result = {
        "rows": rows,
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "load_avg_at_end": os.getloadavg(),
        },
        "command": "python benchmarks/hash_cost.py " + " ".join(map(str, args.dirs)),
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for r in rows:
        print(
            f"{r['what']}: {r['cold']['gb']:.2f} GB, cold {r['cold']['s_per_gb']:.2f} s/GB, "
            f"warm {r['warm']['s_per_gb']:.2f} s/GB"
        )


if __name__ == "__main__":
    main()
