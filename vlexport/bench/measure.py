"""One shape of one (model, task) group: first calls and parity, warm-up, then interleaved timed calls.

The same loop for every variant, encoder or generation: the first call of each is checked against the
eager fp32 reference on the same inputs (a miss is reported and never timed), then the survivors are
warmed up and timed round-robin with a rotating start (A B C, B C A, ...) so machine noise hits all
alike. Generative variants' calls return per-token stamps, which give prefill and decode times.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from vlexport.bench.generation import generation_stats, token_parity
from vlexport.bench.rows import ERROR, FAILED_PARITY, OK, BenchRow
from vlexport.bench.timing import Clock, latency_stats
from vlexport.bench.variants import BenchContext, Variant
from vlexport.contracts.precision import PrecisionConfig
from vlexport.errors import VlexportError
from vlexport.models.inputs import InputShape
from vlexport.validate.outputs import DEGENERATE_STD, compare_output

# A p90 this many times the p50 means the machine interfered (other load, a descheduled vCPU): say so.
NOISY_P90 = 3.0


class Progress(Protocol):
    def start(self, total: int) -> None: ...
    def advance(self, n: int = 1) -> None: ...
    def message(self, text: str) -> None: ...


@dataclass
class Live:
    """A built variant through the shapes of a run."""

    variant: Variant
    reference: bool = False  # the eager fp32 reference: parity baseline for the others
    rows: dict[int, BenchRow] = field(default_factory=dict)  # batch -> row
    first_calls: float = 0.0


def measure_shape(
    ctx: BenchContext,
    batch: int,
    live: list[Live],
    common: dict[str, Any],
    *,
    warmup: int,
    iters: int,
    seed: int,
    progress: Progress,
) -> None:
    """Fill ``live[i].rows[batch]`` for every variant at ``batch`` x ``ctx.seq_len``."""
    shape = InputShape(batch, ctx.seq_len)
    progress.message(f"{ctx.task} {shape}: first calls and parity")
    inputs = ctx.task_spec.make_inputs(ctx.model.config, shape, seed + 1000 + batch)
    clock = Clock(ctx.device)
    per_call = batch * (ctx.new_tokens if ctx.generative else 1)  # samples, or tokens for generation
    reference: dict[str, np.ndarray] | None = None
    active: list[tuple[Live, Any]] = []
    for lv in live:
        v = lv.variant
        row = BenchRow(
            **common,
            backend=v.backend,
            precision=v.precision.name,
            kernels=",".join(v.kernels),
            batch=batch,
            memory_kind=v.memory.kind,
            detail=v.note,
        )
        lv.rows[batch] = row
        try:
            prepared = v.prepare(inputs)
            before = v.memory.begin()
            raw, first = clock.measure(v.call, prepared)
            v.memory.add_call(v.memory.end(before))
            got = v.outputs(raw)
        except Exception as e:  # noqa: BLE001  a variant that fails to run is a failed row, not a crash
            row.status, row.detail = ERROR, f"run failed: {one_line(e)}"
            progress.advance(1 + warmup + iters)
            continue
        row.first_call_s = round(first, 4)
        lv.first_calls += first
        row.build_s = round(v.build_s + (lv.first_calls if v.jit else 0.0), 3)
        if lv.reference:
            reference = got
        row.status, row.parity, detail = parity(got, reference, v.precision, ctx)
        row.detail = "; ".join(filter(None, [v.note, detail]))
        progress.advance(1)
        if row.status != OK:
            progress.advance(warmup + iters)
            continue
        active.append((lv, prepared))

    progress.message(f"{ctx.task} {shape}: warm-up")
    for _ in range(warmup):
        for lv, prepared in active:
            lv.variant.call(prepared)
            progress.advance(1)
    times: dict[int, list[float]] = {id(lv): [] for lv, _ in active}
    stamps: dict[int, list[Any]] = {id(lv): [] for lv, _ in active}
    progress.message(f"{ctx.task} {shape}: timing {len(active)} variant(s) interleaved")
    for i in range(iters):
        k = i % max(1, len(active))
        for lv, prepared in active[k:] + active[:k]:  # rotate the start so no variant always runs first
            raw, seconds = clock.measure(lv.variant.call, prepared)
            times[id(lv)].append(seconds)
            if ctx.generative:
                stamps[id(lv)].append(raw)
            progress.advance(1)
    for lv, _ in active:
        _fill(lv.rows[batch], times[id(lv)], stamps[id(lv)], per_call, lv.variant)


def _fill(row: BenchRow, seconds: list[float], stamps: list[Any], per_call: int, variant: Variant) -> None:
    for key, value in latency_stats(seconds).items():
        setattr(row, key, value)
    if stamps:
        for key, value in generation_stats(stamps).items():
            setattr(row, key, value)
    row.throughput = round(per_call / (row.latency_p50_ms / 1e3), 3)
    row.peak_memory_mb = variant.memory.total_mb
    if row.latency_p90_ms > NOISY_P90 * row.latency_p50_ms:
        row.detail = "; ".join(filter(None, [row.detail, f"noisy: p90 > {NOISY_P90:g}x p50 (machine load?)"]))


def parity(
    got: dict[str, np.ndarray],
    ref: dict[str, np.ndarray] | None,
    precision: PrecisionConfig,
    ctx: BenchContext,
) -> tuple[str, dict[str, Any], str]:
    """(status, per-output report, detail) of one variant's first call against eager fp32."""
    if ctx.generative:
        return token_parity(got["tokens"], None if ref is None else ref["tokens"], precision)
    if ref is None:
        return ERROR, {}, "the eager fp32 reference failed: no parity baseline"
    return output_parity(got, ref, precision, ctx.task_spec.agreement.get)


def output_parity(
    got: dict[str, np.ndarray],
    ref: dict[str, np.ndarray],
    precision: PrecisionConfig,
    agreement: Callable[[str], str | None],
) -> tuple[str, dict[str, Any], str]:
    """Per-output errors with validation's comparison and the precision's tolerance."""
    tol = precision.tolerance
    report: dict[str, Any] = {}
    misses = []
    for name, r in ref.items():
        check = compare_output(name, "bench", got.get(name), r, tol, agreement(name))
        report[name] = {
            k: v
            for k, v in (
                ("kind", check.kind),
                ("max_abs", check.max_abs),
                ("max_rel", check.max_rel),
                ("cosine", check.cosine),
                ("agreement", check.agreement),
            )
            if v is not None
        }
        if not check.passed:
            measured = check.detail or ", ".join(
                f"{k} {v:.5f}"
                for k, v in (("cosine", check.cosine), ("agreement", check.agreement_with_near_ties))
                if v is not None
            )
            misses.append(f"{name}: {check.kind} {measured} (limit {check.limit or '-'})")
    flat = np.concatenate([r.astype(np.float64).ravel() for r in ref.values()]) if ref else np.zeros(0)
    if flat.size > 1 and flat.std() < DEGENERATE_STD:
        misses.append(
            f"reference outputs are ~constant (std < {DEGENERATE_STD:g}): parity would pass trivially"
        )
    return (FAILED_PARITY if misses else OK), report, "; ".join(misses)


def one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    kind = "" if isinstance(e, VlexportError) else f"{type(e).__name__}: "
    return f"{kind}{text}"[:300]
