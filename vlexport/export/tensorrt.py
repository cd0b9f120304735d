"""ONNX artifact -> TensorRT 10 engines (``<component>.plan``), one optimization profile over the dynamic axes.

``vlexport trt MODEL|ONNX_DIR``: a model is first exported to ONNX (in a temp dir); the engines are
built with the TensorRT Python API (Builder, OnnxParser, optimization profile, precision flags), the
manifest says backend ``tensorrt``, and the artifact is validated against eager like every other.
Where ``import tensorrt`` fails (it is not installable here) the command fails before any work, with
a UsageError that says how to install it.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from vlexport.artifact import check_output_dir, staged_dir
from vlexport.errors import CheckError, UsageError
from vlexport.export import TRT_DEFAULT_SHAPES
from vlexport.manifest import Component, Manifest
from vlexport.models.base import TaskSpec
from vlexport.models.inputs import InputShape
from vlexport.pipeline import ExportJob, Progress, run_export
from vlexport.runtime.backends import import_tensorrt

PRECISIONS = {"fp32": "fp32", "fp16": "fp16", "int8": "int8-static"}  # --precision -> manifest precision
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
            raise UsageError(f"--shapes: {item!r} is not AXIS=MIN:OPT:MAX (or AXIS=N) with integers, "
                             f"e.g. {TRT_DEFAULT_SHAPES}.") from None
        if not name or not 1 <= lo <= opt <= hi:
            raise UsageError(f"--shapes: {item!r} needs a named axis and 1 <= MIN <= OPT <= MAX.")
        ranges[name.strip()] = AxisRange(lo, opt, hi)
    return ranges


@dataclass
class TrtJob:
    source: str  # preset, model dir, or an ONNX artifact dir
    output: Path | None = None
    precision: str = "fp32"
    shapes: dict[str, AxisRange] = field(default_factory=lambda: parse_shapes(TRT_DEFAULT_SHAPES))
    task: str | None = None
    random_weights: bool = False
    seed: int = 0
    force: bool = False
    validate: bool = True

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise UsageError(f"--precision {self.precision!r}: TensorRT engines are built as {', '.join(PRECISIONS)}.")
        self.output = Path(self.output) if self.output is not None else None


def profile_shapes(component: Component, shapes: Mapping[str, AxisRange]) -> dict[str, tuple[tuple[int, ...], ...]]:
    """Per input: (min, opt, max) concrete shapes, dynamic axes filled from ``shapes`` by axis name."""
    out = {}
    for t in component.inputs:
        dims = [(d, d, d) if isinstance(d, int) else astuple(shapes.get(d)) for d in t.shape]
        out[t.name] = tuple(tuple(d[k] for d in dims) for k in range(3))
    return out


def astuple(r: AxisRange | None) -> tuple[int, int, int]:
    return (r.min, r.opt, r.max) if r is not None else DEFAULT_RANGE


def build_engine(onnx_path: Path, plan_path: Path, component: Component, *, precision: str,
                 shapes: Mapping[str, AxisRange], calibration: Sequence[Mapping[str, torch.Tensor]] = ()) -> None:
    """Parse ``onnx_path``, build with one optimization profile, write the serialized engine to ``plan_path``."""
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
            raise CheckError(f"{onnx_path.name}: input {name!r} is not in the manifest; export the artifact again.")
        profile.set_shape(name, *wanted[name])
    config.add_optimization_profile(profile)
    if precision == "fp32":
        config.clear_flag(trt.BuilderFlag.TF32)  # on by default; its 10-bit mantissa misses fp32 tolerances
    if precision in ("fp16", "int8-static"):
        config.set_flag(trt.BuilderFlag.FP16)  # int8 layers fall back to fp16, not fp32
    if precision == "int8-static":
        config.set_flag(trt.BuilderFlag.INT8)
        if not _has_qdq(network, trt):  # a QDQ graph (vlexport quantize int8-static) carries its own scales
            if not calibration:
                raise UsageError("int8 without Q/DQ nodes needs calibration inputs.")
            config.int8_calibrator = _calibrator(trt, calibration, plan_path.with_suffix(".calib"))
            config.set_calibration_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise CheckError(f"TensorRT could not build an engine for {onnx_path.name} (see the TensorRT log above).")
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


def calibration_inputs(task: TaskSpec, config: Any, shapes: Mapping[str, AxisRange], seed: int
                       ) -> list[dict[str, torch.Tensor]]:
    """Seeded task inputs at the profile's opt shape (what the engine is tuned for)."""
    shape = InputShape(astuple(shapes.get("batch"))[1], astuple(shapes.get("sequence"))[1])
    return [task.make_inputs(config, shape, seed + i) for i in range(CALIBRATION_BATCHES)]


def run_trt(job: TrtJob, progress: Progress = lambda msg: None) -> Manifest:
    """Build, describe and validate a TensorRT artifact; the output directory appears only on success."""
    import_tensorrt()  # fail before minutes of ONNX export
    if not torch.cuda.is_available():
        raise UsageError("TensorRT needs an NVIDIA GPU; torch sees no CUDA device on this machine.")
    given = Path(job.source)
    with tempfile.TemporaryDirectory(prefix="vlexport-trt-") as scratch:
        if (given / "manifest.json").is_file():
            onnx_dir = given
        else:
            progress("exporting to ONNX")
            onnx_dir = Path(scratch) / "onnx"
            run_export(ExportJob(job.source, onnx_dir, task=job.task, random_weights=job.random_weights,
                                 seed=job.seed, validate=False), progress)
        parent = Manifest.read(onnx_dir)
        if parent.backend != "onnx" or parent.precision not in ("fp32", "int8-static"):
            raise UsageError(f"{onnx_dir} is a {parent.backend} {parent.precision} artifact; `vlexport trt` builds "
                             "from fp32 (or int8-static QDQ) ONNX artifacts.")
        if job.output is None:
            job.output = Path(f"{parent.source.get('preset') or onnx_dir.name}-{parent.task}-trt-{job.precision}")
        check_output_dir(job.output, force=job.force)
        return _build_artifact(job, onnx_dir, parent, progress, kept=onnx_dir == given)


def _build_artifact(job: TrtJob, onnx_dir: Path, parent: Manifest, progress: Progress, *, kept: bool) -> Manifest:
    from vlexport.runtime import load_artifact
    from vlexport.validate import eager_references, raise_on_failure
    from vlexport.weights import load_model, source_from_manifest

    precision = PRECISIONS[job.precision]
    model = load_model(source_from_manifest(parent, onnx_dir), parent.task)
    task = model_task(parent)
    calibration = calibration_inputs(task, model.config, job.shapes, job.seed) if precision == "int8-static" else ()
    with staged_dir(job.output, force=job.force) as tmp:
        components = {}
        for name, comp in parent.components.items():
            progress(f"building TensorRT engine {name}")
            plan = tmp / f"{name}.plan"
            build_engine(onnx_dir / comp.file, plan, comp, precision=precision, shapes=job.shapes,
                         calibration=calibration)
            components[name] = replace(comp, file=plan.name, external_data=None, size_bytes=plan.stat().st_size)
        for rel in parent.files:
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(onnx_dir / rel, tmp / rel)
        manifest = replace(parent, backend="tensorrt", precision=precision, components=components, opset=None,
                           derived_from={"backend": parent.backend, "precision": parent.precision,
                                         # None: exported to a temp dir for this build and removed
                                         "path": str(onnx_dir.resolve()) if kept else None,
                                         "shapes": {k: [r.min, r.opt, r.max] for k, r in job.shapes.items()}},
                           validation={}, versions={}, created="")
        manifest.write(tmp)
        if job.validate:
            progress("validating against eager")
            check = eager_references(model, task)
            del model  # eager weights and engines never in host memory together (validate.eager_references)
            result = check(load_artifact(tmp, manifest=manifest, device="cuda"))
            manifest.validation = result
            manifest.write(tmp)
            raise_on_failure(result, f"{job.source} (tensorrt {precision})")
    return manifest


def model_task(manifest: Manifest) -> TaskSpec:
    from vlexport.models import get_family

    return get_family(manifest.family).task(manifest.task)
