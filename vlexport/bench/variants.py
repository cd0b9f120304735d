"""Benchmark variants: one type for every backend, encoders and generation alike.

A :class:`Variant` splits one call in three so only the backend's own work is timed: ``prepare``
(inputs to the backend's format and device, untimed), ``call`` (timed) and ``outputs`` (results to
numpy for the parity check, untimed). A generative variant's ``call`` returns a
:class:`~vlexport.bench.generation.GenerationTiming` (per-token stamps); its outputs are ``{"tokens": ...}``.

Where variants come from:

* the bench's own **runners**, in :data:`RUNNERS`: ``eager`` and ``compile`` run the torch module (no
  artifact). Tests add fakes with :func:`register_runner`;
* every other name is an **export backend** from the registry (vlexport.contracts.backends): the artifact is
  built with ``run_export`` into the work dir (or reused from there), loaded through the registry and
  called as the task needs: encoders component by component, generation through ``Generator``.
"""

from __future__ import annotations

import contextlib
import copy
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedModel

from vlexport.bench.generation import generator_call, hf_generate_call
from vlexport.bench.timing import MemoryProbe
from vlexport.contracts.backends import (
    Backend,
    ExportJob,
    backend_names,
    backend_options,
    canonical_name,
    get_backend,
)
from vlexport.contracts.family import ComponentSpec, TaskSpec
from vlexport.contracts.manifest import Manifest
from vlexport.contracts.passes import derivation
from vlexport.contracts.precision import Fp32Config, PrecisionConfig, precisions_for_backend
from vlexport.errors import UsageError
from vlexport.runtime import load_artifact
from vlexport.weights import ModelSource


@dataclass
class BenchContext:
    """Everything a variant may need; one per (model, task) group of a run."""

    model_name: str  # as the user gave it (preset or local dir): re-resolved by the exporter
    source: ModelSource
    task: str
    task_spec: TaskSpec
    model: PreTrainedModel  # eager fp32 on the CPU: the reference weights, shared where a variant can
    component: ComponentSpec | None  # the encoder's one component; None for generative tasks
    device: str  # cpu | cuda
    threads: int
    work_dir: Path  # where built artifacts go (kept and reused when the user names it)
    random_weights: bool = False
    allow_new_weights: tuple[str, ...] = ()
    seed: int = 0
    kernels: tuple[str, ...] = ()
    compile_mode: str = "default"
    batch_sizes: tuple[int, ...] = (1,)
    seq_len: int = 32
    new_tokens: int = 16  # generation: tokens decoded per sample
    progress: Callable[[str], None] = lambda msg: None

    @property
    def generative(self) -> bool:
        return self.task_spec.generative


@dataclass
class Variant:
    backend: str  # the row's backend: a runner name or the artifact's manifest.backend
    precision: PrecisionConfig
    prepare: Callable[[dict[str, torch.Tensor]], Any]
    call: Callable[[Any], Any]
    outputs: Callable[[Any], dict[str, np.ndarray]]
    memory: MemoryProbe
    kernels: tuple[str, ...] = ()
    build_s: float = 0.0
    jit: bool = False  # compiles on first call at each shape (torch.compile): build time = first calls
    note: str = ""
    close: Callable[[], None] = lambda: None


Runner = Callable[[BenchContext, PrecisionConfig], Variant]
RUNNERS: dict[str, Runner] = {}


def register_runner(name: str) -> Callable[[Runner], Runner]:
    """A bench-only runner ``(ctx, precision) -> Variant`` (no artifact); export backends go in the
    registry."""

    def wrap(fn: Runner) -> Runner:
        RUNNERS[name] = fn
        return fn

    return wrap


def check_backends(
    names: Sequence[str], precisions: Sequence[PrecisionConfig] = (Fp32Config(),), device: str = "cpu"
) -> None:
    """Every backend x precision the plan asks for can be built here: fail before any model loads or exports
    (a missing TensorRT, a precision a backend does not build), not after minutes of other variants."""
    from vlexport.pipeline import check_job

    known = (*RUNNERS, *backend_names())
    unknown = [n for n in names if n not in RUNNERS and canonical_name(n) not in backend_names()]
    if unknown:
        raise UsageError(
            f"Unknown backend(s) {unknown}: --backends takes a comma list of {', '.join(known)}."
        )
    for name in (n for n in names if n not in RUNNERS):  # runners check their precision when built
        for precision in precisions:
            options = {"device": device} if "device" in backend_options(get_backend(name)) else {}
            check_job(ExportJob("", None, backend=name, precision=precision, options=options))


def build_variant(ctx: BenchContext, name: str, precision: PrecisionConfig) -> Variant:
    """The variant of ``name`` at ``precision``: a runner, else an artifact of the registered export
    backend."""
    runner = RUNNERS.get(name)
    if runner is not None:
        return runner(ctx, precision)
    directory, build_s, note = build_artifact(ctx, name, precision)
    return artifact_variant(ctx, directory, build_s=build_s, note=note)


# ---------------------------------------------------------------- torch runners
def torch_dtype(name: str, precision: PrecisionConfig) -> torch.dtype:
    dtype = precision.torch_dtype
    if dtype is None:  # int8 schemes quantize weights: an export backend's job, not a cast
        raise UsageError(
            f"{precision.name} quantizes weights: export backends build it; the {name} runner casts "
            "to fp32, fp16 or bf16 only."
        )
    return dtype


def _check_runner(name: str, precision: PrecisionConfig) -> None:
    if not precision.applies_to(name):
        raise UsageError(
            f"The {name} runner runs {', '.join(precisions_for_backend(name))}, not {precision.name}."
        )


def _cast(t: torch.Tensor, dtype: torch.dtype, device: str | torch.device) -> torch.Tensor:
    # ids and masks keep their integer type
    return t.to(device, dtype) if t.is_floating_point() else t.to(device)


def _tensor_outputs(names: Sequence[str]) -> Callable[[Any], dict[str, np.ndarray]]:
    def outputs(raw: Sequence[torch.Tensor]) -> dict[str, np.ndarray]:
        return {n: t.detach().float().cpu().numpy() for n, t in zip(names, raw)}

    return outputs


def torch_variant(
    backend: str,
    module: nn.Module,
    ctx: BenchContext,
    precision: PrecisionConfig,
    *,
    device: str,
    kernels: tuple[str, ...] = (),
    build_s: float = 0.0,
    jit: bool = False,
    memory: MemoryProbe | None = None,
    close: Callable[[], None] = lambda: None,
) -> Variant:
    """An encoder component module (forward(*inputs) -> tuple) as a variant."""
    dtype = torch_dtype(backend, precision)
    names = ctx.component.inputs

    def prepare(inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        return tuple(_cast(inputs[n], dtype, device) for n in names)

    def call(args: tuple[torch.Tensor, ...]) -> Any:
        with torch.no_grad():
            return module(*args)

    return Variant(
        backend,
        precision,
        prepare,
        call,
        _tensor_outputs(ctx.component.outputs),
        memory or MemoryProbe(device),
        kernels,
        build_s,
        jit,
        close=close,
    )


def eager_model(
    ctx: BenchContext, precision: PrecisionConfig, kernels: tuple[str, ...]
) -> tuple[PreTrainedModel, Callable[[], None]]:
    """The eager HF model at ``precision`` on the context's device with ``kernels`` injected; returns a
    closer.

    fp32 on the CPU without kernels shares the reference weights; anything else works on a copy so the
    reference stays fp32, on the CPU and unpatched.
    """
    model = ctx.model
    if precision.name != "fp32" or ctx.device != "cpu" or kernels:
        model = copy.deepcopy(ctx.model).to(ctx.device, torch_dtype("eager", precision))
    if not kernels:
        return model, lambda: None
    from vlexport.inject import inject

    stack = contextlib.ExitStack()
    stack.enter_context(
        inject(
            model,
            ctx.source.family.injection,
            attention="attention" in kernels,
            bridge_norm="bridge" in kernels,
        )
    )
    return model, stack.close


def eager_module(
    ctx: BenchContext, precision: PrecisionConfig, kernels: tuple[str, ...]
) -> tuple[nn.Module, Callable[[], None]]:
    """The task's component wrapper over :func:`eager_model`."""
    model, close = eager_model(ctx, precision, kernels)
    return ctx.component.build(model).eval(), close


@register_runner("eager")
def run_eager(ctx: BenchContext, precision: PrecisionConfig) -> Variant:
    _check_runner("eager", precision)
    probe = MemoryProbe(ctx.device)
    before = probe.begin()
    start = time.perf_counter()
    if ctx.generative:  # HF generate() on the eager model, with per-token stamps
        model, close = eager_model(ctx, precision, ctx.kernels)
        dtype = torch_dtype("eager", precision)
        prepare, call, outputs = hf_generate_call(
            model, lambda x: _cast(x, dtype, ctx.device), ctx.new_tokens, ctx.device
        )
        variant = Variant(
            "eager",
            precision,
            prepare,
            call,
            outputs,
            probe,
            ctx.kernels,
            round(time.perf_counter() - start, 3),
            close=close,
        )
    else:
        module, close = eager_module(ctx, precision, ctx.kernels)
        variant = torch_variant(
            "eager",
            module,
            ctx,
            precision,
            device=ctx.device,
            kernels=ctx.kernels,
            build_s=time.perf_counter() - start,
            memory=probe,
            close=close,
        )
    probe.add_build(probe.end(before))
    return variant


@register_runner("compile")
def run_compile(ctx: BenchContext, precision: PrecisionConfig) -> Variant:
    _check_runner("compile", precision)
    if ctx.generative:
        # generate() runs the vision model and the decoder's own generate(): there is no one module to
        # compile.
        raise UsageError(
            "The compile runner benchmarks encoder tasks; generation tasks take eager and export "
            f"backends ({', '.join(backend_names())})."
        )
    from vlexport.export.aoti import jit_compile

    module, close = eager_module(ctx, precision, ctx.kernels)
    compiled = jit_compile(module, mode=ctx.compile_mode)
    return torch_variant(
        "compile", compiled, ctx, precision, device=ctx.device, kernels=ctx.kernels, jit=True, close=close
    )


# ---------------------------------------------------------------- export backends: artifacts in the work dir
def artifact_dir(ctx: BenchContext, backend: str, precision: PrecisionConfig) -> Path:
    kernels = f"-k{'-'.join(ctx.kernels)}" if ctx.kernels else ""
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(ctx.model_name).name)
    name = precision.name
    return ctx.work_dir / (f"{stem}-{ctx.task}-{backend}" + ("" if name == "fp32" else f"-{name}") + kernels)


def reusable(directory: Path, ctx: BenchContext, backend: str, precision: PrecisionConfig) -> Manifest | None:
    """An artifact already in the work dir for the same weights, task, backend, kernels and precision (name
    and knobs), or None."""
    if not (directory / "manifest.json").is_file():
        return None
    try:
        manifest = Manifest.read(directory)
    except Exception:  # noqa: BLE001  damaged in any way: rebuild
        return None
    same = (
        manifest.weights == ctx.source.origin
        and manifest.task == ctx.task
        and manifest.backend == backend
        and manifest.precision == precision.name
        and _same_knobs(manifest, precision)
        and sorted(k.split(":")[0] for k in manifest.kernels) == sorted(ctx.kernels)
    )
    return manifest if same else None


def export_options(ctx: BenchContext, backend: Backend) -> dict[str, Any]:
    """The bench's settings under the option names the backend (or a parent it builds from) declares.

    TensorRT's profile covers the plan's batch sizes and sequence length (a string: bench needs no
    tensorrt import); AOTInductor compiles with --compile-mode for the bench's device.
    """
    top, seq = max(ctx.batch_sizes), ctx.seq_len
    settings = {
        "mode": ctx.compile_mode,
        "device": ctx.device,
        "shapes": f"batch=1:{top}:{top},sequence=1:{seq}:{max(seq, 128)}",
    }
    declared = backend_options(backend)
    return {k: v for k, v in settings.items() if k in declared}


def _same_knobs(manifest: Manifest, precision: PrecisionConfig) -> bool:
    try:
        return manifest.precision_config == precision
    except UsageError:  # a precision this build no longer knows
        return False


def build_artifact(ctx: BenchContext, name: str, precision: PrecisionConfig) -> tuple[Path, float, str]:
    """Build (or reuse) the artifact of export backend ``name`` in the work dir; returns (dir, build s, note).

    A derived build (a derived backend, or a precision pass: contracts/passes.py ``derivation``) starts from
    its parent's fp32 artifact in the work dir (built first when absent), so backends and precisions sharing a
    parent (onnx, onnx-opt, tensorrt, onnx fp16 / int8) export the model once. Build seconds of a fresh
    derived artifact include its parent's.
    """
    backend = get_backend(name)
    out = artifact_dir(ctx, backend.name, precision)
    manifest = reusable(out, ctx, backend.name, precision)
    if manifest is not None:
        return out, round(sum(manifest.timings.values()), 3), f"reused {out.name}"
    from vlexport.pipeline import run_export

    # The benchmark checks parity on its own inputs; the exporter's validation would repeat that work.
    common = {
        "backend": backend.name,
        "task": ctx.task,
        "precision": precision,
        "force": True,
        "validate": False,
        "options": export_options(ctx, backend),
    }
    parent_s = 0.0
    how = derivation(backend, precision)
    if how is not None:
        parent_dir, parent_s, _ = build_artifact(ctx, how.parent_backend, Fp32Config())
        job, model = ExportJob(str(parent_dir), out, **common), None  # its kernels come with the parent
    else:
        job = ExportJob(
            ctx.model_name,
            out,
            random_weights=ctx.random_weights,
            seed=ctx.seed,
            kernels=ctx.kernels,
            allow_new_weights=ctx.allow_new_weights,
            **common,
        )
        model = ctx.model
    ctx.progress(f"building {backend.name} {precision.name}")
    start = time.perf_counter()
    run_export(job, model=model)
    return out, round(parent_s + time.perf_counter() - start, 3), ""


def component_call(component: Any, device: str) -> tuple[Callable, Callable, Callable, str]:
    """(prepare, call, outputs, note) for one loaded encoder component.

    Components with ``call_tensors`` (AOTInductor, TensorRT) take device tensors: no numpy round trips
    in the timed call. The others take numpy feeds of only the inputs they declare (optimized graphs
    may drop unused ones, e.g. pixel_mask).
    """
    names = list(component.input_names)
    if hasattr(component, "call_tensors"):
        on = getattr(component, "device", device)

        def call(args: tuple[torch.Tensor, ...]) -> Any:
            with torch.no_grad():
                return component.call_tensors(*args)

        return (
            lambda inputs: tuple(inputs[n].to(on) for n in names),
            call,
            _tensor_outputs(component.output_names),
            "",
        )
    note = "numpy I/O: host<->device copies included" if device == "cuda" else ""
    return (
        lambda inputs: {n: np.ascontiguousarray(inputs[n].numpy()) for n in names},
        component,
        lambda raw: dict(raw),
        note,
    )


def artifact_variant(ctx: BenchContext, directory: Path, *, build_s: float, note: str = "") -> Variant:
    """A variant over an artifact directory: backend, precision and kernels from its manifest."""
    manifest = Manifest.read(directory)
    # ONNX Runtime and TensorRT allocate outside torch: the device's used memory sees every backend alike.
    probe = MemoryProbe(ctx.device, torch_allocator=False)
    before = probe.begin()
    artifact = load_artifact(
        directory, manifest=manifest, device=ctx.device, threads=ctx.threads, interleaved=True
    )
    if ctx.generative:
        from vlexport.runtime.generate import Generator

        prepare, call, outputs = generator_call(Generator(artifact, config=ctx.model.config), ctx.new_tokens)
        io_note = ""
    else:
        (component,) = artifact.components.values()
        prepare, call, outputs, io_note = component_call(component, ctx.device)
    probe.add_build(probe.end(before))
    kernels = tuple(sorted(k.split(":")[0] for k in manifest.kernels))
    return Variant(
        manifest.backend,
        manifest.precision_config,
        prepare,
        call,
        outputs,
        probe,
        kernels,
        build_s,
        note=", ".join(filter(None, [note, io_note])),
    )


def given_artifact_variant(ctx: BenchContext, directory: Path) -> Variant:
    """An artifact directory the user named: measured as built, with its recorded build time."""
    manifest = Manifest.read(directory)
    return artifact_variant(
        ctx, directory, build_s=round(sum(manifest.timings.values()), 3), note=f"artifact {directory.name}"
    )


__all__ = [
    "RUNNERS",
    "BenchContext",
    "Runner",
    "Variant",
    "artifact_variant",
    "build_artifact",
    "build_variant",
    "check_backends",
    "eager_model",
    "eager_module",
    "given_artifact_variant",
    "register_runner",
    "torch_variant",
]
