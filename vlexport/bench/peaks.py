"""The machine's own limits, measured in the benchmark's process: GEMM rates per dtype and memory bandwidth.

A row's fraction of peak compares what it achieved with what this machine did in the same run, with the
same intra-op thread count, on the simplest kernel of its kind: square ``torch.mm`` (fp32 / fp16 / bf16),
int8 GEMM (``torch._int_mm`` and ONNX Runtime ``MatMulInteger``, the faster of the two: ORT's int8 rows
use the latter's kernels) and a large tensor read (``sum``) and copy. Sizes grow until one call takes
long enough to time; each rate is the best of a few calls, because a shared machine only ever makes a
kernel slower. CUDA kernels are timed with events after a synchronisation. Results are cached per
(device, threads) for the process, so a suite's cases share one measurement.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from vlexport.memory import available_bytes

if TYPE_CHECKING:
    from vlexport.contracts.precision import PrecisionConfig

MEMORY = "memory"  # the peak kind of bandwidth-bound rows (decode steps)


@dataclass
class Peak:
    kind: str  # fp32-gemm | fp16-gemm | bf16-gemm | int8-gemm | memory
    value: float  # GFLOP/s (GOP/s for int8) or GB/s
    unit: str  # GFLOP/s | GOP/s | GB/s
    method: str  # what was run, e.g. "torch.mm 2048^2 fp32, best of 4"


@dataclass
class Peaks:
    device: str  # cpu | cuda
    threads: int
    peaks: dict[str, Peak] = field(default_factory=dict)
    seconds: float = 0.0  # wall time the measurements took
    samples: int = 1  # measurements merged (best value per kind)
    notes: list[str] = field(default_factory=list)  # kinds that could not be measured, and why

    def get(self, kind: str) -> Peak | None:
        return self.peaks.get(kind)

    def as_dict(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "threads": self.threads,
            "seconds": round(self.seconds, 2),
            "samples": self.samples,
            "peaks": {k: asdict(p) for k, p in self.peaks.items()},
            "notes": list(self.notes),
        }


_CACHE: dict[tuple[str, int], tuple[Peaks, float]] = {}  # (device, threads) -> (peaks, when measured)
BUDGET_S = 2.5


def machine_peaks(
    device: str, threads: int, budget_s: float = BUDGET_S, again_after_s: float | None = None
) -> Peaks:
    """The peaks of ``device`` at ``threads`` intra-op threads, measured once per process.

    ``again_after_s``: measure again when the cached measurement is older than that, keeping the better
    value of each kind (load on a shared machine only ever lowers a measurement).
    """
    key = (device, threads)
    cached = _CACHE.get(key)
    if cached is None:
        _CACHE[key] = (measure_peaks(device, threads, budget_s), time.monotonic())
    elif again_after_s is not None and time.monotonic() - cached[1] > again_after_s:
        old, fresh = cached[0], measure_peaks(device, threads, budget_s)
        for kind, peak in fresh.peaks.items():
            if kind not in old.peaks or peak.value > old.peaks[kind].value:
                old.peaks[kind] = peak
        old.seconds += fresh.seconds
        old.samples += 1
        _CACHE[key] = (old, time.monotonic())
    return _CACHE[key][0]


def measured() -> list[dict[str, Any]]:
    """Every measurement of this process, for a report file's header."""
    return [p.as_dict() for p, _ in _CACHE.values()]


def peak_kind(precision: PrecisionConfig, generative: bool) -> str:
    """Which limit a row is judged against: memory bandwidth for decode, else its config's compute GEMM."""
    return MEMORY if generative else precision.peak_kind


def measure_peaks(device: str, threads: int, budget_s: float = BUDGET_S) -> Peaks:
    """Measure now (about ``budget_s`` seconds in all); torch's thread count is ``threads`` meanwhile."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    start = time.perf_counter()
    out = Peaks(device, threads)
    cuda = device == "cuda"
    timer = _cuda_time if cuda else _cpu_time
    slice_s = budget_s / 6  # fp32, fp16, bf16, int8 (two ways on CPU), memory
    try:
        for kind, dtype in (
            ("fp32-gemm", torch.float32),
            ("bf16-gemm", torch.bfloat16),
            ("fp16-gemm", torch.float16),
        ):
            _try(out, kind, lambda d=dtype, k=kind: _gemm(d, device, timer, slice_s, k))
        _try(out, "int8-gemm", lambda: _int8(device, threads, timer, slice_s))
        _try(out, MEMORY, lambda: _bandwidth(device, timer, slice_s))
    finally:
        torch.set_num_threads(before)
    out.seconds = time.perf_counter() - start
    return out


def _try(out: Peaks, kind: str, measure: Callable[[], Peak | None]) -> None:
    try:
        peak = measure()
    # a dtype without a kernel here: its rows get no fraction; the note says why
    except Exception as e:  # noqa: BLE001
        out.notes.append(f"{kind}: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}")
        return
    if peak is not None and peak.value > 0:
        out.peaks[kind] = peak


def _cpu_time(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter_ns()
    fn()
    return (time.perf_counter_ns() - t0) / 1e9


def _cuda_time(fn: Callable[[], Any]) -> float:
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def _best(
    fn: Callable[[], Any], timer: Callable[[Callable[[], Any]], float], slice_s: float, reps: int = 5
) -> tuple[float, int]:
    """Best time of up to ``reps`` calls after one warm-up, stopping when the slice is used."""
    timer(fn)  # warm-up: kernel selection, first-touch of pages
    best, n, t0 = float("inf"), 0, time.perf_counter()
    while n < reps and (n < 2 or time.perf_counter() - t0 < slice_s):
        best = min(best, timer(fn))
        n += 1
    return best, n


def _sized(
    make: Callable[[int], Callable[[], Any]],
    timer: Callable[[Callable[[], Any]], float],
    slice_s: float,
    sizes: tuple[int, ...],
    ops: Callable[[int], float],
) -> tuple[int, float, int]:
    """(size, best rate in ops/s, calls at that size) over growing sizes, until one call takes >= 1/8 slice.

    The best rate over sizes, not the largest size's: on a quiet machine large sizes win; on a loaded one
    only calls short enough to run between preemptions show what the cores can do.
    """
    best: tuple[float, int, int] = (0.0, sizes[0], 0)
    for n in sizes:
        fn = make(n)
        seconds, reps = _best(fn, timer, slice_s / 3)
        if ops(n) / seconds > best[0]:
            best = (ops(n) / seconds, n, reps)
        if seconds >= slice_s / 8:
            break
    return best[1], best[0], best[2]


_GEMM_SIZES = (256, 512, 1024, 2048, 4096, 8192)


def _gemm_ops(n: int) -> float:
    return 2.0 * n**3  # a multiply and an add per term of an n x n x n product


def _gemm(dtype: torch.dtype, device: str, timer: Callable, slice_s: float, kind: str) -> Peak:
    def make(n: int) -> Callable[[], Any]:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        return lambda: torch.mm(a, b)

    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32: TF32 is another peak
    try:
        n, rate, reps = _sized(make, timer, slice_s, _GEMM_SIZES, _gemm_ops)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    name = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
    return Peak(kind, round(rate / 1e9, 2), "GFLOP/s", f"torch.mm {n}x{n} {name}, best of {reps}")


def _int8(device: str, threads: int, timer: Callable, slice_s: float) -> Peak:
    """int8 x int8 -> int32 GEMM: torch._int_mm, and on CPU also ORT MatMulInteger; the faster one counts."""
    found: list[Peak] = []
    errors: list[str] = []

    def make(n: int) -> Callable[[], Any]:
        a = torch.randint(-128, 128, (n, n), dtype=torch.int8, device=device)
        b = torch.randint(-128, 128, (n, n), dtype=torch.int8, device=device)
        return lambda: torch._int_mm(a, b)

    try:
        n, rate, reps = _sized(make, timer, slice_s, _GEMM_SIZES, _gemm_ops)
        found.append(
            Peak("int8-gemm", round(rate / 1e9, 2), "GOP/s", f"torch._int_mm {n}x{n}, best of {reps}")
        )
    except Exception as e:  # noqa: BLE001  (older builds: no CPU kernel)
        errors.append(f"torch._int_mm: {type(e).__name__}")
    if device == "cpu":
        try:
            found.append(_ort_int8(threads, slice_s))
        except Exception as e:  # noqa: BLE001
            errors.append(f"ORT MatMulInteger: {type(e).__name__}")
    if not found:
        raise RuntimeError("; ".join(errors))
    best_peak = max(found, key=lambda p: p.value)
    others = [f"{p.method.split(' ')[0]} {p.value:g}" for p in found if p is not best_peak]
    if others:
        best_peak.method += f" (also measured: {', '.join(others)} GOP/s)"
    return best_peak


def _ort_int8(threads: int, slice_s: float) -> Peak:
    """ONNX Runtime's MatMulInteger (uint8 x int8, the pair quantize_dynamic emits) on a one-node graph."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    def make(n: int) -> Callable[[], Any]:
        node = helper.make_node("MatMulInteger", ["A", "B"], ["Y"])
        graph = helper.make_graph(
            [node],
            "int8_gemm",
            [
                helper.make_tensor_value_info("A", TensorProto.UINT8, [n, n]),
                helper.make_tensor_value_info("B", TensorProto.INT8, [n, n]),
            ],
            [helper.make_tensor_value_info("Y", TensorProto.INT32, [n, n])],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = min(model.ir_version, 10)  # what this ONNX Runtime reads, whatever onnx writes
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        rng = np.random.default_rng(0)
        feeds = {
            "A": rng.integers(0, 256, (n, n), dtype=np.uint8),
            "B": rng.integers(-128, 128, (n, n), dtype=np.int8),
        }
        return lambda: sess.run(None, feeds)

    n, rate, reps = _sized(make, _cpu_time, slice_s, _GEMM_SIZES[:-1], _gemm_ops)
    return Peak(
        "int8-gemm", round(rate / 1e9, 2), "GOP/s", f"onnxruntime MatMulInteger {n}x{n} u8s8, best of {reps}"
    )


def _bandwidth(device: str, timer: Callable, slice_s: float) -> Peak:
    """Read (``sum``) and copy of a tensor larger than the caches; GB/s of bytes moved, the better of the
    two."""
    if device == "cuda":
        free, _ = torch.cuda.mem_get_info()
        nbytes = min(1 << 30, free // 8)
    else:  # twice the last-level cache (480 MiB on some servers), so the sum reads memory, not cache
        nbytes = min(max(256 << 20, 2 * _last_level_cache_bytes()), (available_bytes() or 4 << 30) // 8)
    n = max(1 << 20, nbytes // 4)
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    read_s, reps = _best(lambda: src.sum(), timer, slice_s / 2)
    copy_s, _ = _best(lambda: dst.copy_(src), timer, slice_s / 2)
    read, copy = src.nbytes / read_s / 1e9, 2 * src.nbytes / copy_s / 1e9
    mb = src.nbytes >> 20
    method = (
        f"sum of {mb} MiB fp32 (read {read:.1f} GB/s) and copy (read+write {copy:.1f} GB/s), best of {reps}"
    )
    return Peak(MEMORY, round(max(read, copy), 2), "GB/s", method)


def _last_level_cache_bytes() -> int:
    """Size of the CPU's largest cache level (Linux sysfs), 0 when unknown."""
    import glob

    sizes = [0]
    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        try:
            text = Path(path).read_text().strip().upper()
            sizes.append(int(text.rstrip("KMG")) << {"K": 10, "M": 20, "G": 30}.get(text[-1:], 0))
        except (OSError, ValueError):
            continue
    return max(sizes)
