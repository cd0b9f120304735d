"""`vlexport tune MODEL|DIR -o OUT`: build every backend x precision x kernels this machine can run, keep
those whose accuracy meets the targets at the shapes to be served, bench the survivors in one interleaved run,
and write the fastest as OUT (a normal validated artifact) with OUT/tune/report.json, report.md, pareto.png.

* Candidates: every registered backend (or ``--backends``) x each precision it builds (or ``--precisions``) x
  kernels off / on (``--kernels auto``: both where the family has injection rules; ``on`` / ``off``: one).
  One whose check fails here (``errors.MissingToolchain``: no TensorRT, no CUDA, no torchao), that the model
  refuses (a ``UsageError`` from the backend's or the config's own checks), or whose kernels would not run as
  kernels on the device (``kernels_runnable``) is listed as skipped with the reason. Each is built with
  ``pipeline.run_export`` and validated as usual (the precision's tolerance, tightened by ``--min-cosine`` /
  ``--min-agreement``); derived builds reuse one fp32 parent per backend and kernels in the work dir. A
  precision with a ``search`` knob that misses is built again with ``--search`` (int8: SmoothQuant and fp32
  MatMuls; weight-only: block size), and the recipe found is reported.
* ``--work-dir DIR`` keeps every build: a re-run (after an interruption, say) reuses a candidate whose
  manifest is there and asks the same precision, targets and kernels, and builds only the rest.
* ``--max-minutes M``: no candidate starts building after M minutes (the first one always does, so there is
  something to pick; reused ones are not builds); those left are listed as not built, and the choice is made
  among what was measured.
* Generative tasks add the family's per-component recipes (``TaskSpec.component_mixes``: BLIP-2's
  language model at int4-weight, its image tower at int8-dynamic per-token...) as candidates of the backends
  that derive them from the fp32 parent (``quantize --components``); a mix counts under ``--precisions`` by
  its loosest component's precision.
* Accuracy is also judged at the shapes to serve (``--batch-sizes`` x ``--seq-lens``) on seeded inputs other
  than validation's and the calibration set's (``SERVE_SEED``, ``SERVE_DRAWS`` per shape), against eager fp32
  (validate/outputs.py). Generative tasks: greedy ``generate()`` at each batch size on prompts of each
  ``--seq-lens`` length (validate/generation.py: exact tokens for fp32; token agreement and per-step logit
  cosine for reduced precisions).
* Survivors are benched by ``bench.harness.run_bench`` as artifact directories beside eager (parity-checked)
  on ``--device``; the choice is the passing candidate with the lowest p50 summed over the batch sizes
  (``latency``; for generation the p50 of a whole ``generate()`` call of ``new_tokens`` tokens, with prefill
  and decode ms/token reported beside), the highest summed throughput (``throughput``) or the smallest files
  (``size``).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from vlexport.artifact import atomic_write_text, check_output_dir, staged_dir
from vlexport.contracts.backends import (
    ExportJob,
    backend_names,
    backend_options,
    backend_precisions,
    get_backend,
)
from vlexport.contracts.manifest import Manifest, component_size
from vlexport.contracts.passes import derivation, precision_pass
from vlexport.contracts.precision import (
    Fp32Config,
    PrecisionConfig,
    WeightOnlyConfig,
    get_precision,
    loosest,
    per_component,
)
from vlexport.errors import CheckError, UsageError, ValidationError, VlexportError

SERVE_SEED = 4321  # validation uses 1234.., calibration 50000..: the serve-shape inputs are neither
SERVE_DRAWS = 3  # seeded inputs per shape to serve
SERVE_GENERATIONS = 4  # generative tasks: greedy samples per batch size to serve (at least one batch of each)
OBJECTIVES = ("latency", "throughput", "size")
KERNEL_MODES = ("auto", "on", "off")
DEVICES = ("cpu", "cuda")
Progress = Callable[[str], None]


@dataclass
class TunePlan:
    model: str  # preset, save_pretrained directory, or an fp32 artifact directory (its source is used)
    output: Path
    task: str | None = None
    batch_sizes: tuple[int, ...] = (1, 8)
    seq_lens: tuple[int, ...] = (32,)
    objective: str = "latency"
    min_cosine: float | None = None
    min_agreement: float | None = None
    backends: tuple[str, ...] = ()  # () = every registered backend
    precisions: tuple[str, ...] = ()  # () = every precision each backend builds
    random_weights: bool = False
    seed: int = 0
    work_dir: Path | None = None  # None: a scratch dir beside OUT, removed at the end
    warmup: int = 3
    iters: int = 20
    force: bool = False
    kernels: str = "auto"  # auto: off and on where the family has injection rules; on / off: only that
    device: str = "cpu"  # where candidates are built for, judged and benched
    max_minutes: float | None = None  # no candidate starts building after this (module doc)
    new_tokens: int = 16  # generative tasks: tokens per sample, judged and benched alike

    def __post_init__(self) -> None:
        self.output = Path(self.output)
        if self.objective not in OBJECTIVES:
            raise UsageError(f"--objective takes {', '.join(OBJECTIVES)}, not {self.objective!r}.")
        if self.kernels not in KERNEL_MODES:
            raise UsageError(f"--kernels takes {', '.join(KERNEL_MODES)}, not {self.kernels!r}.")
        if self.device not in DEVICES:
            raise UsageError(f"--device takes {', '.join(DEVICES)}, not {self.device!r}.")
        if self.max_minutes is not None and not self.max_minutes >= 0:
            raise UsageError(f"--max-minutes takes a number of minutes >= 0, got {self.max_minutes}.")
        unknown = [b for b in self.backends if b not in backend_names()]
        if unknown:
            raise UsageError(f"Unknown backend(s) {unknown}: choose from {', '.join(backend_names())}.")
        self.precisions = tuple(get_precision(p).name for p in self.precisions)


@dataclass
class Candidate:
    backend: str
    precision: str
    kernels: tuple[str, ...] = ()  # injected kernels (the family's), () for none
    # a per-component recipe (generative tasks): each component's precision and the knobs it sets; then
    # ``precision`` is the loosest of them, which judges the artifact
    components: dict[str, str] = field(default_factory=dict)
    mix: dict[str, PrecisionConfig] = field(default_factory=dict, repr=False)  # what builds it (not reported)
    knobs: dict[str, Any] = field(default_factory=dict)
    recipe: dict[str, Any] = field(default_factory=dict)  # the graph-shaping knobs (searched ones included)
    searched: bool = False  # the recipe came from --search after the plain scheme missed
    directory: str | None = None
    built: bool = False
    # found built, not built again: by an earlier run in --work-dir, as the fp32 DIR tune was given, or as
    # the parent of a variant built before it
    reused: bool = False
    build_s: float | None = None
    passed: bool = False
    reason: str = ""  # why it was skipped or dropped
    accuracy: dict[str, Any] = field(default_factory=dict)  # validation + serve shapes: min cosine, agreement
    p50_ms: dict[str, float] = field(default_factory=dict)  # batch -> p50
    speedup_vs_eager: dict[str, float] = field(default_factory=dict)
    throughput: dict[str, float] = field(default_factory=dict)
    prefill_ms: dict[str, float] = field(default_factory=dict)  # generation: batch -> prefill
    decode_ms_per_token: dict[str, float] = field(default_factory=dict)  # generation: batch -> decode step
    size_mib: float | None = None

    @property
    def name(self) -> str:
        mix = ", ".join(f"{k}={v}" for k, v in self.components.items())
        kernels = f" +{','.join(self.kernels)}" if self.kernels else ""
        return f"{self.backend} {self.precision}" + (f" [{mix}]" if mix else "") + kernels

    @property
    def slug(self) -> str:
        """Its directory name in the work dir (a mix: named by a hash of its recipe)."""
        if self.components:
            digest = hashlib.sha256(json.dumps(self.components, sort_keys=True).encode()).hexdigest()[:8]
            return f"{self.backend}-mix-{digest}" + ("-kernels" if self.kernels else "")
        return f"{self.backend}-{self.precision}" + ("-kernels" if self.kernels else "")


def targets(config: PrecisionConfig, plan: TunePlan) -> PrecisionConfig:
    """The precision with the plan's targets, where it takes targets (fp32 is judged value-exact)."""
    if config.name == "fp32":
        return config
    knobs = {"min_cosine": plan.min_cosine, "min_agreement": plan.min_agreement}
    try:
        return config.with_knobs(**knobs)
    except UsageError:  # looser than the precision's own: its own thresholds judge it
        return config


def family_kernels(family: Any, mode: str) -> list[tuple[str, ...]]:
    """The kernel sets to try: () (off) and the kernels the family's injection rules name (on), as ``mode``
    says; ``on`` for a family without rules is a usage error."""
    from vlexport.inject import KERNELS

    named = tuple(k for k in KERNELS if any(rule.kernel == k for rule in family.injection))
    if mode == "on" and not named:
        raise UsageError(
            f"--kernels on: the {family.name} family declares no kernel injection rules, so there is nothing "
            "to inject. Use --kernels off (or auto)."
        )
    return {"off": [()], "on": [named], "auto": [(), named] if named else [()]}[mode]


def kernels_runnable(backend: str, device: str) -> str | None:
    """Why ``backend`` cannot run injected kernels as kernels on ``device`` (None: it can). ONNX graphs
    carry them as com.microsoft MultiHeadAttention / SkipLayerNormalization nodes, which ONNX Runtime runs on
    CPU and GPU. Other backends call the ``vlexport::`` ops, whose Triton kernels run compiled on CUDA only:
    on a CPU they run their PyTorch references (or the Triton interpreter under TRITON_INTERPRET=1, far
    slower), so the timing would not be the kernels'."""
    root = get_backend(backend)
    while root.parent:
        root = get_backend(root.parent)
    if root.suffix == ".onnx" or device == "cuda":
        return None
    return (
        f"{backend} with kernels runs vlexport's Triton kernels, which run compiled on CUDA only (on a CPU: "
        "their PyTorch references, or the Triton interpreter under TRITON_INTERPRET=1); tune on a GPU "
        "machine with --device cuda"
    )


def _job_options(backend: str, device: str) -> dict[str, Any]:
    return {"device": device} if "device" in backend_options(get_backend(backend)) else {}


def config_label(config: PrecisionConfig) -> str:
    """A component's precision in a mix: its name and the knobs it sets away from the defaults."""
    default = type(config)().knobs()
    changed = {k: v for k, v in config.knobs().items() if default.get(k) != v}
    return config.name + "".join(f" {k}={v}" for k, v in changed.items())


def mix_candidates(
    plan: TunePlan,
    mixes: Sequence[Mapping[str, PrecisionConfig]],
    components: Sequence[str],
    kernel_sets: Sequence[tuple[str, ...]] = ((),),
) -> list[tuple[Candidate, PrecisionConfig | None]]:
    """The family's per-component recipes, for every backend asked for that derives them from its fp32
    parent (a quantization pass per precision) and each kernel set it runs as kernels (the mix is built
    from that kernel set's parent); unnamed components stay fp32."""
    out = []
    for name, mix, kernels in (
        (n, m, k) for n in plan.backends or backend_names() for k in kernel_sets for m in mixes
    ):
        backend = get_backend(name)
        if kernels and kernels_runnable(name, plan.device):
            continue
        mapping = {k: targets(c, plan) for k, c in per_component(mix, components, None, {}).items()}
        judge = loosest(mapping.values())
        if plan.precisions and judge.name not in plan.precisions:
            continue
        if derivation(backend, judge) is None or any(
            c.name != "fp32" and precision_pass(name, c.name) is None for c in mapping.values()
        ):
            continue  # this backend builds whole models only
        labels = {k: config_label(c) for k, c in mapping.items()}
        cand = Candidate(name, judge.name, kernels, components=labels)
        cand.mix = mapping
        try:
            for c in mapping.values():
                c.check_for(name, None)
        except UsageError as e:
            cand.reason = f"skipped: {' '.join(str(e).split())[:300]}"
            out.append((cand, None))
            continue
        out.append((cand, judge))
    return out


def candidate_list(
    plan: TunePlan, kernel_sets: Sequence[tuple[str, ...]] = ((),)
) -> list[tuple[Candidate, PrecisionConfig | None]]:
    """Every backend x precision x kernel set asked for, with the config to build, or None and the reason it
    is skipped."""
    from vlexport.pipeline import check_job

    out = []
    for name in plan.backends or backend_names():
        backend = get_backend(name)
        for pname in backend_precisions(backend):
            if plan.precisions and pname not in plan.precisions:
                continue
            for kernels in kernel_sets:
                cand = Candidate(name, pname, kernels)
                try:
                    config = targets(get_precision(pname), plan)
                    options = _job_options(name, plan.device)
                    check_job(ExportJob("", None, backend=name, precision=config, options=options))
                    why = kernels_runnable(name, plan.device) if kernels else None
                    if why:
                        raise UsageError(why)
                except UsageError as e:  # MissingToolchain included: what this machine cannot build
                    cand.reason = f"skipped: {' '.join(str(e).split())[:300]}"
                    out.append((cand, None))
                    continue
                out.append((cand, config))
    return out


def _reusable(
    directory: Path, config: PrecisionConfig, kernels: tuple[str, ...], mix: Mapping[str, PrecisionConfig]
) -> Manifest | None:
    """The manifest of a candidate an earlier run built in the work dir, if it asked the same precision (per
    component for a mix, whose knobs its directory name hashes), targets and kernels (a re-run with other
    targets builds again)."""
    if not (directory / "manifest.json").is_file():
        return None
    manifest = Manifest.read(directory)
    if manifest.component_precisions != {k: c.name for k, c in mix.items()}:
        return None
    knobs = manifest.precision_knobs or {}
    same_targets = all(
        knobs.get(k) == v for k, v in config.knobs().items() if k in ("min_cosine", "min_agreement")
    )
    built_kernels = tuple(sorted(k.split(":")[0] for k in manifest.kernels))
    if manifest.precision == config.name and same_targets and built_kernels == tuple(sorted(kernels)):
        return manifest
    return None


class _Builds:
    """Builds candidates in the work dir: one fp32 parent per backend and kernels, reused by its derived
    variants and, with ``--work-dir``, by re-runs; ``count`` says how many ``run_export`` calls ran."""

    def __init__(
        self, plan: TunePlan, work: Path, parents: dict[tuple[str, tuple[str, ...]], Path], progress
    ):
        self.plan, self.work, self.parents, self.progress = plan, work, parents, progress
        self.count = 0

    def built(self, cand: Candidate, config: PrecisionConfig) -> Manifest | None:
        """The candidate's manifest when the work dir holds it already (its parent too, for derived ones)."""
        return _reusable(self.work / cand.slug, config, cand.kernels, cand.mix)

    def build(self, cand: Candidate, config: PrecisionConfig) -> Manifest:
        """Build ``cand`` from its backend's fp32 parent when it derives (built once, reused)."""
        from vlexport.pipeline import run_export

        plan = self.plan
        backend = get_backend(cand.backend)
        how = derivation(backend, config)
        given = self.parents.get((cand.backend, tuple(sorted(cand.kernels))))
        if how is None and config.name == "fp32" and given is not None:  # the fp32 DIR tune was given
            cand.reused, cand.directory = True, str(given)
            return Manifest.read(given)
        model = plan.model
        if how is not None:
            model = str(self.parent(how.parent_backend, cand.kernels))
        out = self.work / cand.slug
        cand.directory = str(out)
        reused = self.built(cand, config)
        if reused is not None:
            cand.reused = True
            return reused
        job = ExportJob(
            model,
            out,
            backend=cand.backend,
            task=plan.task if how is None else None,
            precision=config,
            random_weights=plan.random_weights,
            seed=plan.seed,
            kernels=cand.kernels if how is None else (),
            options=_job_options(cand.backend, plan.device),
            force=True,
            component_precisions=dict(cand.mix),
        )
        self.count += 1
        try:
            return run_export(job, self.progress)
        except ValidationError as e:
            searched = _with_search(job)
            if searched is None:
                raise
            self.progress(f"{cand.name} missed: searching a recipe")
            cand.searched = True
            cand.accuracy["validation"] = {"passed": False, "misses": _misses(e)}  # the plain scheme's
            self.count += 1
            return run_export(searched, self.progress)

    def parent(self, backend: str, kernels: tuple[str, ...]) -> Path:
        key = (backend, tuple(sorted(kernels)))
        if key not in self.parents:
            cand = Candidate(backend, "fp32", kernels)
            self.build(cand, Fp32Config())
            self.parents[key] = Path(cand.directory)
        return self.parents[key]


def _with_search(job: ExportJob) -> ExportJob | None:
    """``job`` again with ``--search`` where its precision has the knob and allows it here: the whole-model
    config, or a mix's weight-only components (their block, scored by generating: pipeline); None: nothing
    to search."""
    if job.component_precisions:
        mix = {
            k: c.with_knobs(search=True) if isinstance(c, WeightOnlyConfig) and not c.search else c
            for k, c in job.component_precisions.items()
        }
        if mix == job.component_precisions:
            return None
        return replace(job, precision=loosest(mix.values()), component_precisions=mix)
    config = job.precision
    if "search" not in config.knobs() or getattr(config, "search", True):
        return None
    retry = config.with_knobs(search=True)
    return replace(job, precision=retry) if _checks(retry, job.backend) else None


def _checks(config: PrecisionConfig, backend: str) -> bool:
    """Whether ``config`` passes its own checks for ``backend`` (a search knob some backends refuse)."""
    try:
        config.check_for(backend, None)
    except UsageError:
        return False
    return True


def serve_accuracy(model: Any, task_spec: Any, plan: TunePlan) -> Callable[[Path, Manifest], dict[str, Any]]:
    """Eager references at the shapes to serve (computed once); returns ``check(dir, manifest) -> record``."""
    from vlexport.models.inputs import InputShape
    from vlexport.runtime import load_artifact
    from vlexport.validate.outputs import compare_outputs, output_references

    if task_spec.generative:
        return _serve_generation(model, task_spec, plan)
    shapes = [InputShape(b, s) for b in plan.batch_sizes for s in plan.seq_lens]
    # each shape drawn SERVE_DRAWS times (other seeds): a few values per input (ITM's (B, 2) logits) make a
    # cosine that moves with the draw, and one lucky draw let through a variant bench parity then dropped
    refs = output_references(model, task_spec, shapes=shapes * SERVE_DRAWS, seed=SERVE_SEED)

    def check(directory: Path, manifest: Manifest) -> dict[str, Any]:
        artifact = load_artifact(directory, manifest=manifest, device=plan.device)
        report = compare_outputs(refs, artifact.run, precision=manifest.precision_config)
        return {
            "passed": bool(report.passed),
            "shapes": [str(s) for s in shapes],
            "draws": SERVE_DRAWS,
            "misses": report.failure_lines()[:5],
            "min_cosine": min(
                (c["cosine"] for c in report.checks if c.get("cosine") is not None), default=None
            ),
            "max_abs_error": report.max_abs_error,
        }

    return check


def _serve_generation(
    model: Any, task_spec: Any, plan: TunePlan
) -> Callable[[Path, Manifest], dict[str, Any]]:
    """Greedy ``generate()`` references at each batch size to serve, one set per prompt length, on samples
    of their own seed (computed once); ``check`` runs the artifact's generation loop on them."""
    from vlexport.runtime import load_artifact
    from vlexport.validate.generation import compare_generation, generation_references

    samples = max(SERVE_GENERATIONS, *plan.batch_sizes)
    refs = {
        s: generation_references(
            model,
            task_spec,
            samples=samples,
            batch_sizes=plan.batch_sizes,
            num_beams=1,
            seed=SERVE_SEED,
            prompt_tokens=s,
            max_new_tokens=plan.new_tokens,
        )
        for s in plan.seq_lens
    }

    def check(directory: Path, manifest: Manifest) -> dict[str, Any]:
        artifact = load_artifact(directory, manifest=manifest, device=plan.device)
        reports = {s: compare_generation(r, artifact, with_accuracy=True) for s, r in refs.items()}
        figures = [r.accuracy.generation for r in reports.values() if r.accuracy is not None]
        cosines = [g["min_logit_cosine"] for g in figures if g["min_logit_cosine"] is not None]
        agreements = [
            g["agreement_with_near_ties"] for g in figures if g["agreement_with_near_ties"] is not None
        ]
        exact = [g["greedy_token_agreement"] for g in figures if g["greedy_token_agreement"] is not None]
        return {
            "passed": all(r.passed for r in reports.values()),
            "shapes": [f"b{b} prompt {s} greedy" for s in plan.seq_lens for b in plan.batch_sizes],
            "samples": samples,
            "misses": [f"prompt {s}: {m}" for s, r in reports.items() for m in r.failure_lines()][:5],
            "min_cosine": min(cosines, default=None),  # per-step logit cosine, the worst sample
            # greedy samples whose tokens all agree: near-tie divergences counted as agreeing (what judges),
            # and not
            "min_agreement": min(agreements, default=None),
            "min_exact_agreement": min(exact, default=None),
        }

    return check


def _summary(manifest: Manifest) -> dict[str, Any]:
    v = manifest.validation
    generation = v.accuracy.generation if v.accuracy is not None else None
    if generation:  # generative: per-step logit cosine and greedy token agreement (validate/accuracy.py)
        return {
            "passed": bool(v.passed),
            "shapes": list(v.shapes),
            "min_cosine": generation["min_logit_cosine"],
            "min_agreement": generation["greedy_token_agreement"],
            "max_abs_error": v.max_abs_error,
        }
    cos = [c["cosine"] for c in v.checks if c.get("cosine") is not None]
    agree = [c["agreement"] for c in v.checks if c.get("agreement") is not None]
    return {
        "passed": bool(v.passed),
        "shapes": list(v.shapes),
        "min_cosine": min(cos) if cos else None,
        "min_agreement": min(agree) if agree else None,
        "max_abs_error": v.max_abs_error,
    }


def run_tune(plan: TunePlan, progress: Progress = lambda msg: None) -> dict[str, Any]:
    """Build, judge, bench, choose, write OUT (module doc); returns the report."""
    from vlexport.artifact import output_scope

    with output_scope():  # Ctrl-C / SIGTERM unwind: the scratch work dir and OUT's staging are removed
        return _run_tune(plan, progress)


def _source(plan: TunePlan) -> tuple[TunePlan, Any, dict[tuple[str, tuple[str, ...]], Path]]:
    """The model to build from, and an fp32 artifact given as DIR, reused as the parent of its backend and
    kernels."""
    from vlexport.weights import resolve

    given = Path(plan.model)
    if not (given / "manifest.json").is_file():
        source = resolve(plan.model, random_weights=plan.random_weights, seed=plan.seed)
        return replace(plan, task=source.check_task(plan.task)), source, {}
    manifest = Manifest.read(given)
    if manifest.precision != "fp32" or manifest.derived_from:
        raise UsageError(
            f"{given} is a {manifest.backend} {manifest.precision} artifact; `vlexport tune` starts from a "
            "model or an fp32 export of it (`vlexport onnx MODEL`)."
        )
    model = manifest.source.get("path") or manifest.source.get("preset")
    random = manifest.weights.get("kind") == "random"
    plan = replace(
        plan,
        model=str(model),
        task=manifest.task,
        random_weights=random,
        seed=manifest.weights.get("seed", 0),
    )
    source = resolve(plan.model, random_weights=random, seed=plan.seed)
    kernels = tuple(sorted(k.split(":")[0] for k in manifest.kernels))
    return plan, source, {(manifest.backend, kernels): given}


def _run_tune(plan: TunePlan, progress: Progress) -> dict[str, Any]:
    from vlexport.artifact import scratch_dir
    from vlexport.bench.timing import resolve_device
    from vlexport.weights import load_model

    start = time.monotonic()
    resolve_device(plan.device)  # --device cuda without a GPU: MissingToolchain (exit 2) before any work
    plan, source, parents = _source(plan)
    task_spec = source.family.task(plan.task)
    check_output_dir(plan.output, force=plan.force)
    listed = candidate_list(plan, family_kernels(source.family, plan.kernels))
    mixes = task_spec.component_mixes(source.config) if task_spec.generative else ()
    if mixes:
        names = [c.name for c in task_spec.components(source.config)]
        listed += mix_candidates(plan, mixes, names, family_kernels(source.family, plan.kernels))
    if not any(config is not None for _, config in listed):
        raise UsageError(
            "No backend x precision asked for can be built here: " + "; ".join(c.reason for c, _ in listed)
        )
    with scratch_dir(plan.output) if plan.work_dir is None else _kept(plan.work_dir) as work:
        progress("eager references at the shapes to serve")
        check = serve_accuracy(load_model(source, plan.task), task_spec, plan)
        builds = _Builds(plan, work, parents, progress)
        budget = _Budget(plan.max_minutes, start)
        for cand, config in listed:
            if config is None:
                continue
            if budget.spent() and builds.built(cand, config) is None:
                cand.reason = budget.reason()
                continue
            progress(f"building {cand.name}")
            _judge(cand, config, builds, check)
            budget.started = True
        survivors = [c for c, _ in listed if c.passed]
        rows, runs = _bench(plan, survivors, progress) if survivors else ([], 0)
        chosen = _choose(plan, survivors)
        report = _report(plan, [c for c, _ in listed], chosen, rows, generative=task_spec.generative)
        report["budget"] = budget.record(builds.count)
        report["bench_runs"] = runs  # > 1: the survivors did not fit in memory at once (bench_groups)
        if chosen is None:
            raise CheckError(
                f"No candidate passed the accuracy targets at the shapes to serve; nothing was written to "
                f"{plan.output}. Candidates: " + "; ".join(f"{c.name}: {c.reason}" for c, _ in listed)
            )
        with staged_dir(plan.output, force=plan.force) as tmp:
            for f in Path(chosen.directory).iterdir():
                (shutil.copytree if f.is_dir() else shutil.copy2)(f, tmp / f.name)
            (tmp / "tune").mkdir()
            atomic_write_text(tmp / "tune" / "report.json", json.dumps(report, indent=2, default=str) + "\n")
            atomic_write_text(tmp / "tune" / "report.md", to_markdown(report))
            plot_pareto(report, tmp / "tune" / "pareto.png")
    return report


class _Budget:
    """``--max-minutes``: once spent, no candidate starts building (the first one always does)."""

    def __init__(self, minutes: float | None, start: float):
        self.minutes, self.start, self.started = minutes, start, False

    def elapsed_min(self) -> float:
        return (time.monotonic() - self.start) / 60

    def spent(self) -> bool:
        return self.minutes is not None and self.started and self.elapsed_min() >= self.minutes

    def reason(self) -> str:
        return (
            f"not built: the --max-minutes {self.minutes:g} budget ran out ({self.elapsed_min():.2f} min "
            "spent); the choice was made among the candidates measured"
        )

    def record(self, builds: int) -> dict[str, Any]:
        return {
            "max_minutes": self.minutes,
            "minutes_spent": round(self.elapsed_min(), 3),
            "exhausted": self.spent(),
            "builds": builds,  # run_export calls in this run (candidates reused from --work-dir are not)
        }


class _kept:
    """A work dir the user named: kept (re-runs reuse its candidates)."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def __enter__(self) -> Path:
        self.path.mkdir(parents=True, exist_ok=True)
        return self.path

    def __exit__(self, *exc: object) -> None:
        return None


def _judge(cand: Candidate, config: PrecisionConfig, builds: _Builds, check: Callable) -> None:
    started = time.monotonic()
    try:
        manifest = builds.build(cand, config)
    except CheckError as e:  # a validation miss, or a --search that found no recipe
        misses = _misses(e)
        if cand.searched:  # the plain scheme missed (its misses kept), then the search or its recipe did
            plain = cand.accuracy["validation"]["misses"]
            cand.reason = f"dropped: {'; '.join(plain)}; --search: " + (
                "; ".join(misses) or " ".join(str(e).split())[:300]
            )
            return
        cand.reason = "dropped: " + ("; ".join(misses) or " ".join(str(e).split())[:300])
        cand.accuracy["validation"] = {"passed": False, "misses": misses}
        return
    except UsageError as e:
        cand.reason = f"skipped: {' '.join(str(e).split())[:300]}"
        return
    except VlexportError:  # a full disk, a missing toolchain: every later candidate would meet it too
        raise
    except Exception as e:  # noqa: BLE001 (a library failing on this candidate alone: reported, the rest go on)
        cand.reason = f"failed: {type(e).__name__}: {' '.join(str(e).split())[:300]}"
        return
    directory = Path(cand.directory)
    cand.built, cand.knobs = True, manifest.precision_knobs
    cand.build_s = None if cand.reused else round(time.monotonic() - started, 2)
    cand.recipe = _recipe(manifest)
    cand.searched = cand.searched or bool((manifest.derived_from or {}).get("search"))
    cand.size_mib = round(sum(component_size(directory, c) for c in manifest.components.values()) / 2**20, 2)
    cand.accuracy["validation"] = _summary(manifest)
    serve = check(directory, manifest)
    cand.accuracy["serve_shapes"] = serve
    cand.passed = bool(manifest.validation.passed) and serve["passed"]
    if not serve["passed"]:
        cand.reason = (
            "dropped: missed the targets at the shapes to serve: " + "; ".join(serve["misses"])[:300]
        )


def _misses(error: CheckError) -> list[str]:
    """The accuracy misses a validation error carries ([] for other check errors)."""
    report = getattr(error, "report", None)
    return list(report.accuracy.misses) if report is not None and report.accuracy is not None else []


def _recipe(manifest: Manifest) -> dict[str, Any]:
    """The graph-shaping knobs of a built candidate (what ``quantize --recipe`` replays); {} for fp32."""
    from vlexport.quantize.search import recipe_knobs

    config = manifest.precision_config
    return recipe_knobs(config) if config.knobs() and config.name != "fp32" else {}


# A loaded candidate holds about this many times its files in memory (ORT's prepacked weights and arenas, the
# package's constants): bridgetower-base's 14 survivors (10.9 GiB of files) peaked at 18.2 GiB beside eager
LOADED_PER_FILE_BYTE = 1.5
BENCH_MEMORY_SHARE = 0.6  # of the memory available when the bench starts, for the candidates of one run


def bench_groups(sizes_mib: Sequence[float], available_mib: float) -> list[list[int]]:
    """Candidates (their indices, in order) split into runs whose loaded size fits the memory budget; each
    run is interleaved beside its own eager reference, so ratios to eager compare across runs."""
    budget = BENCH_MEMORY_SHARE * available_mib
    groups: list[list[int]] = [[]]
    used = 0.0
    for i, size in enumerate(sizes_mib):
        need = LOADED_PER_FILE_BYTE * size
        if groups[-1] and used + need > budget:
            groups.append([])
            used = 0.0
        groups[-1].append(i)
        used += need
    return groups


def _bench(plan: TunePlan, survivors: Sequence[Candidate], progress: Progress) -> tuple[list[Any], int]:
    from vlexport.bench.harness import BenchPlan, run_bench
    from vlexport.bench.rows import busy_notes
    from vlexport.memory import available_bytes

    available = available_bytes()  # unknown: no bound
    groups = bench_groups(
        [c.size_mib or 0.0 for c in survivors], float("inf") if available is None else available / 2**20
    )
    rows = []
    for n, group in enumerate(groups, 1):
        runs = (
            f" (run {n} of {len(groups)}: all of them would not fit in memory at once)"
            if len(groups) > 1
            else ""
        )
        progress(f"benchmarking {len(group)} candidate(s) in one interleaved run{runs}")
        bench = BenchPlan(
            models=tuple(survivors[i].directory for i in group),
            batch_sizes=plan.batch_sizes,
            seq_len=max(plan.seq_lens),
            warmup=plan.warmup,
            iters=plan.iters,
            random_weights=plan.random_weights,
            seed=plan.seed,
            device=plan.device,
            new_tokens=plan.new_tokens,
        )
        ran = run_bench(bench)
        rows += ran
        for note in busy_notes(ran):
            progress(f"note: {note}")
    for c in survivors:
        note = f"artifact {Path(c.directory).name}"  # bench.variants.given_artifact_variant's row note
        mine = [r for r in rows if r.detail == note or r.detail.startswith(note + ";")]
        for r in mine:
            if not r.ok:
                c.passed = False
                c.reason = f"dropped: bench {r.status} at batch {r.batch}: {r.detail[:200]}"
                continue
            c.p50_ms[str(r.batch)] = r.latency_p50_ms
            c.throughput[str(r.batch)] = r.throughput
            if r.speedup_vs_eager is not None:
                c.speedup_vs_eager[str(r.batch)] = r.speedup_vs_eager
            if r.decode_ms_per_token is not None:
                c.decode_ms_per_token[str(r.batch)] = r.decode_ms_per_token
                c.prefill_ms[str(r.batch)] = r.prefill_ms
    return rows, len(groups)


def _choose(plan: TunePlan, survivors: Sequence[Candidate]) -> Candidate | None:
    ok = [c for c in survivors if c.passed and len(c.p50_ms) == len(plan.batch_sizes)]
    if not ok:
        return None
    if plan.objective == "throughput":
        return max(ok, key=lambda c: sum(c.throughput.values()))
    if plan.objective == "size":
        return min(ok, key=lambda c: c.size_mib)
    return min(ok, key=lambda c: sum(c.p50_ms.values()))


def _report(
    plan: TunePlan,
    cands: Sequence[Candidate],
    chosen: Candidate | None,
    rows: Sequence[Any],
    *,
    generative: bool,
) -> dict:
    return {
        "model": plan.model,
        "task": plan.task,
        "generative": generative,
        "objective": plan.objective,
        "device": plan.device,
        "kernels": plan.kernels,
        "batch_sizes": list(plan.batch_sizes),
        "seq_lens": list(plan.seq_lens),
        "targets": {"min_cosine": plan.min_cosine, "min_agreement": plan.min_agreement},
        "candidates": [
            {k: v for k, v in vars(c).items() if k not in ("directory", "mix")} | {"name": c.name}
            for c in cands
        ],
        "chosen": None
        if chosen is None
        else {
            "name": chosen.name,
            "backend": chosen.backend,
            "precision": chosen.precision,
            "kernels": chosen.kernels,
            "components": chosen.components,
            "recipe": chosen.recipe,
            "knobs": chosen.knobs,
        },
        "bench_rows": [r.__dict__ for r in rows],
    }


def _accuracy_cell(record: dict[str, Any] | None) -> str:
    """Min cosine; for precisions judged elementwise (fp32), the largest absolute error."""
    if not record or "min_cosine" not in record:
        return "-"
    if record["min_cosine"] is not None:
        return f"{record['min_cosine']:.5f}"
    worst = max((record.get("max_abs_error") or {}).values(), default=None)
    return "-" if worst is None else f"max abs {worst:.1e}"


def to_markdown(report: dict[str, Any]) -> str:
    chosen = report["chosen"]
    decode = any(c.get("decode_ms_per_token") for c in report["candidates"])  # generative: prefill, decode
    lines = [
        f"# vlexport tune: {report['model']} ({report['task']})",
        "",
        f"Objective: {report['objective']}; batch sizes {report['batch_sizes']}, sequence lengths "
        f"{report['seq_lens']}; device {report['device']}, kernels {report['kernels']}; chosen: "
        f"**{chosen['name']}**"
        if chosen
        else "no choice",
        "",
        _budget_line(report.get("budget") or {})
        + (
            f" Benched in {report['bench_runs']} interleaved runs, each beside eager: all candidates at once "
            "would not fit in memory."
            if report.get("bench_runs", 1) > 1
            else ""
        ),
        "",
        (
            "| candidate | kernels | recipe | passed | min cosine (validation / serve shapes) | "
            "p50 ms per batch | speed-up vs eager | "
            + ("prefill ms / decode ms per token | " if decode else "")
            + "MiB | why not |"
        ),
        "|---|---|---|---|---|---|---|" + ("---|" if decode else "") + "---|---|",
    ]
    for c in report["candidates"]:
        acc = c["accuracy"]
        v, s = _accuracy_cell(acc.get("validation")), _accuracy_cell(acc.get("serve_shapes"))
        recipe = ", ".join(f"{k}={_short(x)}" for k, x in c["recipe"].items()) or "-"
        recipe += " (searched)" if c["searched"] else ""
        lines.append(
            f"| {c['name']} | {','.join(c['kernels']) or 'off'} | {recipe} | "
            f"{'yes' if c['passed'] else 'no'} | {v} / {s} | "
            + ", ".join(f"b{b}: {p:.2f}" for b, p in c["p50_ms"].items())
            + " | "
            + ", ".join(f"b{b}: {x:.2f}x" for b, x in c["speedup_vs_eager"].items())
            + (" | " + _generation_cell(c) if decode else "")
            + f" | {c['size_mib'] if c['size_mib'] is not None else '-'} | {c['reason']} |"
        )
    return "\n".join(lines) + "\n"


def _generation_cell(c: dict[str, Any]) -> str:
    return ", ".join(
        f"b{b}: {c['prefill_ms'][b]:.1f} / {ms:.2f}" for b, ms in c.get("decode_ms_per_token", {}).items()
    )


def _budget_line(budget: dict[str, Any]) -> str:
    limit = budget.get("max_minutes")
    head = "No time budget" if limit is None else f"Time budget {limit:g} min"
    return (
        f"{head}: {budget.get('minutes_spent', 0):.2f} min spent, {budget.get('builds', 0)} build(s) in "
        "this run"
        + ("; ran out: candidates not built are marked so" if budget.get("exhausted") else "")
        + "."
    )


def _short(value: Any) -> str:
    """A recipe knob for a table cell: lists (fp32 MatMuls) as their count."""
    return str(len(value)) if isinstance(value, list | tuple) else str(value)


def _accuracy_x(c: dict[str, Any]) -> float | None:
    """Where a benched candidate sits on the accuracy axis: its smallest cosine at the shapes to serve (fp32,
    judged elementwise, at 1.0)."""
    serve = c["accuracy"].get("serve_shapes") or {}
    if serve.get("min_cosine") is not None:
        return serve["min_cosine"]
    return 1.0 if serve.get("passed") else None


def plot_pareto(report: dict[str, Any], path: Path) -> None:
    """Speed-up vs eager (mean over the batch sizes) against accuracy; the Pareto front and choice marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [
        (c["name"], _accuracy_x(c), sum(c["speedup_vs_eager"].values()) / len(c["speedup_vs_eager"]), c)
        for c in report["candidates"]
        if c["speedup_vs_eager"] and _accuracy_x(c) is not None
    ]
    # a candidate dropped after it was timed (bench parity missed at a batch size) is drawn, not chosen from
    points = [p[:3] for p in measured if p[3]["passed"]]
    dropped = [p[:3] for p in measured if not p[3]["passed"]]
    front = [p for p in points if not any(q[1] >= p[1] and q[2] > p[2] for q in points)]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, x, y in points:
        ax.scatter(x, y, color="tab:blue")
        ax.annotate(name, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    for i, (name, x, y) in enumerate(dropped):
        ax.scatter(x, y, color="tab:gray", marker="x", label=None if i else "dropped (bench parity)")
        ax.annotate(name, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points", color="tab:gray")
    front.sort(key=lambda p: p[1])
    ax.plot([p[1] for p in front], [p[2] for p in front], "--", color="tab:orange", label="Pareto front")
    chosen = report["chosen"]
    if chosen:
        mine = [p for p in points if p[0] == chosen["name"]]
        ax.scatter(
            [p[1] for p in mine],
            [p[2] for p in mine],
            s=160,
            facecolors="none",
            edgecolors="red",
            label="chosen",
        )
    ax.ticklabel_format(axis="x", useOffset=False)
    ax.set_xlabel(
        "min per-step logit cosine vs eager fp32 generate() at the shapes to serve"
        if report.get("generative")
        else "min cosine vs eager fp32 at the shapes to serve"
    )
    ax.set_ylabel("speed-up vs eager (mean over batch sizes)")
    ax.set_title(f"vlexport tune: {report['model']} ({report['task']})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
