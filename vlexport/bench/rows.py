"""Benchmark result rows and the JSON file that holds them (schema ``vlexport-bench/1``).

A row is one (model, task, backend, precision, kernels, shape) measured in one run. Its identity
fields are what `vlexport regress` matches rows by; the rest is measurement.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vlexport.artifact import atomic_write_text
from vlexport.errors import CheckError, UsageError
from vlexport.userdata import ShapeError, checked_fields, kind_of, read_json

SCHEMA = "vlexport-bench/1"
IDENTITY = ("model", "task", "backend", "precision", "kernels", "batch", "seq_len", "image_size", "new_tokens")
REFERENCE_BACKEND = "eager"  # eager fp32 without kernels: the parity reference and the speed-up baseline

# status values
OK = "ok"
FAILED_PARITY = "failed-parity"
ERROR = "error"


@dataclass
class BenchRow:
    # identity
    model: str
    task: str
    backend: str  # a bench runner (eager | compile) or an export backend (onnx | onnx-opt | aoti | tensorrt | ...)
    precision: str
    kernels: str = ""  # comma list of injected kernels, "" for none
    batch: int = 1
    seq_len: int = 0
    image_size: int | None = None
    new_tokens: int = 0  # generation: tokens decoded per sample; 0 for encoders
    # where
    device: str = ""
    device_kind: str = "cpu"  # cpu | cuda
    threads: int | None = None  # intra-op threads (torch and ONNX Runtime alike)
    # verdict
    status: str = OK  # ok | failed-parity | error
    parity: dict[str, Any] = field(default_factory=dict)  # per output: max_abs, max_rel, cosine, agreement, kind
    detail: str = ""  # why a row failed, or a note
    # measurement (ms; None when the row failed before timing)
    latency_p50_ms: float | None = None
    latency_p90_ms: float | None = None
    latency_p99_ms: float | None = None
    latency_mean_ms: float | None = None
    latency_min_ms: float | None = None
    throughput: float | None = None
    throughput_unit: str = "samples/s"  # tokens/s for generation
    speedup_vs_eager: float | None = None  # eager p50 / this p50, same run and shape; None when failed
    prefill_ms: float | None = None  # generation only
    decode_ms_per_token: float | None = None  # generation only
    peak_memory_mb: float | None = None
    memory_kind: str = ""  # cuda-allocated | cuda-device-delta | rss-delta
    build_s: float | None = None  # export / compile / engine build (or reuse) time of the variant
    first_call_s: float | None = None  # first call at this shape: JIT compile, lazy init
    warmup: int = 0
    iters: int = 0
    versions: dict[str, str] = field(default_factory=dict)
    timestamp: str = ""

    @property
    def identity(self) -> tuple:
        return tuple(getattr(self, k) for k in IDENTITY)

    @property
    def ok(self) -> bool:
        return self.status == OK

    def label(self) -> str:
        """Short human name of the row for tables and regress reports."""
        extra = f"+{self.kernels}" if self.kernels else ""
        shape = f"b{self.batch}" + (f" s{self.seq_len}" if self.seq_len else "") + (
            f" t{self.new_tokens}" if self.new_tokens else "")
        return f"{self.model} {self.task} {self.backend}{extra} {self.precision} {shape}"

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "row") -> BenchRow:
        """Raises ShapeError naming ``where`` and the field; unknown keys are dropped (newer files carry more)."""
        return cls(**checked_fields(cls, d, where))


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def write_rows(path: str | Path, rows: list[BenchRow], **meta: Any) -> None:
    doc = {"schema": SCHEMA, "created": now(), **meta, "rows": [asdict(r) for r in rows]}
    atomic_write_text(path, json.dumps(doc, indent=1, default=str) + "\n")  # a crash never leaves half a file


def read_rows(path: str | Path) -> tuple[list[BenchRow], dict[str, Any]]:
    """Rows and the file's other top-level fields (device, versions, settings)."""
    path = Path(path)
    write_one = f"write one with `vlexport bench ... --json {path}`"
    if path.is_dir():
        raise UsageError(f"{path} is a directory, not a bench JSON file; {write_one}.")
    if not path.is_file():
        raise UsageError(f"{path} does not exist; {write_one}.")
    doc = read_json(path, advice=f"It is not a vlexport bench file: {write_one}.")
    if not isinstance(doc, dict):
        raise CheckError(f"{path} holds {kind_of(doc)}, not a vlexport bench file (an object with \"schema\": "
                         f"{SCHEMA!r} and \"rows\"); {write_one}.")
    if doc.get("schema") != SCHEMA:
        raise CheckError(f"{path} has schema {doc.get('schema')!r}, expected {SCHEMA!r}: not a vlexport bench file.")
    try:
        items = doc.get("rows", [])
        if not isinstance(items, list):
            raise ShapeError(f"rows must be a list of row objects, got {kind_of(items)}")
        rows = [BenchRow.from_dict(r, f"rows[{i}]") for i, r in enumerate(items)]
    except ShapeError as e:
        raise CheckError(f"{path} does not match schema {SCHEMA}: {e}. The file is damaged or was not written by "
                         f"vlexport; {write_one}.") from None
    return rows, {k: v for k, v in doc.items() if k != "rows"}


def fill_speedups(rows: list[BenchRow]) -> None:
    """speedup_vs_eager = eager fp32 p50 / row p50 at the same model, task and shape; None for failed rows."""
    ref = {_shape_key(r): r for r in rows if is_reference(r) and r.ok}
    for r in rows:
        base = ref.get(_shape_key(r))
        r.speedup_vs_eager = (round(base.latency_p50_ms / r.latency_p50_ms, 4)
                              if r.ok and base is not None and r.latency_p50_ms else None)


def is_reference(r: BenchRow) -> bool:
    return r.backend == REFERENCE_BACKEND and r.precision == "fp32" and not r.kernels


def _shape_key(r: BenchRow) -> tuple:
    return (r.model, r.task, r.batch, r.seq_len, r.image_size, r.new_tokens)
