"""Whether a CPU static-cache decoder package freezes its weights: measured on the machine that compiles it.

Unfrozen, Inductor calls aten's linear with the weights as package inputs; on x86 torch wheels that is
MKL's sgemm. Frozen (``freezing=True``), the weights become constants that Inductor packs for oneDNN
(``mkldnn._linear_pointwise``; AOT compiles never take MKL's packed path, whose buffers cannot move). Which
is faster at a decode step's few rows depends on the CPU, both ways:

- AMD EPYC, 2 cores, AVX-512 (MKL takes its generic path on AMD): 768 x 3072 at 8 rows, aten 0.65 ms,
  oneDNN 0.21 ms; freezing took blip-image-captioning-base's AOTI decode from 0.61x to 1.20x the ORT
  loop's speed at batch 8 and from 0.51x to 0.80x at batch 1;
- Intel Xeon with AMX: freezing cost batch 1 (0.80x -> 0.66x) and gained batch 8 (0.51x -> 0.69x)
  (benchmarks/results/generation_compiled_cpu-modes.json).

So ``--freeze auto`` times both at the decoder's own Linear shapes, at 1 row and at ``max_batch`` rows, each
shape weighted by how many Linears have it, and freezes when oneDNN's total is lower. The package metadata
records the times (export/aoti.py).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

FREEZE_CHOICES = ("auto", "yes", "no")
REPS = 5


@dataclass(frozen=True)
class FreezeChoice:
    freeze: bool
    how: str  # "measured" | "asked" (--freeze yes/no) | why it was not measured
    rows: tuple[int, ...] = ()
    aten_ms: float | None = None  # one decode step's Linears at each of ``rows``, summed
    onednn_ms: float | None = None

    def as_dict(self) -> dict[str, object]:
        return {k: v for k, v in asdict(self).items() if v not in (None, ())}


def choose_freezing(asked: str, module: nn.Module, rows: Sequence[int]) -> FreezeChoice:
    """The choice for ``--freeze asked`` (auto / yes / no) for a decoder whose steps run ``rows`` rows."""
    if asked not in FREEZE_CHOICES:
        raise ValueError(f"freeze must be one of {FREEZE_CHOICES}, got {asked!r}")
    if asked != "auto":
        return FreezeChoice(asked == "yes", "asked")
    if not (torch.backends.mkldnn.enabled and torch.backends.mkldnn.is_available()):
        return FreezeChoice(False, "this torch has no oneDNN: nothing to pack for")
    counts: Counter[tuple[int, int]] = Counter()  # (in, out) -> Linears of that shape (a tied head counts)
    weights: dict[tuple[int, int], torch.Tensor] = {}  # one weight per shape to time
    for m in module.modules():
        if isinstance(m, nn.Linear) and m.weight.dtype == torch.float32:
            counts[m.in_features, m.out_features] += 1
            weights.setdefault((m.in_features, m.out_features), m.weight.detach())
    if not weights:
        return FreezeChoice(False, "no fp32 Linear to measure")
    aten = onednn = 0.0
    for shape, weight in weights.items():
        for m in rows:
            x = torch.randn(m, shape[0])
            a, o = _times(x, weight)
            aten, onednn = aten + counts[shape] * a, onednn + counts[shape] * o
    return FreezeChoice(onednn < aten, "measured", tuple(rows), round(aten * 1e3, 3), round(onednn * 1e3, 3))


def _times(x: torch.Tensor, weight: torch.Tensor) -> tuple[float, float]:
    """Best seconds of aten's linear and of oneDNN's over a packed copy of ``weight``, interleaved."""
    with torch.no_grad():
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, x.shape[0])
        calls: list[Callable[[], object]] = [
            lambda: torch.nn.functional.linear(x, weight),
            lambda: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], ""),
        ]
        best = [float("inf")] * len(calls)
        for call in calls:
            call()  # warm-up: kernel selection, first touch
        for _ in range(REPS):
            for i, call in enumerate(calls):
                t0 = time.perf_counter()
                call()
                best[i] = min(best[i], time.perf_counter() - t0)
    return best[0], best[1]
