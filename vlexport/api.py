"""Exporting, quantizing and benchmarking from Python: thin calls of the orchestrator the CLI uses.

``vlexport.export`` / ``vlexport.quantize`` build an ``ExportJob`` and hand it to ``pipeline.run_export`` (the
same validation, atomic staging and errors as `vlexport onnx` / `compile` / `quantize`) and return the
artifact's :class:`~vlexport.contracts.manifest.Manifest`; ``vlexport.bench`` runs ``bench.run_bench``
over one plan (or a shipped suite) and returns its rows. Options the CLI checks up front are checked here
the same way (docs/api.md).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlexport.errors import UsageError

if TYPE_CHECKING:
    from vlexport.bench.rows import BenchRow
    from vlexport.contracts.manifest import Manifest
    from vlexport.contracts.precision import PrecisionConfig

Progress = Callable[[str], None]


def _config(precision: str | PrecisionConfig) -> PrecisionConfig:
    """A precision name enters the program here (as on the CLI); a config instance is used as given."""
    from vlexport.contracts.precision import PrecisionConfig, get_precision

    return precision if isinstance(precision, PrecisionConfig) else get_precision(precision)


def export(
    model: str | Path,
    backend: str = "onnx",
    task: str | None = None,
    precision: str | PrecisionConfig | None = None,
    out: str | Path | None = None,
    *,
    random_weights: bool = False,
    seed: int = 0,
    kernels: Sequence[str] = (),
    allow_new_weights: Sequence[str] = (),
    force: bool = False,
    validate: bool = True,
    progress: Progress | None = None,
    **options: Any,
) -> Manifest:
    """Export ``model`` (a preset name or a save_pretrained directory) with ``backend`` ("onnx", "onnx-opt",
    "aoti", "tensorrt"), validate it against eager PyTorch and return its manifest. ``out`` defaults to
    ``./<model>-<task>-<backend>``; backend ``options`` are the CLI's (``opset=``, ``mode=``, ``max_batch=``,
    ...). A precision other than fp32 builds the fp32 artifact's variant, as `vlexport onnx --precision` does;
    it is a name or a config with its knobs (``Int8WeightConfig(block_size=64)``, contracts/precision.py)."""
    from vlexport.pipeline import ExportJob, run_export

    job = ExportJob(
        str(model),
        None if out is None else Path(out),
        backend=backend,
        task=task,
        precision=_config(precision or "fp32"),
        random_weights=random_weights,
        seed=seed,
        kernels=tuple(kernels),
        allow_new_weights=tuple(allow_new_weights),
        force=force,
        validate=validate,
        options={k: v for k, v in options.items() if v is not None},
    )
    return run_export(job, progress=progress or (lambda msg: None))


def quantize(
    artifact: str | Path,
    precision: str | PrecisionConfig | None = None,
    out: str | Path | None = None,
    *,
    components: Mapping[str, str | PrecisionConfig] | None = None,
    calibration: str | Path | None = None,
    method: str | None = None,
    smooth: float | None = None,
    block_size: int | None = None,
    min_cosine: float | None = None,
    min_agreement: float | None = None,
    search: bool | None = None,
    quantize_embeddings: bool | None = None,
    accept_degraded: bool = False,
    force: bool = False,
    progress: Progress | None = None,
) -> Manifest:
    """A reduced-precision variant (fp16, int8-dynamic, int8-weight, int4-weight, int8-static, ...) of an
    fp32 artifact, checked against eager fp32 as `vlexport quantize` does; returns the variant's manifest. The
    knobs are the config's own (a knob the precision lacks is refused, as on the CLI): ``min_cosine`` /
    ``min_agreement`` stricter targets, ``search`` a recipe searched on the calibration set (int8-dynamic /
    int8-static: SmoothQuant and fp32 MatMuls; int8-weight / int4-weight: the block size); a
    recipe is replayed by passing its config (``contracts.precision.precision_from_recipe(path)``) as
    ``precision``. ``components`` gives components their own precision (``{"decoder": "int4-weight"}``; the
    others at ``precision``, else fp32), as ``--components`` does."""
    from vlexport.contracts.manifest import Manifest
    from vlexport.contracts.precision import loosest, per_component
    from vlexport.pipeline import ExportJob, check_variant_source, run_export

    knobs = {
        "calibration": None if calibration is None else Path(calibration),
        "method": method,
        "smooth": smooth,
        "block_size": block_size,
        "quantize_embeddings": quantize_embeddings,
        "min_cosine": min_cosine,
        "min_agreement": min_agreement,
        "search": search or None,
    }
    if precision is None and not components:
        raise UsageError("Name the variant: precision=, or components={COMPONENT: PRECISION, ...}.")
    mapping: dict[str, PrecisionConfig] = {}
    if not components:  # the knobs' rules, before the artifact is read (as on the CLI)
        config = _config(precision).with_knobs(**knobs)
    manifest = Manifest.read(Path(artifact))
    if components:
        default = None if precision is None else _config(precision).name
        mapping = per_component(dict(components), list(manifest.components), default, knobs)
        config = loosest(mapping.values())
    check_variant_source(artifact, manifest, config)
    job = ExportJob(
        str(artifact),
        None if out is None else Path(out),
        backend=manifest.backend,
        precision=config,
        component_precisions=mapping,
        force=force,
        accept_degraded=accept_degraded,
    )
    return run_export(job, progress=progress or (lambda msg: None))


def bench(
    models: str | Path | Sequence[str | Path] = (),
    *,
    suite: str | None = None,
    suite_file: str | Path | None = None,
    **plan: Any,
) -> list[BenchRow]:
    """Benchmark presets, model directories or artifact directories as `vlexport bench` does (``plan`` takes
    :class:`~vlexport.bench.harness.BenchPlan`'s fields: ``backends``, ``batch_sizes``, ``iters``, ...), or a
    suite (``suite="cpu-smoke"``, optionally from ``suite_file``). Returns the rows;
    ``bench.report.write_reports`` writes them as the CLI's JSON / markdown / PNG. A suite case that fails
    raises (the CLI goes on and exits 1)."""
    from vlexport.bench import BenchPlan, run_bench
    from vlexport.bench.suite import load_suite

    if suite is not None:
        unknown = set(plan) - {"device", "threads", "work_dir"}
        if models or unknown:
            raise UsageError(
                "A suite names its own models and settings: pass suite= alone (device, threads and "
                "work_dir may override it)."
            )
        plans = load_suite(suite, None if suite_file is None else Path(suite_file), **plan)
    else:
        names = [models] if isinstance(models, (str, Path)) else list(models)
        plans = [BenchPlan(tuple(str(m) for m in names), **plan)]
    rows: list[BenchRow] = []
    for p in plans:
        rows += run_bench(p)
    return rows
