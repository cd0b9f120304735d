"""The ``tensorrt`` backend: ONNX artifact -> TensorRT 10 engines (``<component>.plan``), one optimization
profile over the dynamic axes.

Derived from ``onnx``: ``vlexport tensorrt MODEL|ONNX_DIR`` (the orchestrator exports a model to ONNX
first). Engines are built with the TensorRT Python API (Builder, OnnxParser, optimization profile, the
precision config's builder flags) and validated against eager like every other artifact. Where
``import tensorrt`` fails (it is not installable here) the command fails before any work, with a
UsageError that says how to install it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

import torch

from vlexport.contracts.backends import (
    LOAD_DEFAULTS,
    BackendBase,
    DeriveContext,
    Derived,
    ExportJob,
    LoadOptions,
    register_backend,
)
from vlexport.contracts.family import TaskSpec
from vlexport.contracts.manifest import Component
from vlexport.contracts.precision import PrecisionConfig
from vlexport.errors import CheckError, MissingToolchain, UsageError
from vlexport.export import TRT_DEFAULT_SHAPES
from vlexport.models.inputs import InputShape
from vlexport.runtime.components import import_tensorrt

# Axes not listed in --shapes (default TRT_DEFAULT_SHAPES; e.g. past_sequence) fall back to DEFAULT_RANGE.
DEFAULT_RANGE = (1, 32, 256)
WORKSPACE_BYTES = 4 << 30
CALIBRATION_BATCHES = 8


@dataclass(frozen=True)
class AxisRange:
    min: int
    opt: int
    max: int


def parse_shapes(text: str) -> dict[str, AxisRange]:
    """``"batch=1:8:32,sequence=1:32:128"`` -> {axis: AxisRange}; a UsageError names what is wrong."""
    ranges: dict[str, AxisRange] = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, _, spec = item.partition("=")
        parts = spec.split(":")
        try:
            lo, opt, hi = (int(p) for p in parts) if len(parts) == 3 else (int(spec),) * 3
        except ValueError:
            raise UsageError(
                f"--shapes: {item!r} is not AXIS=MIN:OPT:MAX (or AXIS=N) with integers, "
                f"e.g. {TRT_DEFAULT_SHAPES}."
            ) from None
        if not name or not 1 <= lo <= opt <= hi:
            raise UsageError(f"--shapes: {item!r} needs a named axis and 1 <= MIN <= OPT <= MAX.")
        ranges[name.strip()] = AxisRange(lo, opt, hi)
    return ranges


def profile_shapes(
    component: Component, shapes: Mapping[str, AxisRange]
) -> dict[str, tuple[tuple[int, ...], ...]]:
    """Per input: (min, opt, max) concrete shapes, dynamic axes filled from ``shapes`` by axis name."""
    out = {}
    for t in component.inputs:
        dims = [(d, d, d) if isinstance(d, int) else astuple(shapes.get(d)) for d in t.shape]
        out[t.name] = tuple(tuple(d[k] for d in dims) for k in range(3))
    return out


def astuple(r: AxisRange | None) -> tuple[int, int, int]:
    return (r.min, r.opt, r.max) if r is not None else DEFAULT_RANGE


def build_engine(
    onnx_path: Path,
    plan_path: Path,
    component: Component,
    *,
    precision: PrecisionConfig,
    shapes: Mapping[str, AxisRange],
    calibration: Sequence[Mapping[str, torch.Tensor]] = (),
) -> None:
    """Parse ``onnx_path``, build with one optimization profile, write the serialized engine to
    ``plan_path``."""
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # from a file so external data resolves next to it
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise CheckError(f"TensorRT's ONNX parser rejected {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    profile = builder.create_optimization_profile()
    wanted = profile_shapes(component, shapes)
    for i in range(network.num_inputs):
        name = network.get_input(i).name
        if name not in wanted:
            raise CheckError(
                f"{onnx_path.name}: input {name!r} is not in the manifest; export the artifact again."
            )
        profile.set_shape(name, *wanted[name])
    config.add_optimization_profile(profile)
    for flag in precision.tensorrt_clear_flags:
        config.clear_flag(getattr(trt.BuilderFlag, flag))
    for flag in precision.tensorrt_flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    if "INT8" in precision.tensorrt_flags and not _has_qdq(
        network, trt
    ):  # a QDQ graph carries its own scales
        if not calibration:
            raise UsageError("int8 without Q/DQ nodes needs calibration inputs.")
        config.int8_calibrator = _calibrator(trt, calibration, plan_path.with_suffix(".calib"))
        config.set_calibration_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise CheckError(
            f"TensorRT could not build an engine for {onnx_path.name} (see the TensorRT log above)."
        )
    plan_path.write_bytes(bytes(serialized))


def _has_qdq(network: Any, trt: Any) -> bool:
    return any(network.get_layer(i).type == trt.LayerType.QUANTIZE for i in range(network.num_layers))


def _calibrator(trt: Any, batches: Sequence[Mapping[str, torch.Tensor]], cache: Path) -> Any:
    """Entropy calibrator over seeded task inputs (implicit int8: deprecated in TensorRT 10, still built)."""

    class Calibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            super().__init__()
            self.batches = [{k: v.cuda().contiguous() for k, v in b.items()} for b in batches]
            self.index = 0

        def get_batch_size(self) -> int:
            return 1  # explicit-batch networks: the batch axis is part of each tensor's shape

        def get_batch(self, names: list[str]) -> list[int] | None:
            if self.index >= len(self.batches):
                return None
            batch = self.batches[self.index]
            self.index += 1
            return [batch[n].data_ptr() for n in names]

        def read_calibration_cache(self) -> bytes | None:
            return cache.read_bytes() if cache.exists() else None

        def write_calibration_cache(self, data: bytes) -> None:
            cache.write_bytes(bytes(data))

    return Calibrator()


def calibration_inputs(
    task: TaskSpec, config: Any, shapes: Mapping[str, AxisRange], seed: int
) -> list[dict[str, torch.Tensor]]:
    """Seeded task inputs at the profile's opt shape (what the engine is tuned for)."""
    shape = InputShape(astuple(shapes.get("batch"))[1], astuple(shapes.get("sequence"))[1])
    return [task.make_inputs(config, shape, seed + i) for i in range(CALIBRATION_BATCHES)]


class TensorRTBackend(BackendBase):
    name = "tensorrt"
    triton_backends = ("tensorrt",)
    suffix = ".plan"
    parent = "onnx"
    options: ClassVar[dict[str, Any]] = {"shapes": TRT_DEFAULT_SHAPES}
    validation_device = "cuda"
    description = "TensorRT 10 engines built from the ONNX graphs (needs an NVIDIA GPU)"

    def check(self, job: ExportJob) -> None:
        shapes = job.option("shapes")
        job.options["shapes"] = parse_shapes(shapes) if isinstance(shapes, str) else dict(shapes)
        import_tensorrt()  # fail before minutes of ONNX export
        if not torch.cuda.is_available():
            raise MissingToolchain("TensorRT needs an NVIDIA GPU; torch sees no CUDA device on this machine.")

    def derive(self, ctx: DeriveContext) -> Derived:
        precision = ctx.job.precision
        shapes: Mapping[str, AxisRange] = ctx.job.option("shapes")
        calibration = (
            calibration_inputs(ctx.task_spec, ctx.config, shapes, ctx.job.seed)
            if "INT8" in precision.tensorrt_flags
            else ()
        )
        components = {}
        for name, comp in ctx.parent.components.items():
            ctx.progress(f"building TensorRT engine {name}")
            plan = ctx.out_dir / f"{name}{self.suffix}"
            build_engine(
                ctx.parent_dir / comp.file,
                plan,
                comp,
                precision=precision,
                shapes=shapes,
                calibration=calibration,
            )
            components[name] = replace(
                comp, file=plan.name, external_data=None, size_bytes=plan.stat().st_size, opset=None
            )
        return Derived(components, details={"shapes": {k: [r.min, r.opt, r.max] for k, r in shapes.items()}})

    def load(self, path: Path, options: LoadOptions = LOAD_DEFAULTS) -> Any:
        from vlexport.runtime.components import TensorRTComponent

        return TensorRTComponent(path, device=options.device, threads=options.threads)


BACKEND = register_backend(TensorRTBackend())
