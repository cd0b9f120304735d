"""The export flow of DESIGN.md: resolve -> load eager -> (inject) -> export components -> validate -> commit.

One spec dataclass in (``ExportJob``), one manifest out. The directory appears only when every
component exported and validation passed; otherwise nothing is left behind.
"""

from __future__ import annotations

import contextlib
import gc
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from vlexport.artifact import check_output_dir, staged_dir
from vlexport.errors import UsageError
from vlexport.export.onnx import DEFAULT_OPSET, describe, export_component
from vlexport.manifest import Component, Manifest
from vlexport.models.base import ComponentSpec
from vlexport.models.inputs import EXPORT_SHAPE, image_size
from vlexport.runtime import load_artifact
from vlexport.support_files import copy_support_files, tokenizer_record, write_config
from vlexport.validate import eager_references, raise_on_failure
from vlexport.weights import ModelSource, load_model, resolve

KERNEL_NAMES = ("attention", "bridge")
Progress = Callable[[str], None]


@dataclass(frozen=True)
class ComponentExporter:
    """How one component becomes a file in the staging dir; the rest of the flow is shared by every backend.

    ``export(module, spec, example, directory, translation_table) -> Component``. ONNX is the default;
    export/compile.py supplies the AOTInductor one.
    """

    backend: str  # manifest backend: onnx | aoti
    export: Callable[[nn.Module, ComponentSpec, Mapping[str, torch.Tensor], Path, Mapping[Any, Any]], Component]


def onnx_exporter(opset: int = DEFAULT_OPSET) -> ComponentExporter:
    def export(module: nn.Module, spec: ComponentSpec, example: Mapping[str, torch.Tensor], directory: Path,
               translation_table: Mapping[Any, Any]) -> Component:
        return export_component(module, spec, example, directory / f"{spec.name}.onnx", opset=opset,
                                translation_table=translation_table)

    return ComponentExporter("onnx", export)


@dataclass
class ExportJob:
    model: str
    output: Path | None  # None: ./<model>-<task>-onnx
    task: str | None = None
    precision: str = "fp32"
    random_weights: bool = False
    seed: int = 0
    optimize: bool = False
    kernels: tuple[str, ...] = ()
    force: bool = False
    opset: int = DEFAULT_OPSET
    validate: bool = True
    timings: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.output = Path(self.output) if self.output is not None else None
        unknown = [k for k in self.kernels if k not in KERNEL_NAMES]
        if unknown:
            raise UsageError(f"Unknown kernel(s) {unknown}: --kernels takes a comma list of {', '.join(KERNEL_NAMES)}.")
        if self.precision != "fp32":
            raise UsageError(
                f"`vlexport onnx` exports fp32 graphs; got --precision {self.precision}. Convert the fp32 artifact "
                "afterwards with `vlexport quantize DIR -o OUT --precision fp16|bf16|int8-dynamic|int8-static`."
            )


@contextlib.contextmanager
def _timed(job: ExportJob, stage: str, progress: Progress) -> Iterator[None]:
    progress(f"{stage}...")
    start = time.perf_counter()
    yield
    job.timings[stage] = round(time.perf_counter() - start, 3)


@contextlib.contextmanager
def injected(model: PreTrainedModel, kernels: tuple[str, ...]) -> Iterator[dict[str, Any]]:
    """Swap in our kernels for the duration of the export; yields the exporter's translation table."""
    if not kernels:
        yield {"translation_table": {}, "replaced": {}}
        return
    from vlexport.inject import inject
    from vlexport_kernels import onnx_translation_table

    with inject(model, attention="attention" in kernels, bridge_norm="bridge" in kernels) as handle:
        yield {"translation_table": onnx_translation_table(), "replaced": handle.counts}


def run_export(job: ExportJob, progress: Progress = lambda msg: None, *, exporter: ComponentExporter | None = None,
               model: PreTrainedModel | None = None) -> Manifest:
    """Export ``job.model`` with ``exporter`` (default ONNX). ``model``: the already-loaded eager model of
    ``job.model``/``job.task`` (the benchmark harness holds one; loading full-size weights twice costs seconds)."""
    exporter = exporter or onnx_exporter(job.opset)
    if job.optimize and exporter.backend != "onnx":
        raise UsageError(f"--optimize applies to ONNX graphs, not to the {exporter.backend} backend.")
    source = resolve(job.model, random_weights=job.random_weights, seed=job.seed)
    task = source.check_task(job.task)
    if job.output is None:
        job.output = Path(f"{Path(job.model).name}-{task}-{exporter.backend}")
    check_output_dir(job.output, force=job.force)  # fail before minutes of work, not after
    task_spec = source.family.task(task)
    owns_model = model is None
    if model is None:
        with _timed(job, "load", progress):
            model = load_model(source, task)

    with staged_dir(job.output, force=job.force) as tmp:
        components = {}
        with _timed(job, "export", progress), injected(model, job.kernels) as inj:
            for spec in task_spec.components(model.config):
                progress(f"exporting {spec.name}")
                example = (spec.example_inputs(model, EXPORT_SHAPE, job.seed) if spec.example_inputs
                           else task_spec.make_inputs(model.config, EXPORT_SHAPE, job.seed))
                components[spec.name] = exporter.export(spec.build(model), spec, example, tmp,
                                                        inj["translation_table"])
        fused: dict[str, dict[str, int]] = {}
        if job.optimize:
            from vlexport.export.onnx_optimize import optimize_onnx

            with _timed(job, "optimize", progress):
                for name, comp in components.items():
                    fused[name] = optimize_onnx(tmp / comp.file)
                    spec = next(s for s in task_spec.components(model.config) if s.name == name)
                    components[name] = describe(tmp / comp.file, name, spec.dynamic_axes, root=tmp)
        manifest = _manifest(source, task, model, components, job, inj["replaced"], exporter.backend)
        manifest.files = [write_config(model.config, tmp), *copy_support_files(source.local_dir, tmp)]
        manifest.tokenizer = tokenizer_record(manifest.files)
        if task_spec.generative:
            from vlexport.runtime.generation_files import write_generation_files

            write_generation_files(model, source, manifest, tmp)
        if fused:
            manifest.validation["fused_ops"] = fused
        manifest.write(tmp)
        if job.validate:
            with _timed(job, "validate", progress):
                check = eager_references(model, task_spec)
                if owns_model:  # eager and artifact weights never in memory together (eager_references)
                    del model
                    gc.collect()
                result = check(load_artifact(tmp, manifest=manifest, device="cpu"))
            manifest.validation = {**result, **({"fused_ops": fused} if fused else {})}
            manifest.timings = dict(job.timings)
            manifest.write(tmp)
            raise_on_failure(result, f"{job.model} ({task}, {manifest.backend} {manifest.precision})")
        else:
            manifest.validation = {"passed": None, "skipped": True}
            manifest.timings = dict(job.timings)
            manifest.write(tmp)
    return manifest


def _manifest(source: ModelSource, task: str, model: PreTrainedModel, components: dict, job: ExportJob,
              replaced: dict[str, int], backend: str = "onnx") -> Manifest:
    vision = getattr(model.config, "vision_config", None)
    return Manifest(
        family=source.family.name,
        task=task,
        hf_class=type(model).__name__,
        backend=backend,
        precision=job.precision,
        source={"preset": source.preset.name if source.preset else None,
                "path": str(source.local_dir) if source.local_dir else None,
                "checkpoint": source.preset.checkpoint if source.preset else None},
        weights=source.origin,
        components=components,
        kernels=[f"{k}:{n}" for k, n in replaced.items()],
        opset=job.opset if backend == "onnx" else None,
        image_size=image_size(vision) if vision is not None else None,
    )

