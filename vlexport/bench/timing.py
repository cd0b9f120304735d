"""Clocks, latency statistics, memory probes and device names for the benchmark harness.

GPU work is timed with CUDA events after a synchronisation (never a host clock around an async
launch); CPU work with perf_counter_ns.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch


class Clock:
    """``measure(fn, arg) -> (result, seconds)`` for one call on the harness's device."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"
        if self.cuda:
            self.start = torch.cuda.Event(enable_timing=True)
            self.end = torch.cuda.Event(enable_timing=True)

    def measure(self, fn: Callable[[Any], Any], arg: Any) -> tuple[Any, float]:
        if self.cuda:
            torch.cuda.synchronize()  # the previous variant's work must not leak into this one's time
            self.start.record()
            out = fn(arg)
            self.end.record()
            self.end.synchronize()
            return out, self.start.elapsed_time(self.end) / 1e3
        t0 = time.perf_counter_ns()
        out = fn(arg)
        return out, (time.perf_counter_ns() - t0) / 1e9


def latency_stats(seconds: Sequence[float]) -> dict[str, float]:
    """p50/p90/p99/mean/min in milliseconds."""
    ms = np.asarray(seconds, dtype=np.float64) * 1e3
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return {
        "latency_p50_ms": round(float(p50), 4),
        "latency_p90_ms": round(float(p90), 4),
        "latency_p99_ms": round(float(p99), 4),
        "latency_mean_ms": round(float(ms.mean()), 4),
        "latency_min_ms": round(float(ms.min()), 4),
    }


def rss_bytes() -> int:
    """Resident set size of this process now (Linux /proc; ru_maxrss elsewhere, a high-water mark)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class MemoryProbe:
    """What one variant adds to memory: its build, plus the growth of its calls (arenas, activations).

    CPU: process RSS deltas. CUDA: torch's allocator peak for torch-run variants, and the device's used
    memory (mem_get_info) for ONNX Runtime / TensorRT, whose allocations torch cannot see.
    """

    def __init__(self, device: str, torch_allocator: bool = True):
        self.cuda = device == "cuda"
        self.torch_allocator = torch_allocator
        self.kind = (
            ("cuda-allocated" if torch_allocator else "cuda-device-delta") if self.cuda else "rss-delta"
        )
        self.base = 0
        self.peak = 0

    def _now(self) -> int:
        if not self.cuda:
            return rss_bytes()
        if self.torch_allocator:
            return torch.cuda.memory_allocated()
        free, total = torch.cuda.mem_get_info()
        return total - free

    def begin(self) -> int:
        if self.cuda and self.torch_allocator:
            torch.cuda.reset_peak_memory_stats()
        return self._now()

    def end(self, before: int) -> int:
        if self.cuda and self.torch_allocator:
            torch.cuda.synchronize()
            return max(0, torch.cuda.max_memory_allocated() - before)
        return max(0, self._now() - before)

    def add_build(self, delta: int) -> None:
        self.base += delta

    def add_call(self, delta: int) -> None:
        # On CPU, arenas persist and grow: call deltas add up. On CUDA a call's peak is transient.
        self.peak = self.peak + delta if not (self.cuda and self.torch_allocator) else max(self.peak, delta)

    @property
    def total_mb(self) -> float:
        return round((self.base + self.peak) / 2**20, 2)


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), model)
    except OSError:
        pass
    return f"{model} x{os.cpu_count()}"


def load_average() -> float | None:
    """The machine's 1-minute load average (runnable work, ours only as far as it has run: a bench reads it
    before measuring anything); None where the OS keeps none."""
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        from vlexport.errors import MissingToolchain

        raise MissingToolchain("--device cuda: torch sees no CUDA device on this machine (use --device cpu).")
    return device
