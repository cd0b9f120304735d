"""Benchmark variants: what each backend needs built, and how one call of it is made and read.

A backend is a builder ``(ctx, precision) -> Variant`` registered in BACKENDS (tests register fakes with
:func:`register_backend`). A variant splits a call in three so only the backend's own work is timed:
``prepare`` (inputs to the backend's format and device, untimed), ``step`` (timed) and ``outputs``
(results to numpy for the parity check, untimed).
"""

from __future__ import annotations

import contextlib
import copy
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedModel

from vlexport.bench.timing import MemoryProbe
from vlexport.errors import UsageError
from vlexport.manifest import Manifest
from vlexport.models.base import ComponentSpec, TaskSpec
from vlexport.weights import ModelSource

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class BenchContext:
    """Everything a builder may need; one per (model, task) group of a run."""

    model_name: str  # as the user gave it (preset or local dir): re-resolved by the exporters
    source: ModelSource
    task: str
    task_spec: TaskSpec
    model: PreTrainedModel  # eager fp32 on the CPU: the reference weights, shared where a backend can
    component: ComponentSpec
    device: str  # cpu | cuda
    threads: int
    work_dir: Path  # where built artifacts go (kept and reused when the user names it)
    random_weights: bool = False
    seed: int = 0
    kernels: tuple[str, ...] = ()
    compile_mode: str = "default"
    batch_sizes: tuple[int, ...] = (1,)
    seq_len: int = 32
    progress: Callable[[str], None] = lambda msg: None
    built: dict[str, Path] = field(default_factory=dict)  # backend label -> artifact dir (trt reuses onnx)


@dataclass
class Variant:
    backend: str
    precision: str
    prepare: Callable[[dict[str, torch.Tensor]], Any]
    step: Callable[[Any], Any]
    outputs: Callable[[Any], dict[str, np.ndarray]]
    memory: MemoryProbe
    kernels: tuple[str, ...] = ()
    build_s: float = 0.0
    jit: bool = False  # compiles on first call at each shape (torch.compile): build time = first calls
    note: str = ""
    close: Callable[[], None] = lambda: None


Builder = Callable[[BenchContext, str], Variant]
BACKENDS: dict[str, Builder] = {}


def register_backend(name: str) -> Callable[[Builder], Builder]:
    def wrap(fn: Builder) -> Builder:
        BACKENDS[name] = fn
        return fn

    return wrap


def check_backends(names: Sequence[str]) -> None:
    unknown = [n for n in names if n not in BACKENDS]
    if unknown:
        raise UsageError(f"Unknown backend(s) {unknown}: --backends takes a comma list of {', '.join(BACKENDS)}.")


# ---------------------------------------------------------------- torch-run variants
def torch_variant(backend: str, module: nn.Module, ctx: BenchContext, precision: str, *, device: str,
                  kernels: tuple[str, ...] = (), build_s: float = 0.0, jit: bool = False,
                  memory: MemoryProbe | None = None, close: Callable[[], None] = lambda: None) -> Variant:
    dtype = DTYPES[precision]

    def prepare(inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        return tuple(_cast(inputs[n].to(device), dtype) for n in ctx.component.inputs)

    def step(args: tuple[torch.Tensor, ...]) -> Any:
        with torch.no_grad():
            return module(*args)

    return Variant(backend, precision, prepare, step, _tensor_outputs(ctx.component.outputs),
                   memory or MemoryProbe(device), kernels, build_s, jit, close=close)


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dtype) if t.is_floating_point() else t  # ids and masks keep their integer type


def _tensor_outputs(names: Sequence[str]) -> Callable[[Any], dict[str, np.ndarray]]:
    def outputs(raw: Sequence[torch.Tensor]) -> dict[str, np.ndarray]:
        return {n: t.detach().float().cpu().numpy() for n, t in zip(names, raw)}

    return outputs


def eager_model(ctx: BenchContext, precision: str, kernels: tuple[str, ...]
                ) -> tuple[PreTrainedModel, Callable[[], None]]:
    """The eager HF model at ``precision`` on the context's device with ``kernels`` injected; returns a closer.

    fp32 on the CPU without kernels shares the reference weights; anything else works on a copy so the
    reference stays fp32, on the CPU and unpatched.
    """
    model = ctx.model
    if precision != "fp32" or ctx.device != "cpu" or kernels:
        model = copy.deepcopy(ctx.model).to(ctx.device, DTYPES[precision])
    if not kernels:
        return model, lambda: None
    from vlexport.inject import inject

    stack = contextlib.ExitStack()
    stack.enter_context(inject(model, attention="attention" in kernels, bridge_norm="bridge" in kernels))
    return model, stack.close


def eager_module(ctx: BenchContext, precision: str, kernels: tuple[str, ...]) -> tuple[nn.Module, Callable[[], None]]:
    """The task's component wrapper over :func:`eager_model`."""
    model, close = eager_model(ctx, precision, kernels)
    return ctx.component.build(model).eval(), close


@register_backend("eager")
def build_eager(ctx: BenchContext, precision: str) -> Variant:
    probe = MemoryProbe(ctx.device)
    before = probe.begin()
    start = time.perf_counter()
    module, close = eager_module(ctx, precision, ctx.kernels)
    variant = torch_variant("eager", module, ctx, precision, device=ctx.device, kernels=ctx.kernels,
                            build_s=time.perf_counter() - start, memory=probe, close=close)
    probe.add_build(probe.end(before))
    return variant


@register_backend("compile")
def build_compile(ctx: BenchContext, precision: str) -> Variant:
    from vlexport.export.compile import jit_compile

    module, close = eager_module(ctx, precision, ctx.kernels)
    compiled = jit_compile(module, mode=ctx.compile_mode)
    return torch_variant("compile", compiled, ctx, precision, device=ctx.device, kernels=ctx.kernels, jit=True,
                         close=close)


# ---------------------------------------------------------------- artifact-backed variants
def _fp32_only(backend: str, precision: str) -> None:
    if precision != "fp32":
        raise UsageError(f"Backend {backend} is built in fp32 by the benchmark. For {precision}, convert an "
                         f"artifact (`vlexport quantize DIR -o OUT --precision {precision}`) and pass OUT to "
                         "`vlexport bench` as an artifact directory.")


def artifact_dir(ctx: BenchContext, label: str) -> Path:
    kernels = f"-k{'-'.join(ctx.kernels)}" if ctx.kernels else ""
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(ctx.model_name).name)
    return ctx.work_dir / f"{stem}-{ctx.task}-{label}{kernels}"


def reusable(directory: Path, ctx: BenchContext, backend: str) -> Manifest | None:
    """An artifact already in the work dir for the same weights, task, backend and kernels, or None."""
    if not (directory / "manifest.json").is_file():
        return None
    try:
        manifest = Manifest.read(directory)
    except Exception:  # damaged: rebuild
        return None
    same = (manifest.weights == ctx.source.origin and manifest.task == ctx.task and manifest.backend == backend
            and sorted(k.split(":")[0] for k in manifest.kernels) == sorted(ctx.kernels))
    return manifest if same else None


def build_artifact(ctx: BenchContext, label: str, build: Callable[[Path], Manifest], backend: str
                   ) -> tuple[Path, float, str]:
    """Build (or reuse) an artifact in the work dir; returns (dir, build seconds, note)."""
    out = artifact_dir(ctx, label)
    manifest = reusable(out, ctx, backend)
    if manifest is not None:
        ctx.built[label] = out
        return out, round(sum(manifest.timings.values()), 3), f"reused {out.name}"
    ctx.progress(f"building {label}")
    start = time.perf_counter()
    build(out)
    ctx.built[label] = out
    return out, round(time.perf_counter() - start, 3), ""


def _export_job(ctx: BenchContext, out: Path, **kwargs: Any) -> Any:
    from vlexport.pipeline import ExportJob

    # The benchmark checks parity on its own inputs; the exporter's validation would repeat that work.
    return ExportJob(ctx.model_name, out, task=ctx.task, random_weights=ctx.random_weights, seed=ctx.seed,
                     kernels=ctx.kernels, force=True, validate=False, **kwargs)


def onnx_session(path: Path, ctx: BenchContext) -> Any:
    """An ORT session for interleaved timing: intra-op threads as torch's, and no spin-waiting.

    ORT's pool spins after each run by default; interleaved with eager on a small machine the spinning
    threads steal the cores torch needs next (eager measured 2x slower beside a spinning session).
    """
    import onnxruntime as ort

    from vlexport.runtime.onnx_session import available_providers

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = ctx.threads
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), sess_options=opts, providers=available_providers(ctx.device))


def onnx_variant(ctx: BenchContext, directory: Path, *, backend: str, precision: str, build_s: float,
                 note: str = "") -> Variant:
    probe = MemoryProbe(ctx.device, torch_allocator=False)
    before = probe.begin()
    manifest = Manifest.read(directory)
    (comp,) = manifest.components.values()
    session = onnx_session(directory / comp.file, ctx)
    input_names = [i.name for i in session.get_inputs()]
    output_names = [o.name for o in session.get_outputs()]
    probe.add_build(probe.end(before))

    def prepare(inputs: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
        # Only what the graph declares: optimized graphs may drop unused inputs (pixel_mask).
        return {n: np.ascontiguousarray(inputs[n].numpy()) for n in input_names}

    def step(feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        return session.run(None, feed)

    def outputs(raw: list[np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(output_names, raw))

    if ctx.device == "cuda":
        note = ", ".join(filter(None, [note, "numpy I/O: host<->device copies included"]))
    return Variant(backend, precision, prepare, step, outputs, probe, ctx.kernels, build_s, note=note)


def _onnx(ctx: BenchContext, precision: str, *, optimize: bool) -> Variant:
    label = "onnx-opt" if optimize else "onnx"
    _fp32_only(label, precision)
    from vlexport.pipeline import run_export

    directory, build_s, note = build_artifact(
        ctx, label, lambda out: run_export(_export_job(ctx, out, optimize=optimize), model=ctx.model), "onnx")
    return onnx_variant(ctx, directory, backend=label, precision=precision, build_s=build_s, note=note)


@register_backend("onnx")
def build_onnx(ctx: BenchContext, precision: str) -> Variant:
    return _onnx(ctx, precision, optimize=False)


@register_backend("onnx-opt")
def build_onnx_optimized(ctx: BenchContext, precision: str) -> Variant:
    return _onnx(ctx, precision, optimize=True)


def tensor_component_variant(ctx: BenchContext, component: Any, *, backend: str, precision: str, build_s: float,
                             probe: MemoryProbe, note: str = "") -> Variant:
    """A variant over a runtime component with ``call_tensors`` (AOTInductor package, TensorRT engine)."""
    names = list(component.input_names)

    def prepare(inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        return tuple(inputs[n].to(component.device) for n in names)

    def step(args: tuple[torch.Tensor, ...]) -> Any:
        with torch.no_grad():
            return component.call_tensors(*args)

    return Variant(backend, precision, prepare, step, _tensor_outputs(component.output_names), probe,
                   ctx.kernels, build_s, note=note)


@register_backend("aoti")
def build_aoti(ctx: BenchContext, precision: str) -> Variant:
    _fp32_only("aoti", precision)
    from vlexport.export.compile import run_compile
    from vlexport.runtime.backends import AotiComponent

    directory, build_s, note = build_artifact(
        ctx, "aoti", lambda out: run_compile(_export_job(ctx, out), mode=ctx.compile_mode, device=ctx.device,
                                             model=ctx.model), "aoti")
    probe = MemoryProbe(ctx.device)
    before = probe.begin()
    (comp,) = Manifest.read(directory).components.values()
    component = AotiComponent(directory / comp.file, threads=ctx.threads)
    probe.add_build(probe.end(before))
    return tensor_component_variant(ctx, component, backend="aoti", precision=precision, build_s=build_s,
                                    probe=probe, note=note)


@register_backend("trt")
def build_trt(ctx: BenchContext, precision: str) -> Variant:
    from vlexport.export.tensorrt import AxisRange, TrtJob, run_trt
    from vlexport.runtime.backends import TensorRTComponent, import_tensorrt

    import_tensorrt()
    if ctx.device != "cuda":
        raise UsageError("Backend trt runs on an NVIDIA GPU: pass --device cuda (or auto) on a GPU machine.")
    trt_precision = {"fp32": "fp32", "fp16": "fp16", "int8-static": "int8"}.get(precision)
    if trt_precision is None:
        raise UsageError(f"Backend trt builds fp32, fp16 or int8-static engines, not {precision}.")
    onnx_dir = ctx.built.get("onnx") or build_artifact(
        ctx, "onnx", lambda out: _build_onnx_for_trt(ctx, out), "onnx")[0]
    top = max(ctx.batch_sizes)
    shapes = {"batch": AxisRange(1, top, top), "sequence": AxisRange(1, ctx.seq_len, max(ctx.seq_len, 128))}
    label = f"trt-{precision}"
    directory, build_s, note = build_artifact(
        ctx, label, lambda out: run_trt(TrtJob(str(onnx_dir), out, precision=trt_precision, shapes=shapes,
                                               force=True, validate=False)), "tensorrt")
    probe = MemoryProbe(ctx.device, torch_allocator=False)
    before = probe.begin()
    (comp,) = Manifest.read(directory).components.values()
    component = TensorRTComponent(directory / comp.file)
    probe.add_build(probe.end(before))
    return tensor_component_variant(ctx, component, backend="trt", precision=precision, build_s=build_s,
                                    probe=probe, note=note)


def _build_onnx_for_trt(ctx: BenchContext, out: Path) -> Manifest:
    from vlexport.pipeline import run_export

    return run_export(_export_job(ctx, out), model=ctx.model)


# ---------------------------------------------------------------- artifact directories given by the user
def artifact_label(manifest: Manifest) -> str:
    optimized = bool(manifest.validation.get("fused_ops"))
    return {"tensorrt": "trt"}.get(manifest.backend, manifest.backend) + ("-opt" if optimized else "")


def load_artifact_variant(ctx: BenchContext, directory: Path) -> Variant:
    """A variant over an existing artifact directory: its backend, precision and kernels from the manifest."""
    from vlexport.runtime import load_artifact

    manifest = Manifest.read(directory)
    label = artifact_label(manifest)
    kernels = tuple(sorted(k.split(":")[0] for k in manifest.kernels))
    if manifest.backend == "onnx":
        variant = onnx_variant(ctx, directory, backend=label, precision=manifest.precision, build_s=0.0,
                               note=f"artifact {directory.name}")
    else:
        probe = MemoryProbe(ctx.device, torch_allocator=manifest.backend == "aoti")
        before = probe.begin()
        artifact = load_artifact(directory, manifest=manifest, device=ctx.device, threads=ctx.threads)
        probe.add_build(probe.end(before))
        (component,) = artifact.components.values()
        variant = tensor_component_variant(ctx, component, backend=label, precision=manifest.precision,
                                           build_s=0.0, probe=probe, note=f"artifact {directory.name}")
    variant.build_s = round(sum(manifest.timings.values()), 3)
    variant.kernels = kernels
    return variant
