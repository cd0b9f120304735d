"""The benchmark run: build each variant, check parity on the benchmark's own inputs, time them interleaved.

Variants of one (model, task) are measured round-robin in one process (A B C, B C A, ...) so machine
noise hits all alike; speed-ups are ratios to eager fp32 taken in the same rounds. A variant that
misses parity against eager fp32 is reported as failed and not timed: it is never reported as fast.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from vlexport.bench import backends as B
from vlexport.bench.rows import ERROR, FAILED_PARITY, OK, BenchRow, fill_speedups, now
from vlexport.bench.timing import Clock, device_name, latency_stats, resolve_device
from vlexport.errors import UsageError, VlexportError
from vlexport.manifest import Manifest, library_versions
from vlexport.models.inputs import InputShape, image_size
from vlexport.validate import DEGENERATE_STD, TOLERANCES, compare_output


# A p90 this many times the p50 means the machine interfered (other load, a descheduled vCPU): say so.
NOISY_P90 = 3.0


class Progress(Protocol):
    def start(self, total: int) -> None: ...
    def advance(self, n: int = 1) -> None: ...
    def message(self, text: str) -> None: ...


class NoProgress:
    def start(self, total: int) -> None: ...
    def advance(self, n: int = 1) -> None: ...
    def message(self, text: str) -> None: ...


@dataclass
class BenchPlan:
    """One `vlexport bench` invocation (or one case of a suite)."""

    models: tuple[str, ...]  # presets, local model dirs, or artifact dirs (with manifest.json)
    backends: tuple[str, ...] = ("eager", "onnx")
    precisions: tuple[str, ...] = ("fp32",)
    batch_sizes: tuple[int, ...] = (1, 8, 32)
    seq_len: int = 32
    warmup: int = 3
    iters: int = 20
    task: str | None = None
    random_weights: bool = False
    seed: int = 0
    kernels: tuple[str, ...] = ()
    device: str = "auto"
    threads: int | None = None
    compile_mode: str = "default"
    work_dir: Path | None = None  # None: a temp dir, removed at the end
    new_tokens: int = 16  # generation benchmarks: fixed number of decoded tokens per sample

    def __post_init__(self) -> None:
        self.models, self.backends = tuple(self.models), tuple(self.backends)
        self.precisions, self.batch_sizes = tuple(self.precisions), tuple(self.batch_sizes)
        if not self.models:
            raise UsageError("Name at least one model, preset or artifact directory to benchmark (or --suite).")
        bad = [p for p in self.precisions if p not in TOLERANCES]
        if bad:
            raise UsageError(f"Unknown precision(s) {bad}: choose from {', '.join(TOLERANCES)}.")
        if not self.batch_sizes or min(self.batch_sizes) < 1 or self.seq_len < 1:
            raise UsageError("--batch-sizes and --seq-len take positive integers.")
        if self.iters < 1 or self.warmup < 0 or self.new_tokens < 1:
            raise UsageError("--iters and --new-tokens must be >= 1 and --warmup >= 0.")
        self.work_dir = Path(self.work_dir) if self.work_dir is not None else None


@dataclass
class Group:
    """Variants sharing one eager reference: a model with --backends, plus artifact dirs made from it."""

    name: str
    model_arg: str | None  # preset / model dir, when variants are to be built
    task: str
    source: Any
    artifacts: list[Path] = field(default_factory=list)


def run_bench(plan: BenchPlan, progress: Progress | None = None) -> list[BenchRow]:
    """Run every group of the plan; return rows with speed-ups filled in."""
    progress = progress or NoProgress()
    B.check_backends(plan.backends)
    device = resolve_device(plan.device)
    before = torch.get_num_threads()
    threads = plan.threads or before
    rows: list[BenchRow] = []
    groups = _plan_groups(plan)
    progress.start(sum(_steps(plan, g) for g in groups))
    torch.set_num_threads(threads)
    try:
        with _work_dir(plan.work_dir) as work:
            for group in groups:
                rows += _run_group(plan, group, device, threads, work, progress)
    finally:
        torch.set_num_threads(before)  # the caller's setting, not ours, after the run
    fill_speedups(rows)
    return rows


@dataclass
class _Live:
    variant: B.Variant
    reference: bool = False  # the eager fp32 reference: parity baseline for the others
    rows: dict[int, BenchRow] = field(default_factory=dict)  # batch -> row
    first_calls: float = 0.0


def _run_group(plan: BenchPlan, group: Group, device: str, threads: int, work: Path,
               progress: Progress) -> list[BenchRow]:
    from vlexport.weights import load_model

    progress.message(f"loading {group.name} ({group.task})")
    model = load_model(group.source, group.task)
    task_spec = group.source.family.task(group.task)
    if task_spec.generative:
        from vlexport.bench.generation import run_generation_group

        return run_generation_group(plan, group, model, device, threads, work, progress)
    (component,) = task_spec.components(model.config)
    ctx = B.BenchContext(model_name=group.model_arg or group.name, source=group.source, task=group.task,
                         task_spec=task_spec, model=model, component=component, device=device, threads=threads,
                         work_dir=work, random_weights=group.source.origin.get("kind") == "random",
                         seed=plan.seed, kernels=tuple(plan.kernels), compile_mode=plan.compile_mode,
                         batch_sizes=plan.batch_sizes, seq_len=plan.seq_len, progress=progress.message)
    vision = getattr(model.config, "vision_config", None)
    common = dict(model=group.name, task=group.task, seq_len=plan.seq_len,
                  image_size=image_size(vision) if vision is not None else None, device=device_name(device),
                  device_kind=device, threads=threads, warmup=plan.warmup, iters=plan.iters,
                  versions=library_versions(), timestamp=now())

    live: list[_Live] = []
    failed: list[BenchRow] = []
    for backend, precision, kernels, build in _variant_builders(plan, group, ctx):
        progress.message(f"building {backend} {precision}")
        try:
            variant = build()
        except UsageError:
            raise  # asked for something impossible here (no TensorRT, fp16 ONNX...): say so, do not guess
        except Exception as e:  # a backend that fails to build is a failed row, not a crashed run
            failed += [BenchRow(**common, backend=backend, precision=precision, kernels=",".join(kernels),
                                batch=b, status=ERROR, detail=f"build failed: {_one_line(e)}")
                       for b in plan.batch_sizes]
            progress.advance(len(plan.batch_sizes) * (1 + plan.warmup + plan.iters))
            continue
        is_reference = not live and backend == "eager" and precision == "fp32" and not kernels
        if is_reference:  # it owns the loaded weights (an RSS delta of loading depends on the process's past)
            variant.memory.add_build(sum(t.numel() * t.element_size() for t in (*model.parameters(),
                                                                                 *model.buffers())))
        live.append(_Live(variant, reference=is_reference))
    try:
        for batch in plan.batch_sizes:
            _measure_shape(plan, ctx, batch, live, common, progress)
    finally:
        for lv in live:
            lv.variant.close()
    ordered = [lv.rows[b] for b in plan.batch_sizes for lv in live if b in lv.rows]  # shape-major, like a table
    return ordered + failed


def _variant_builders(plan: BenchPlan, group: Group, ctx: B.BenchContext) -> Iterator[tuple]:
    """(backend, precision, kernels, build) in run order; the eager fp32 reference always comes first."""
    ref_ctx = replace(ctx, kernels=())
    yield "eager", "fp32", (), lambda: B.build_eager(ref_ctx, "fp32")
    if group.model_arg is not None:
        for backend in plan.backends:
            for precision in plan.precisions:
                if backend == "eager" and precision == "fp32" and not ctx.kernels:
                    continue  # that is the reference
                yield backend, precision, ctx.kernels, (lambda b=backend, p=precision: B.BACKENDS[b](ctx, p))
    for directory in group.artifacts:
        manifest = Manifest.read(directory)
        kernels = tuple(sorted(k.split(":")[0] for k in manifest.kernels))
        yield B.artifact_label(manifest), manifest.precision, kernels, (
            lambda d=directory: B.load_artifact_variant(ctx, d))


def _measure_shape(plan: BenchPlan, ctx: B.BenchContext, batch: int, live: list[_Live], common: dict,
                   progress: Progress) -> None:
    shape = InputShape(batch, plan.seq_len)
    progress.message(f"{ctx.task} {shape}: first calls and parity")
    inputs = ctx.task_spec.make_inputs(ctx.model.config, shape, plan.seed + 1000 + batch)
    clock = Clock(ctx.device)
    reference: dict[str, np.ndarray] | None = None
    active: list[tuple[_Live, Any]] = []
    for lv in live:
        v = lv.variant
        row = BenchRow(**common, backend=v.backend, precision=v.precision, kernels=",".join(v.kernels), batch=batch,
                       memory_kind=v.memory.kind, detail=v.note)
        lv.rows[batch] = row
        try:
            prepared = v.prepare(inputs)
            before = v.memory.begin()
            raw, first = clock.measure(v.step, prepared)
            v.memory.add_call(v.memory.end(before))
            got = v.outputs(raw)
        except Exception as e:
            row.status, row.detail = ERROR, f"run failed: {_one_line(e)}"
            progress.advance(1 + plan.warmup + plan.iters)
            continue
        row.first_call_s = round(first, 4)
        lv.first_calls += first
        row.build_s = round(v.build_s + (lv.first_calls if v.jit else 0.0), 3)
        if lv.reference:
            reference = got
        if reference is None:
            row.status, row.detail = ERROR, "the eager fp32 reference failed: no parity baseline"
            progress.advance(plan.warmup + plan.iters)
            continue
        row.status, row.parity, detail = _parity(got, reference, v.precision, ctx)
        row.detail = "; ".join(filter(None, [v.note, detail]))
        progress.advance(1)
        if row.status != OK:
            progress.advance(plan.warmup + plan.iters)
            continue
        active.append((lv, prepared))

    progress.message(f"{ctx.task} {shape}: warm-up")
    for _ in range(plan.warmup):
        for lv, prepared in active:
            lv.variant.step(prepared)
            progress.advance(1)
    times: dict[int, list[float]] = {id(lv): [] for lv, _ in active}
    progress.message(f"{ctx.task} {shape}: timing {len(active)} variant(s) interleaved")
    for i in range(plan.iters):
        k = i % max(1, len(active))
        for lv, prepared in active[k:] + active[:k]:  # rotate the start so no variant always runs first
            _, seconds = clock.measure(lv.variant.step, prepared)
            times[id(lv)].append(seconds)
            progress.advance(1)
    for lv, _ in active:
        row = lv.rows[batch]
        for key, value in latency_stats(times[id(lv)]).items():
            setattr(row, key, value)
        row.throughput = round(batch / (row.latency_p50_ms / 1e3), 3)
        row.peak_memory_mb = lv.variant.memory.total_mb
        if row.latency_p90_ms > NOISY_P90 * row.latency_p50_ms:
            row.detail = "; ".join(filter(None, [row.detail, f"noisy: p90 > {NOISY_P90:g}x p50 (machine load?)"]))


def _parity(got: dict[str, np.ndarray], ref: dict[str, np.ndarray], precision: str,
            ctx: B.BenchContext) -> tuple[str, dict[str, Any], str]:
    """Compare one variant's outputs with eager fp32 using validation's tolerance table."""
    tol = TOLERANCES[precision]
    report: dict[str, Any] = {}
    misses = []
    for name, r in ref.items():
        check = compare_output(name, "bench", got.get(name), r, tol, ctx.task_spec.agreement.get(name))
        report[name] = {k: v for k, v in (("kind", check.kind), ("max_abs", check.max_abs),
                                           ("max_rel", check.max_rel), ("cosine", check.cosine),
                                           ("agreement", check.agreement)) if v is not None}
        if not check.passed:
            misses.append(f"{name}: {check.kind} {check.detail} (limit {check.limit or '-'})".strip())
    flat = np.concatenate([r.astype(np.float64).ravel() for r in ref.values()]) if ref else np.zeros(0)
    if flat.size > 1 and flat.std() < DEGENERATE_STD:
        misses.append(f"reference outputs are ~constant (std < {DEGENERATE_STD:g}): parity would pass trivially")
    return (FAILED_PARITY if misses else OK), report, "; ".join(misses)


def _plan_groups(plan: BenchPlan) -> list[Group]:
    from vlexport.weights import resolve, source_from_manifest

    groups: list[Group] = []
    by_key: dict[str, Group] = {}
    artifacts = []
    for arg in plan.models:
        path = Path(arg)
        if (path / "manifest.json").is_file():
            artifacts.append(path)
            continue
        source = resolve(arg, random_weights=plan.random_weights, seed=plan.seed)
        task = source.check_task(plan.task)
        group = Group(arg, arg, task, source)
        groups.append(group)
        by_key[_key(source.origin, task)] = group
    for path in artifacts:
        manifest = Manifest.read(path)
        key = _key(manifest.weights, manifest.task)
        if key not in by_key:
            name = manifest.source.get("preset") or manifest.source.get("path") or path.name
            by_key[key] = Group(name, None, manifest.task, source_from_manifest(manifest, path))
            groups.append(by_key[key])
        by_key[key].artifacts.append(path)
    return groups


def _key(origin: dict[str, Any], task: str) -> str:
    return json.dumps([origin, task], sort_keys=True, default=str)


def _steps(plan: BenchPlan, group: Group) -> int:
    n_variants = 1 + len(group.artifacts) + (len(plan.backends) * len(plan.precisions) if group.model_arg else 0)
    if group.model_arg and "eager" in plan.backends and "fp32" in plan.precisions and not plan.kernels:
        n_variants -= 1
    return n_variants * len(plan.batch_sizes) * (1 + plan.warmup + plan.iters)


class _work_dir:
    """The user's --work-dir (kept, artifacts reused) or a temp dir removed afterwards."""

    def __init__(self, path: Path | None):
        self.path, self.tmp = path, None

    def __enter__(self) -> Path:
        if self.path is not None:
            self.path.mkdir(parents=True, exist_ok=True)
            return self.path
        self.tmp = tempfile.TemporaryDirectory(prefix="vlexport-bench-")
        return Path(self.tmp.name)

    def __exit__(self, *exc: object) -> None:
        if self.tmp is not None:
            self.tmp.cleanup()


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    kind = "" if isinstance(e, VlexportError) else f"{type(e).__name__}: "
    return f"{kind}{text}"[:300]
