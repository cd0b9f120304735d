"""The one orchestrator: resolve -> load eager -> (inject) -> export or derive components -> validate ->
commit.

One spec dataclass in (:class:`ExportJob`), one manifest out, for every backend in the registry
(contracts/backends.py). A base backend exports each component from the eager model; a derived backend is
built from a parent artifact, which this module exports first (into a scratch directory) when the user
gave a model rather than an artifact. The output directory appears only when every component was
written and validation passed; otherwise nothing is left behind (artifact.staged_dir).
"""

from __future__ import annotations

import contextlib
import gc
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel

from vlexport.artifact import check_output_dir, output_scope, scratch_dir, staged_dir
from vlexport.contracts.backends import (
    KERNEL_NAMES,
    Backend,
    DeriveContext,
    Derived,
    ExportJob,
    Progress,
    backend_options,
    backend_precisions,
    get_backend,
)
from vlexport.contracts.family import FamilySpec, TaskSpec
from vlexport.contracts.manifest import Component, Manifest, ValidationReport
from vlexport.contracts.passes import BUILTIN, Derivation, derivation, precision_pass
from vlexport.contracts.precision import (
    Fp32Config,
    PrecisionConfig,
    WeightOnlyConfig,
    precisions_for_backend,
)
from vlexport.errors import UsageError
from vlexport.models.base import with_axis_limits
from vlexport.models.inputs import EXPORT_SHAPE, image_size
from vlexport.runtime import load_artifact
from vlexport.support_files import copy_support_files, tokenizer_record, write_config
from vlexport.validate import eager_references, raise_on_failure
from vlexport.validate.generation import GenerationCheck
from vlexport.weights import ModelSource, load_model, resolve, source_from_manifest

__all__ = ["KERNEL_NAMES", "ExportJob", "Progress", "check_job", "injected", "run_export"]


def run_export(
    job: ExportJob, progress: Progress = lambda msg: None, *, model: PreTrainedModel | None = None
) -> Manifest:
    """Build ``job`` with its backend and validate it against eager.

    ``model``: the already-loaded eager model of ``job.model`` / ``job.task`` (the benchmark harness holds
    one; loading full-size weights twice costs seconds). A model passed in is the caller's: it is not
    dropped before the artifact loads.
    """
    given = {k for k, v in job.options.items() if v is not None}  # before check_job fills in the defaults
    backend = check_job(job)
    how = derivation(backend, job.precision)
    with output_scope():  # SIGTERM / SIGHUP clean up like Ctrl-C; check_output_dir's lock is held to the end
        if how is None:
            return _export(job, backend, progress, _Eager(model), given=given)
        return _derive(job, backend, how, progress, _Eager(model))


def check_variant_source(model: str | Path, manifest: Manifest, config: PrecisionConfig) -> None:
    """What `quantize` (CLI and API) can make from the artifact ``model``, said before anything loads: fp32 is
    the source, not a variant, and only backends that derive a precision from their own files (a pass, or a
    parent) can; without one the pipeline would rebuild from weights a compiled package does not carry, and
    blame missing safetensors."""
    if config.name == "fp32":
        raise UsageError(
            f"--precision fp32 is what `quantize` starts from, not a variant: {model} is "
            f"{manifest.backend} {manifest.precision} already. Name a variant "
            f"({', '.join(n for n in precisions_for_backend(manifest.backend) if n != 'fp32')})."
        )
    backend = get_backend(manifest.backend)
    if config.name not in backend_precisions(backend):
        return  # check_job names the precisions this backend builds
    if derivation(backend, config) is None:
        passes = sorted({f"{b} {p}" for b, p in BUILTIN})
        verb = {"aoti": "compile", "tensorrt": "tensorrt"}.get(manifest.backend, manifest.backend)
        raise UsageError(
            f"`vlexport quantize` has no {config.name} pass for {manifest.backend} artifacts such as "
            f"{model} (it has: {', '.join(passes)}). Build the variant from the model instead: "
            f"`vlexport {verb} MODEL --precision {config.name}`."
        )


def check_job(job: ExportJob) -> Backend:
    """Every option checked before minutes of work: backend, precision, backend options (and the backend's
    own toolchain and device). Normalises ``job`` (canonical names, option defaults); returns the backend."""
    backend = get_backend(job.backend)
    job.backend = backend.name
    precision = job.precision
    builds = backend_precisions(backend)
    if precision.name not in builds:
        raise UsageError(
            f"The {backend.name} backend builds {', '.join(builds) or 'no precision'}, not {precision.name}."
        )
    allowed = backend_options(backend)
    unknown = sorted(set(job.options) - set(allowed))
    if unknown:
        raise UsageError(
            f"Option(s) {unknown} do not apply to the {backend.name} backend "
            f"(it takes {', '.join(allowed) or 'none'})."
        )
    job.options = {**allowed, **{k: v for k, v in job.options.items() if v is not None}}
    backend.check(job)
    given = Path(job.model) if job.model else None
    # the parent artifact: the config's own rules
    if given is not None and (given / "manifest.json").is_file():
        precision.check_for(backend.name, Manifest.read(given))
    else:
        precision.check_for(backend.name, None)
    return backend


@dataclass
class _Eager:
    """The eager model, and whether this export owns it (and may drop it before the artifact loads)."""

    model: PreTrainedModel | None
    owned: bool = False

    def __post_init__(self) -> None:
        self.owned = self.model is None

    def load(self, source: ModelSource, task: str, job: ExportJob, progress: Progress) -> PreTrainedModel:
        if self.model is None:
            with _timed(job, "load", progress):
                self.model = load_model(source, task)
        return self.model

    def release(self) -> None:
        """Eager and artifact weights are never in memory together (validate.eager_references)."""
        if self.owned:
            self.model = None
            gc.collect()


@contextlib.contextmanager
def _timed(job: ExportJob, stage: str, progress: Progress) -> Iterator[None]:
    progress(f"{stage}...")
    start = time.perf_counter()
    yield
    job.timings[stage] = round(job.timings.get(stage, 0.0) + time.perf_counter() - start, 3)


@contextlib.contextmanager
def injected(
    model: PreTrainedModel, family: FamilySpec, kernels: tuple[str, ...]
) -> Iterator[dict[str, Any]]:
    """Swap in our kernels for the duration of the export; yields the exporter's translation table."""
    if not kernels:
        yield {"translation_table": {}, "replaced": {}}
        return
    from vlexport_kernels import onnx_translation_table

    from vlexport.inject import inject

    with inject(
        model, family.injection, attention="attention" in kernels, bridge_norm="bridge" in kernels
    ) as h:
        yield {"translation_table": onnx_translation_table(), "replaced": h.counts}


# ---------------------------------------------------------------- base backends: export from torch
def _export(
    job: ExportJob,
    backend: Backend,
    progress: Progress,
    eager: _Eager,
    *,
    given: set[str] | frozenset[str] = frozenset(),
) -> Manifest:
    source = resolve(
        job.model, random_weights=job.random_weights, seed=job.seed, allow_new_weights=job.allow_new_weights
    )
    task = source.check_task(job.task)
    _check_precision(source, job)
    job.output = job.output or _default_output(Path(job.model).name, task, job)
    # before minutes of work; locks
    check_output_dir(job.output, force=job.force, source_dir=source.local_dir)
    task_spec = source.family.task(task)
    _check_decoder_limits(job, source, task_spec, given)
    model = eager.load(source, task, job, progress)
    with staged_dir(job.output, force=job.force, expected_bytes=_expected_bytes(model, job.precision)) as tmp:
        components: dict[str, Component] = {}
        with _timed(job, "export", progress), injected(model, source.family, job.kernels) as inj:
            for spec in task_spec.components(model.config):
                spec = with_axis_limits(spec, model.config, source.family.position_offset(model.config))
                progress(f"exporting {spec.name}")
                example = (
                    spec.example_inputs(model, EXPORT_SHAPE, job.seed)
                    if spec.example_inputs
                    else task_spec.make_inputs(model.config, EXPORT_SHAPE, job.seed)
                )
                path = tmp / f"{spec.name}{backend.suffix}"
                components[spec.name] = backend.export_component(
                    spec.build(model), spec, example, path, job, inj["translation_table"]
                )
        manifest = _manifest(source, task, model, components, job, inj["replaced"])
        manifest.files = [write_config(model.config, tmp), *copy_support_files(source.local_dir, tmp)]
        manifest.tokenizer = tokenizer_record(manifest.files)
        if task_spec.generative:
            from vlexport.export.generation_files import write_generation_files

            write_generation_files(model, source, manifest, tmp)
        model = None  # only `eager` holds it now, so that validation can drop it
        _validate(job, backend, manifest, tmp, eager, task_spec, progress)
    return manifest


# backend options that bound a generative package's decoder (aoti: its static KV cache), by what they limit
DECODER_LIMITS = {
    "max_batch": "decoder rows (batch x beams)",
    "max_length": "cache slots (prompt + new tokens)",
}


def _flag(option: str) -> str:
    return "--" + option.replace("_", "-")


def _check_decoder_limits(job: ExportJob, source: ModelSource, task_spec: TaskSpec, given: set[str]) -> None:
    """Decoder limits given for a task without a decoder are refused, and limits that validation's own
    requests exceed are refused before minutes of compiling, naming the smallest values that pass."""
    limits = [k for k in DECODER_LIMITS if k in job.options]
    if not task_spec.generative:
        extra = sorted(_flag(k) for k in limits if k in given)
        if extra:
            raise UsageError(
                f"{' and '.join(extra)} bound{'s' if len(extra) == 1 else ''} the decoder of a "
                f"generative task; {task_spec.name} has none. Drop the option."
            )
        return
    if not limits or not job.validate:
        return
    from vlexport.validate.generation import decoder_needs

    needs = dict(zip(("max_batch", "max_length"), decoder_needs(task_spec, source.config), strict=True))
    short = [(k, int(job.option(k)), needs[k]) for k in limits if int(job.option(k)) < needs[k]]
    if short:
        what = "; ".join(f"{_flag(k)} {v} < {n} {DECODER_LIMITS[k]}" for k, v, n in short)
        raise UsageError(
            f"Validation of {task_spec.name} needs more than this package would hold ({what}: its "
            "checks run up to batch 4 with beam 3 and 12 new tokens). Nothing was compiled: give "
            f"{' '.join(f'{_flag(k)} {n}' for k, _, n in short)} or more, or "
            "--no-validate to build a package that is not checked (`vlexport triton` will not serve it)."
        )


def _manifest(
    source: ModelSource,
    task: str,
    model: PreTrainedModel,
    components: dict[str, Component],
    job: ExportJob,
    replaced: dict[str, int],
) -> Manifest:
    vision = getattr(model.config, "vision_config", None)
    return Manifest(
        family=source.family.name,
        task=task,
        hf_class=type(model).__name__,
        backend=job.backend,
        precision=job.precision.name,
        precision_knobs=job.precision.knobs(),
        source={
            "preset": source.preset.name if source.preset else None,
            "path": str(source.local_dir) if source.local_dir else None,
            "checkpoint": source.preset.checkpoint if source.preset else None,
        },
        weights=source.origin,
        components=components,
        kernels=[f"{k}:{n}" for k, n in replaced.items()],
        opset=_opset(components),
        image_size=image_size(vision) if vision is not None else None,
    )


def _opset(components: dict[str, Component]) -> int | None:
    """What the files declare (never what was asked for)."""
    opsets = {c.opset for c in components.values() if c.opset is not None}
    return max(opsets) if opsets else None


def _default_output(name: str, task: str, job: ExportJob) -> Path:
    precision = job.precision.name
    return Path(f"{name}-{task}-{job.backend}" + ("" if precision == "fp32" else f"-{precision}"))


def _check_precision(source: ModelSource, job: ExportJob) -> None:
    """What the family says this model cannot take (Flan-T5 in fp16), before any work."""
    reason = source.family.precision_limits(source.config).get(job.precision.name)
    if reason:
        raise UsageError(f"{source.name} cannot be built in {job.precision.name}: {reason}.")


def _expected_bytes(model: PreTrainedModel | None, precision: PrecisionConfig) -> int | None:
    """Rough artifact size, for the free-space check and the disk-full message: parameters x bytes each."""
    if model is None:
        return None
    return int(sum(p.numel() for p in model.parameters()) * precision.weight_bytes)


# ---------------------------------------------------------------- derived builds: from a parent artifact
def _derive(job: ExportJob, backend: Backend, how: Derivation, progress: Progress, eager: _Eager) -> Manifest:
    """Build ``job`` from a parent artifact (contracts/passes.py ``derivation``: a derived backend or a
    precision pass): the one ``job.model`` names, else one exported here into a scratch directory and removed.
    """
    given = Path(job.model)
    from_artifact = (given / "manifest.json").is_file()
    if from_artifact:
        parent = Manifest.read(given)
        # a damaged source is named as such, never blamed on the variant built from it
        parent.verify_hashes(given)
        _check_parent(parent, how, backend.name, job, given)
        _check_components(job, parent, backend)
        source = source_from_manifest(parent, given)
        task = parent.task
        name = parent.source.get("preset") or given.name
    else:
        source = resolve(
            job.model,
            random_weights=job.random_weights,
            seed=job.seed,
            allow_new_weights=job.allow_new_weights,
        )
        task = source.check_task(job.task)
        name = Path(job.model).name
    _check_precision(source, job)
    job.output = job.output or _default_output(name, task, job)
    check_output_dir(job.output, force=job.force, source_dir=given if from_artifact else source.local_dir)
    task_spec = source.family.task(task)
    model = eager.load(source, task, job, progress) if job.validate or not from_artifact else None
    config = model.config if model is not None else source.config
    # None: only the parent artifact is at hand, nothing to check
    need = _expected_bytes(model, job.precision)
    with contextlib.ExitStack() as stack:
        if from_artifact:
            parent_dir = given
        else:  # the parent is built for this export only, next to the output (renames stay on one disk)
            scratch = stack.enter_context(
                scratch_dir(job.output, expected_bytes=need + _expected_bytes(model, Fp32Config()))
            )
            parent_dir = scratch / "artifact"
            progress(f"exporting the {how.parent_backend} fp32 parent")
            parent_job = replace(
                job,
                backend=how.parent_backend,
                output=parent_dir,
                precision=Fp32Config(),
                validate=False,
                force=True,
                timings=job.timings,
                options={
                    k: v
                    for k, v in job.options.items()
                    if k in backend_options(get_backend(how.parent_backend))
                },
            )
            parent = run_export(parent_job, progress, model=model)
            parent.weights = source.origin  # loaded here, so it names the fresh tensors (weights.load_model)
            job.precision.check_for(backend.name, parent)
            _check_components(job, parent, backend)
        model = None  # only `eager` holds it now, so that validation can drop it
        with staged_dir(job.output, force=job.force, expected_bytes=need) as tmp:
            ctx = DeriveContext(
                parent_dir,
                parent,
                tmp,
                job,
                task_spec,
                source.family,
                config,
                progress,
                parent_is_scratch=not from_artifact,
            )
            for rel in parent.files:  # before the build: a generative search loads its candidates
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(parent_dir / rel, tmp / rel)

            def variant(derived: Derived) -> Manifest:
                return replace(
                    parent,
                    backend=backend.name,
                    precision=job.precision.name,
                    precision_knobs=job.precision.knobs(),
                    component_precisions={k: c.name for k, c in job.component_precisions.items()},
                    components=derived.components,
                    opset=_opset(derived.components),
                    fused_ops=derived.fused_ops,
                    files=[*parent.files, *derived.files],
                    validation=None,
                    timings={},
                    versions={},
                    created="",
                    derived_from={
                        "backend": parent.backend,
                        "precision": parent.precision,
                        # None: the parent was built in a scratch dir for this export and removed
                        "path": str(given.resolve()) if from_artifact else None,
                        **derived.details,
                    },
                )

            with _timed(job, how.stage, progress):
                if _searches_generation(job, task_spec):
                    derived = _search_generation(ctx, backend, how, eager, variant)
                else:
                    derived = _build(ctx, backend, how)
            manifest = variant(derived)
            _validate(job, backend, manifest, tmp, eager, task_spec, progress, parent=(parent_dir, parent))
    return manifest


def _build(ctx: DeriveContext, backend: Backend, how: Derivation) -> Derived:
    return _build_per_component(ctx, backend) if ctx.job.component_precisions else how.build(ctx)


def _searched(job: ExportJob) -> list[PrecisionConfig]:
    """The configs of ``job`` whose ``--search`` is still to run (the whole-model one, or components')."""
    configs = [job.precision, *job.component_precisions.values()]
    return [c for c in configs if getattr(c, "search", False)]


def _searches_generation(job: ExportJob, task_spec: TaskSpec) -> bool:
    """A weight-only ``--search`` on a generative artifact: scored by generating, at the orchestrator (the
    pass sees one component at a time; encoder artifacts are searched inside their pass)."""
    return task_spec.generative and any(isinstance(c, WeightOnlyConfig) for c in _searched(job))


# the search's generation samples: seeded like the calibration set, never the validation's (1234..)
SEARCH_SAMPLES = 4


def _search_generation(
    ctx: DeriveContext,
    backend: Backend,
    how: Derivation,
    eager: _Eager,
    variant: Callable[[Derived], Manifest],
) -> Derived:
    """``--search`` for a weight-only precision of a generative artifact: the largest block of
    quantize/search.py's ``BLOCK_GRID`` whose whole variant (every component at its precision, the
    searched ones at that block) generates within the targets, greedy on seeded calibration prompts against
    eager ``generate()``; then validation judges the block found on its own samples, as for encoders."""
    from vlexport.quantize.calibration import SYNTHETIC_SEED
    from vlexport.quantize.search import BlockScore, search_blocks, write_report
    from vlexport.validate.generation import compare_generation, generation_references

    job = ctx.job
    searched = _searched(job)
    config = searched[0]
    if any(c.knobs() != config.knobs() for c in searched):
        raise UsageError(
            "--search picks one block size for every weight-only component; give the searched components "
            "the same precision and knobs (or --block-size N each)."
        )
    refs = generation_references(
        eager.model, ctx.task_spec, samples=SEARCH_SAMPLES, num_beams=1, seed=SYNTHETIC_SEED
    )
    given = dict(job.component_precisions)
    whole = job.precision
    built: dict[str, Derived] = {}

    def score(candidate: PrecisionConfig) -> BlockScore:
        job.precision = candidate if getattr(whole, "search", False) else whole
        job.component_precisions = {
            k: candidate if getattr(c, "search", False) else c for k, c in given.items()
        }
        if "last" in built:  # the previous candidate's component files
            for comp in built["last"].components.values():
                for rel in filter(None, (comp.file, comp.external_data)):
                    (ctx.out_dir / rel).unlink(missing_ok=True)
        derived = built["last"] = _build(ctx, backend, how)
        manifest = variant(derived)
        manifest.record_hashes(ctx.out_dir)
        manifest.write(ctx.out_dir)
        artifact = load_artifact(ctx.out_dir, manifest=manifest, device=backend.validation_device)
        report = compare_generation(refs, artifact, with_accuracy=True)
        del artifact
        gc.collect()
        g = report.accuracy.generation
        cosine = g["min_logit_cosine"] if g["min_logit_cosine"] is not None else 0.0
        figures = {
            "greedy_token_agreement": g["greedy_token_agreement"],
            "agreement_with_near_ties": g["agreement_with_near_ties"],
            "min_logit_cosine": g["min_logit_cosine"],
            "misses": report.accuracy.misses,
            "passed": bool(report.passed),
        }
        line = f"logit cosine {cosine:.5f}, agreement {g['agreement_with_near_ties']}"
        return BlockScore(bool(report.passed), figures, line, cosine)

    on = f"{SEARCH_SAMPLES} seeded calibration samples (greedy generate() against eager)"
    result = search_blocks(config, score, on=on, progress=ctx.progress)
    # the last candidate scored passed: its files are in place, and the job's configs are its (the manifest
    # records the block found as a knob)
    derived = built["last"]
    files = write_report(result, ctx.out_dir)
    derived.files.extend(files)
    derived.details["search"] = {**result.record(), "files": files, "scored_on": on}
    return derived


def _check_components(job: ExportJob, parent: Manifest, backend: Backend) -> None:
    """`quantize --components`: one precision per component of the parent, each with a pass of its own (or
    fp32: copied), each allowed on this artifact, before any work."""
    if not job.component_precisions:
        return
    given, have = set(job.component_precisions), set(parent.components)
    if given != have:
        raise UsageError(
            f"--components must give every component of the artifact one precision; it has "
            f"{', '.join(parent.components)}, the mapping names {', '.join(sorted(given))}."
        )
    for config in {c.name: c for c in job.component_precisions.values()}.values():
        if config.name != "fp32" and precision_pass(backend.name, config.name) is None:
            raise UsageError(
                f"--components: {backend.name} artifacts have no {config.name} pass; "
                f"choose from {', '.join(precisions_for_backend(backend.name))}."
            )
        config.check_for(backend.name, parent)


def _build_per_component(ctx: DeriveContext, backend: Backend) -> Derived:
    """`quantize --components`: each precision's pass over its own components (``DeriveContext.only``), fp32
    components copied from the parent; each pass's details under its precision's name."""
    groups: dict[str, list[str]] = {}
    for comp, config in ctx.job.component_precisions.items():
        groups.setdefault(config.name, []).append(comp)
    components: dict[str, Component] = {}
    details: dict[str, Any] = {}
    fused: dict[str, dict[str, int]] = {}
    for name, comps in groups.items():
        if name == "fp32":
            for comp in comps:
                record = ctx.parent.components[comp]
                for rel in filter(None, (record.file, record.external_data)):
                    shutil.copy2(ctx.parent_dir / rel, ctx.out_dir / rel)
                components[comp] = record
            continue
        config = ctx.job.component_precisions[comps[0]]
        job = replace(ctx.job, precision=config, component_precisions={})
        derived = precision_pass(backend.name, name).derive(replace(ctx, job=job, only=frozenset(comps)))
        components.update(derived.components)
        fused.update(derived.fused_ops)
        details[name] = {"components": comps, **derived.details}
    return Derived({k: components[k] for k in ctx.parent.components}, details, fused_ops=fused)


def _check_parent(parent: Manifest, how: Derivation, name: str, job: ExportJob, directory: Path) -> None:
    precision = job.precision.name
    if parent.backend != how.parent_backend or parent.precision not in how.parent_precisions:
        origin = (parent.derived_from or {}).get("path") if parent.backend == how.parent_backend else None
        raise UsageError(
            f"{directory} is a {parent.backend} {parent.precision} artifact; the {name} {precision} "
            f"variant is built from {' or '.join(how.parent_precisions)} {how.parent_backend} artifacts"
            + (f" (its parent: {origin})." if origin else ".")
        )
    if parent.validation is not None and parent.validation.passed is False:
        raise UsageError(f"{directory} failed its validation; export it again before building from it.")
    if job.kernels:
        raise UsageError(
            f"--kernels applies when exporting from a model; {directory} already has its kernels "
            f"({', '.join(parent.kernels) or 'none'})."
        )
    if job.task not in (None, parent.task):
        raise UsageError(f"{directory} holds a {parent.task!r} artifact; --task {job.task} does not apply.")


# ---------------------------------------------------------------- shared tail: validate, write
def _validate(
    job: ExportJob,
    backend: Backend,
    manifest: Manifest,
    tmp: Path,
    eager: _Eager,
    task_spec: TaskSpec,
    progress: Progress,
    parent: tuple[Path, Manifest] | None = None,
) -> None:
    """``parent``: a derived variant's fp32 parent (directory, manifest), for per-component attribution."""
    # what is validated next is what `validate`, `triton` and the loader check later
    manifest.record_hashes(tmp)
    manifest.write(tmp)  # the loader reads a complete directory
    if not job.validate:
        manifest.validation = ValidationReport.skipped_report()
    else:
        with _timed(job, "validate", progress):
            check = eager_references(eager.model, task_spec)
            eager.release()
            manifest.validation = check(
                load_artifact(tmp, manifest=manifest, device=backend.validation_device)
            )
        if parent is not None and isinstance(check, GenerationCheck):
            with _timed(job, "attribution", progress):
                _attribute(check, manifest, tmp, parent, task_spec, backend, progress)
    manifest.timings = dict(job.timings)
    if job.accept_degraded and manifest.validation.passed is False:
        from vlexport.validate.accuracy import accept_degraded

        if accept_degraded(manifest.validation):  # below thresholds only: kept, the manifest says so
            manifest.write(tmp)
            return
    manifest.write(tmp)
    raise_on_failure(
        manifest.validation,
        f"the {manifest.backend} {manifest.precision} build of {job.model} "
        f"({manifest.task}) for {job.output}",
        _miss_advice(job, manifest),
    )


def _attribute(
    check: GenerationCheck,
    manifest: Manifest,
    tmp: Path,
    parent: tuple[Path, Manifest],
    task_spec: TaskSpec,
    backend: Backend,
    progress: Progress,
) -> None:
    """Per-component attribution into the accuracy report (validate/attribution.py): which component moved
    the tokens, measured whether the whole variant passed or not (a miss is what it is for)."""
    from vlexport.validate.attribution import attribute_components

    accuracy = manifest.validation.accuracy
    if accuracy is None:
        return
    gc.collect()  # the whole variant's sessions are gone before mixed ones load
    accuracy.components = attribute_components(
        check, tmp, manifest, *parent, task_spec, device=backend.validation_device, progress=progress
    )


def _miss_advice(job: ExportJob, manifest: Manifest) -> str:
    """What to do after a validation miss: keep a variant that is only below thresholds, or drop what broke
    it."""
    from vlexport.validate.accuracy import below_thresholds_only

    head = f"Nothing was written to {job.output}."
    if manifest.validation is not None and below_thresholds_only(manifest.validation):
        return f"{head} {_accuracy_advice(job, manifest)}"
    if job.kernels:
        kernels = ",".join(job.kernels)
        return f"{head} Export again without --kernels ({kernels}): the injected kernels changed it."
    return (
        f"{head} The artifact does not reproduce the eager model: keep the lines above and report them as a "
        "bug of this backend for this model; `--no-validate` builds it unchecked (`vlexport triton` will not "
        "serve it)."
    )


def _accuracy_advice(job: ExportJob, manifest: Manifest) -> str:
    """A variant only below its accuracy targets: what missed, and the command that would search for one that
    meets them (precisions with a ``search`` knob), or the other ways out."""
    config = job.precision
    acc = manifest.validation.accuracy
    missed = "; ".join(acc.misses) if acc is not None and acc.misses else "see the checks above"
    knobs = config.describe_knobs()
    what = f"The {manifest.backend} {config.name}{f' ({knobs})' if knobs else ''} variant of {job.model}"
    tail = (
        " Or pass --accept-degraded to keep it marked as degraded, or build another precision "
        "(`vlexport list`; int8-weight keeps activations in float)."
    )
    targets = "".join(
        f" --{k.replace('_', '-')} {getattr(config, k)}"
        for k in ("min_cosine", "min_agreement")
        if getattr(config, k, None) is not None
    )
    if (manifest.derived_from or {}).get("search") and manifest.generation:
        return (
            f"{what} is the block --search found generating on seeded calibration prompts, and it missed on "
            f"the validation samples ({missed}). Lower the target, give --block-size 16 (the most accurate "
            "block), or keep the costliest component at a higher precision (--components; the attribution "
            "above names it)." + tail
        )
    if (manifest.derived_from or {}).get("search"):
        return (
            f"{what} is the recipe --search found on the calibration set, and it missed on the validation "
            f"inputs ({missed}). Search on inputs closer to yours (--calibration DIR), or use --precision "
            "int8-weight, which is likely to pass." + tail
        )
    if "search" in config.knobs() and len(manifest.components) > 1:  # --search scores one-component artifacts
        smaller = (
            f"`--block-size {max(16, config.block_size // 2)}` (smaller blocks keep more of each weight), or "
            if getattr(config, "block_size", 0) > 16
            else ""
        )
        # the example names this artifact's own components (BLIP's vision_encoder, BLIP-2's image_encoder)
        names = list(manifest.components)
        low = "decoder" if "decoder" in names else names[-1]
        mix = ",".join([f"{low}={config.name}", *(f"{c}=int8-weight" for c in names if c != low)])
        if isinstance(config, WeightOnlyConfig) and manifest.generation and not job.component_precisions:
            search = (
                f"To search its block size by generating on seeded calibration prompts: `vlexport quantize "
                f"{job.model} -o {job.output} --precision {config.name} --search{targets}`; or try "
            )
        else:
            search = "--search scores encoder artifacts only; for this one try "
        return (
            f"{what} missed its accuracy targets ({missed}). {search}{smaller}a per-component mix that "
            f"keeps the costliest component at a higher precision (e.g. `--components {mix}`; with two or "
            "more changed components the report attributes the loss to each)." + tail
        )
    if "search" in config.knobs():
        knobs = (
            "block size"
            if "block_size" in config.knobs()
            else "SmoothQuant strength and the MatMuls kept fp32"
        )
        return (
            f"{what} missed its accuracy targets ({missed}). To search its {knobs} on a calibration set: "
            f"`vlexport quantize {job.model} -o {job.output} --precision {config.name} --search{targets}`."
            + tail
        )
    return f"{what} missed its accuracy targets ({missed})." + tail
