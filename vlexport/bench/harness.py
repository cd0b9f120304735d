"""The benchmark run: build each variant, check parity on the benchmark's own inputs, time them interleaved.

Variants of one (model, task) are measured round-robin in one process (A B C, B C A, ...) so machine
noise hits all alike; speed-ups are ratios to eager fp32 taken in the same rounds. A variant that
misses parity against eager fp32 is reported as failed and not timed: it is never reported as fast.
Encoder and generation tasks go through the same loop (measure.measure_shape); variants come from
backends.build_variant (the bench's torch runners, or any registered export backend).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from vlexport.bench.measure import Live, Progress, measure_shape, one_line
from vlexport.bench.peaks import machine_peaks, peak_kind
from vlexport.bench.rows import ERROR, BenchRow, fill_peak_fractions, fill_speedups, now
from vlexport.bench.timing import device_name, load_average, resolve_device
from vlexport.bench.variants import (
    BenchContext,
    Variant,
    build_variant,
    check_backends,
    given_artifact_variant,
)
from vlexport.bench.work import decode_shape, encoder_work, step_bytes, storage_bytes
from vlexport.contracts.backends import canonical_name
from vlexport.contracts.manifest import Manifest, library_versions
from vlexport.contracts.precision import Fp32Config, PrecisionConfig, get_precision
from vlexport.errors import UsageError
from vlexport.models.inputs import InputShape, image_size

if TYPE_CHECKING:
    from vlexport.weights import ModelSource


__all__ = ["BenchPlan", "NoProgress", "Progress", "run_bench"]

# Peaks are measured before the first model loads and, when the run took longer than this, again after
# the last row (each kind keeps the better value: load on a shared machine only lowers a measurement).
PEAKS_AGAIN_AFTER_S = 60.0


class NoProgress:
    def start(self, total: int) -> None: ...
    def advance(self, n: int = 1) -> None: ...
    def message(self, text: str) -> None: ...


@dataclass
class BenchPlan:
    """One `vlexport bench` invocation (or one case of a suite)."""

    models: tuple[str, ...]  # presets, local model dirs, or artifact dirs (with manifest.json)
    backends: tuple[str, ...] = ("eager", "onnx")
    # names, as the CLI or a suite file spells them (configs: .configs)
    precisions: tuple[str, ...] = ("fp32",)
    batch_sizes: tuple[int, ...] = (1, 8, 32)
    seq_len: int = 32
    warmup: int = 3
    iters: int = 20
    task: str | None = None
    random_weights: bool = False
    allow_new_weights: tuple[str, ...] = ()  # checkpoint tensors that may be fresh (weights.load_model)
    seed: int = 0
    kernels: tuple[str, ...] = ()
    device: str = "auto"
    threads: int | None = None
    compile_mode: str = "default"
    work_dir: Path | None = None  # None: a temp dir, removed at the end
    new_tokens: int = 16  # generation benchmarks: fixed number of decoded tokens per sample

    def __post_init__(self) -> None:
        self.models = tuple(self.models)
        # One name per backend in rows: earlier spellings (trt) become the registered name.
        self.backends = tuple(dict.fromkeys(canonical_name(b) for b in self.backends))
        # The names enter the program here (the CLI's --precision, a suite file): resolved once (UsageError).
        self.configs: tuple[PrecisionConfig, ...] = tuple(
            {c.name: c for c in map(get_precision, self.precisions)}.values()
        )
        self.precisions = tuple(c.name for c in self.configs)
        self.batch_sizes = tuple(self.batch_sizes)
        if not self.models:
            raise UsageError(
                "Name at least one model, preset or artifact directory to benchmark (or --suite)."
            )
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
    source: ModelSource
    artifacts: list[Path] = field(default_factory=list)


def run_bench(plan: BenchPlan, progress: Progress | None = None) -> list[BenchRow]:
    """Run every group of the plan; return rows with speed-ups filled in."""
    progress = progress or NoProgress()
    device = resolve_device(plan.device)
    check_backends(plan.backends, plan.configs, device)
    before = torch.get_num_threads()
    threads = plan.threads or before
    rows: list[BenchRow] = []
    groups = _plan_groups(plan)
    progress.start(sum(_steps(plan, g) for g in groups))
    torch.set_num_threads(threads)
    load = load_average()  # before this run's own work: what else wants the cores
    try:
        progress.message(f"measuring this machine's GEMM and memory peaks ({threads} thread(s))")
        machine_peaks(device, threads)  # before any model loads: the machine as the rows will find it
        with _work_dir(plan.work_dir) as work:
            for group in groups:
                rows += _run_group(plan, group, device, threads, work, progress)
        peaks = machine_peaks(device, threads, again_after_s=PEAKS_AGAIN_AFTER_S)  # a long run: best of two
    finally:
        torch.set_num_threads(before)  # the caller's setting, not ours, after the run
    for r in rows:
        found = peaks.get(r.peak_kind)
        r.peak_value = found.value if found else None
        r.load_average = load
    fill_speedups(rows)
    fill_peak_fractions(rows)
    return rows


def _run_group(
    plan: BenchPlan, group: Group, device: str, threads: int, work: Path, progress: Progress
) -> list[BenchRow]:
    from vlexport.weights import load_model

    progress.message(f"loading {group.name} ({group.task})")
    model = load_model(group.source, group.task)
    ctx = _context(plan, group, model, device, threads, work, progress)
    vision = getattr(model.config, "vision_config", None)
    common = {
        "model": group.name,
        "task": group.task,
        "seq_len": plan.seq_len,
        "image_size": image_size(vision) if vision is not None else None,
        "device": device_name(device),
        "device_kind": device,
        "threads": threads,
        "warmup": plan.warmup,
        "iters": plan.iters,
        "versions": library_versions(),
        "timestamp": now(),
    }
    if ctx.generative:
        common.update(new_tokens=plan.new_tokens, throughput_unit="tokens/s")

    live: list[Live] = []
    failed: list[BenchRow] = []
    try:
        for backend, precision, kernels, build in _variant_builders(plan, group, ctx):
            progress.message(f"building {backend} {precision.name}")
            try:
                variant = build()
            except UsageError:
                raise  # asked for something impossible here (no TensorRT, fp16 ONNX...): say so, do not guess
            except Exception as e:  # noqa: BLE001  a backend that fails to build is a failed row, not a crash
                failed += [
                    BenchRow(
                        **common,
                        backend=backend,
                        precision=precision.name,
                        kernels=",".join(kernels),
                        batch=b,
                        status=ERROR,
                        detail=f"build failed: {one_line(e)}",
                    )
                    for b in plan.batch_sizes
                ]
                progress.advance(len(plan.batch_sizes) * (1 + plan.warmup + plan.iters))
                continue
            is_reference = not live and backend == "eager" and precision.name == "fp32" and not kernels
            # it owns the loaded weights (an RSS delta of loading depends on the process's past)
            if is_reference:
                variant.memory.add_build(
                    sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
                )
            live.append(Live(variant, reference=is_reference))
        for batch in plan.batch_sizes:
            measure_shape(
                ctx,
                batch,
                live,
                common,
                warmup=plan.warmup,
                iters=plan.iters,
                seed=plan.seed,
                progress=progress,
            )
            _record_work(ctx, batch, live, plan.seed, progress)
    finally:  # also when a later variant is refused: injected kernels come out of the shared model
        for lv in live:
            lv.variant.close()
    # shape-major, like a table
    ordered = [lv.rows[b] for b in plan.batch_sizes for lv in live if b in lv.rows]
    return ordered + failed


def _record_work(ctx: BenchContext, batch: int, live: list[Live], seed: int, progress: Progress) -> None:
    """The work of one call at ``batch`` (counted once for all variants) and the peak each row is judged
    by."""
    rows = [(lv.variant.precision, lv.rows[batch]) for lv in live if batch in lv.rows and lv.rows[batch].ok]
    if not rows:
        return
    progress.message(f"{ctx.task} b{batch}: counting the work of one call")
    inputs = ctx.task_spec.make_inputs(ctx.model.config, InputShape(batch, ctx.seq_len), seed + 1000 + batch)
    try:
        if ctx.generative:
            prompt = inputs["input_ids"].shape[1] if "input_ids" in inputs else 0
            shape = decode_shape(
                ctx.model, ctx.task_spec.components(ctx.model.config), batch, prompt, ctx.new_tokens, seed
            )
        else:
            work = encoder_work(ctx.model, (ctx.component,), inputs)
    # counting is information: a model the counter cannot run keeps its timings
    except Exception as e:  # noqa: BLE001
        for _, row in rows:
            row.detail = "; ".join(filter(None, [row.detail, f"work not counted: {one_line(e)}"]))
        return
    for precision, row in rows:
        row.peak_kind = peak_kind(precision, ctx.generative)
        if not ctx.generative:
            row.work_flops, row.work_flops_by_component = work.flops, dict(work.flops_by_component)
        elif shape is not None:
            weight, activation = storage_bytes(precision)
            row.work_bytes_per_step = step_bytes(shape, weight_bytes=weight, activation_bytes=activation)


def _context(
    plan: BenchPlan, group: Group, model: Any, device: str, threads: int, work: Path, progress: Progress
) -> BenchContext:
    """The one context of a group, for every variant (encoder or generation, runner or export backend)."""
    task_spec = group.source.family.task(group.task)
    components = task_spec.components(model.config)
    return BenchContext(
        model_name=group.model_arg or group.name,
        source=group.source,
        task=group.task,
        task_spec=task_spec,
        model=model,
        component=None if task_spec.generative else components[0],
        device=device,
        threads=threads,
        work_dir=work,
        random_weights=group.source.origin.get("kind") == "random",
        allow_new_weights=tuple(plan.allow_new_weights),
        seed=plan.seed,
        kernels=tuple(plan.kernels),
        compile_mode=plan.compile_mode,
        batch_sizes=plan.batch_sizes,
        seq_len=plan.seq_len,
        new_tokens=plan.new_tokens,
        progress=progress.message,
    )


def _variant_builders(
    plan: BenchPlan, group: Group, ctx: BenchContext
) -> Iterator[tuple[str, PrecisionConfig, tuple[str, ...], Callable[[], Variant]]]:
    """(backend, precision, kernels, build) in run order; the eager fp32 reference always comes first."""
    ref_ctx = replace(ctx, kernels=())
    yield "eager", Fp32Config(), (), lambda: build_variant(ref_ctx, "eager", Fp32Config())
    if group.model_arg is not None:
        for backend in plan.backends:
            for precision in plan.configs:
                if backend == "eager" and precision.name == "fp32" and not ctx.kernels:
                    continue  # that is the reference
                yield (
                    backend,
                    precision,
                    ctx.kernels,
                    (lambda b=backend, p=precision: build_variant(ctx, b, p)),
                )
    for directory in group.artifacts:
        manifest = Manifest.read(directory)
        kernels = tuple(sorted(k.split(":")[0] for k in manifest.kernels))
        yield (
            manifest.backend,
            manifest.precision_config,
            kernels,
            lambda d=directory: given_artifact_variant(ctx, d),
        )


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
        source = resolve(
            arg,
            random_weights=plan.random_weights,
            seed=plan.seed,
            allow_new_weights=tuple(plan.allow_new_weights),
        )
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
    _check_variant_options(plan, groups, artifacts)
    return groups


def _check_variant_options(plan: BenchPlan, groups: list[Group], artifacts: list[Path]) -> None:
    """--backends / --precisions build variants of presets and model directories; given only artifacts (each
    benchmarked as it is, beside eager), a non-default value would be ignored: a usage error instead."""
    if any(g.model_arg is not None for g in groups):
        return
    fields = BenchPlan.__dataclass_fields__
    ignored = [
        f"{flag} {','.join(getattr(plan, name))}"
        for name, flag in (("backends", "--backends"), ("precisions", "--precision"))
        if tuple(getattr(plan, name)) != fields[name].default
    ]
    if ignored:
        have = ", ".join(
            sorted({f"{Manifest.read(a).backend} {Manifest.read(a).precision}" for a in artifacts})
        )
        raise UsageError(
            f"{' and '.join(ignored)} would be ignored: every MODEL given is an artifact directory "
            f"({have}), benchmarked as it is beside eager. Drop the option, or pass the preset or model "
            "directory to build those variants (or artifact directories of those backends)."
        )


def _key(origin: dict[str, Any], task: str) -> str:
    return json.dumps([origin, task], sort_keys=True, default=str)


def _steps(plan: BenchPlan, group: Group) -> int:
    n_variants = (
        1 + len(group.artifacts) + (len(plan.backends) * len(plan.precisions) if group.model_arg else 0)
    )
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
