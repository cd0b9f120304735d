"""Benchmark result rows and the JSON file that holds them (schema ``vlexport-bench/2``).

A row is one (model, task, backend, precision, kernels, shape) measured in one run. Its identity
fields are what `vlexport regress` matches rows by; the rest is measurement. Schema 2 added the work
and peak fields (how close a row is to the machine's limit); files of schema 1 read as rows without them.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vlexport.artifact import atomic_write_text
from vlexport.errors import CheckError, UsageError
from vlexport.userdata import ShapeError, checked_fields, kind_of, read_json

SCHEMA = "vlexport-bench/2"
READABLE = ("vlexport-bench/1", SCHEMA)  # 1: before the work / peak fields (they read as None)
IDENTITY = (
    "model",
    "task",
    "backend",
    "precision",
    "kernels",
    "batch",
    "seq_len",
    "image_size",
    "new_tokens",
)
REFERENCE_BACKEND = "eager"  # eager fp32 without kernels: the parity reference and the speed-up baseline

# A row faster than the peak its kind was measured at: the peak measurement met machine load.
ABOVE_PEAK = "above the measured peak: the peak measurement was slowed by other load"

# status values
OK = "ok"
FAILED_PARITY = "failed-parity"
ERROR = "error"


@dataclass
class BenchRow:
    # identity
    model: str
    task: str
    backend: (
        str  # a bench runner (eager | compile) or an export backend (onnx | onnx-opt | aoti | tensorrt | ...)
    )
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
    load_average: float | None = None  # the machine's 1-minute load as the run began (timing.py)
    # verdict
    status: str = OK  # ok | failed-parity | error
    # per output: max_abs, max_rel, cosine, agreement, kind
    parity: dict[str, Any] = field(default_factory=dict)
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
    # how close to the limit: work counted once per model and shape (bench/work.py), the machine's peak
    # measured in the same run with the same threads (bench/peaks.py)
    work_flops: float | None = (
        None  # FLOPs of one timed call (eager fp32 forward, FlopCounterMode), whole batch
    )
    work_flops_by_component: dict[str, float] = field(default_factory=dict)
    work_bytes_per_step: float | None = None  # generation: bytes one decode step reads (weights + KV cache)
    achieved_gflops: float | None = None  # work_flops / p50 (GOP/s for int8 rows)
    achieved_gbps: float | None = None  # work_bytes_per_step / decode ms per token
    peak_kind: str = ""  # the limit judged against: fp32-gemm | fp16-gemm | bf16-gemm | int8-gemm | memory
    peak_value: float | None = None  # that limit on this machine in this run (GFLOP/s, GOP/s or GB/s)
    peak_fraction: float | None = None  # achieved (GFLOP/s, or GB/s for memory) / peak_value
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
        shape = (
            f"b{self.batch}"
            + (f" s{self.seq_len}" if self.seq_len else "")
            + (f" t{self.new_tokens}" if self.new_tokens else "")
        )
        return f"{self.model} {self.task} {self.backend}{extra} {self.precision} {shape}"

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "row") -> BenchRow:
        """Raises ShapeError naming ``where`` and the field; unknown keys are dropped (newer files carry
        more)."""
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
        raise CheckError(
            f'{path} holds {kind_of(doc)}, not a vlexport bench file (an object with "schema": '
            f'{SCHEMA!r} and "rows"); {write_one}.'
        )
    if doc.get("schema") not in READABLE:
        raise CheckError(
            f"{path} has schema {doc.get('schema')!r}, expected {SCHEMA!r}: not a vlexport bench file."
        )
    try:
        items = doc.get("rows", [])
        if not isinstance(items, list):
            raise ShapeError(f"rows must be a list of row objects, got {kind_of(items)}")
        rows = [BenchRow.from_dict(r, f"rows[{i}]") for i, r in enumerate(items)]
    except ShapeError as e:
        raise CheckError(
            f"{path} does not match schema {SCHEMA}: {e}. The file is damaged or was not written by "
            f"vlexport; {write_one}."
        ) from None
    return rows, {k: v for k, v in doc.items() if k != "rows"}


def fill_speedups(rows: list[BenchRow]) -> None:
    """speedup_vs_eager = eager fp32 p50 / row p50 at the same model, task and shape; None for failed rows."""
    ref = {_shape_key(r): r for r in rows if is_reference(r) and r.ok}
    for r in rows:
        base = ref.get(_shape_key(r))
        r.speedup_vs_eager = (
            round(base.latency_p50_ms / r.latency_p50_ms, 4)
            if r.ok and base is not None and r.latency_p50_ms
            else None
        )


def fill_peak_fractions(rows: list[BenchRow]) -> None:
    """Achieved GFLOP/s (or GB/s per decode step) from the counted work and p50, and its fraction of the
    peak."""
    for r in rows:
        r.achieved_gflops = r.achieved_gbps = r.peak_fraction = None
        if not r.ok:
            continue
        if r.work_flops and r.latency_p50_ms:
            r.achieved_gflops = _sig(r.work_flops / (r.latency_p50_ms / 1e3) / 1e9)
        if r.work_bytes_per_step and r.decode_ms_per_token:
            r.achieved_gbps = _sig(r.work_bytes_per_step / (r.decode_ms_per_token / 1e3) / 1e9)
        achieved = r.achieved_gbps if r.peak_kind == "memory" else r.achieved_gflops
        if achieved is not None and r.peak_value:
            r.peak_fraction = _sig(achieved / r.peak_value)
            if r.peak_fraction > 1.0 and ABOVE_PEAK not in r.detail:
                r.detail = "; ".join(filter(None, [r.detail, ABOVE_PEAK]))


def _sig(x: float) -> float:
    return float(f"{x:.6g}")  # 6 significant digits: tiny models' rates are small numbers


def is_reference(r: BenchRow) -> bool:
    return r.backend == REFERENCE_BACKEND and r.precision == "fp32" and not r.kernels


def _shape_key(r: BenchRow) -> tuple:
    return (r.model, r.task, r.batch, r.seq_len, r.image_size, r.new_tokens)


def shared_cores_note(load: float | None, threads: int, cores: int | None = None) -> str | None:
    """What to say when other work and this run's threads want more cores than the machine has: the CPU
    timings then share cores (ONNX Runtime's and OpenMP's threads spin on cores another process holds, and a
    p50 can double), which the interleaved ratios survive and the absolute times and peak fractions do not."""
    cores = cores or os.cpu_count() or 1
    if load is None or load + threads <= cores + 0.5:
        return None
    return (
        f"the machine was busy: load average {load:.1f} on {cores} core(s) as the run began, and each call "
        f"used {threads} thread(s), so CPU timings shared cores with other work. Ratios to eager were "
        "measured in the same rounds and still compare; absolute ms and peak fractions do not. Re-run on a "
        f"quiet machine, or with --threads {max(1, int(cores - load))} or fewer."
    )


def busy_notes(rows: Sequence[BenchRow]) -> list[str]:
    """The shared-cores note of each distinct load and thread count of ``rows``' CPU runs."""
    notes = {shared_cores_note(r.load_average, r.threads or 1) for r in rows if r.device_kind == "cpu"}
    return sorted(n for n in notes if n)
