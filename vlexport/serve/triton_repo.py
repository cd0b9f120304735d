"""``vlexport triton``: artifact directories -> a Triton model repository, written atomically.

Per artifact: one model per component (``<name>_<component>``, the component's file as ``<v>/model.onnx`` /
``model.plan`` / ``model.pt2``, external data beside it under its own name, which the graph references);
with ``--ensemble`` an encoder artifact also gets a python preprocessing model (image bytes and strings in,
the component's tensors out, with the artifact's own processor and tokenizer files), a postprocessing
model (the scores `vlexport run` prints) and an ensemble ``<name>`` wiring them. A generative artifact gets
``<name>``: a python model that runs vlexport's generation loop, its ONNX decoder in its own process (the
file under ``<v>/decoder/``, no model of its own) with the steps of concurrent requests batched, and its
encoders as Triton models called through BLS.

Everything is planned (configs built and parsed back, names checked against each other and against the
repository) before a byte is written; the repository is then staged beside the target and renamed into
place (artifact.staged_dir). Without ``--force`` an existing repository is extended in place: the new models
are staged beside it and renamed into it, what it held is never touched, and a new model whose name it already
holds is refused. Model files are reflinked or copied from the artifact, never hard-linked.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vlexport.artifact import (
    atomic_write_text,
    check_output_dir,
    output_scope,
    real_target,
    scratch_dir,
    staged_dir,
)
from vlexport.contracts.backends import backend_names, get_backend
from vlexport.contracts.family import TaskSpec
from vlexport.contracts.manifest import MANIFEST, Component, Manifest
from vlexport.errors import CheckError, UsageError, signals_held
from vlexport.models import get_family
from vlexport.models.host import code_ref
from vlexport.serve import embedded
from vlexport.serve import triton_config as tc
from vlexport.serve.py_common import ARTIFACT_DIR, SERVE_JSON

# Triton model names are directory names that clients put in URLs: keep to a safe alphabet.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_SUFFIX = {".onnx": "model.onnx", ".plan": "model.plan", ".engine": "model.plan", ".pt2": "model.pt2"}
_FICLONE = 0x40049409  # linux/fs.h: share the source's extents (btrfs, XFS), a copy-on-write clone
REQUIREMENTS_TXT = "requirements.txt"  # at the repository's root: what its python models import
DECODER_DIR = "decoder"  # inside the generation model's version folder: the ONNX decoder it runs itself


@dataclass
class PlannedModel:
    name: str
    config: Any  # tritonclient ModelConfig
    files: dict[str, Path] = field(default_factory=dict)  # path inside the version folder -> source file
    texts: dict[str, str] = field(default_factory=dict)  # path inside the version folder -> contents
    packages: tuple[str, ...] = ()  # what a python model imports (REPO/requirements.txt)


def python_model(
    name: str,
    config: Any,
    module: str,
    kind: str,
    files: dict[str, Path] | None = None,
    texts: dict[str, str] | None = None,
    needs: tuple[str, ...] | None = None,
) -> PlannedModel:
    """A python model: its model.py, the serving runtime's copy beside it, what it imports (``needs``: when
    not the module's own list, embedded.NEEDS)."""
    needs = embedded.packages(module, kind, needs)
    return PlannedModel(
        name,
        config,
        files or {},
        {**embedded.runtime_texts(), **(texts or {}), "model.py": embedded.shim(module, needs)},
        needs,
    )


def sanitize(name: str) -> str:
    """A Triton-safe model name from a directory name: other characters become ``_``."""
    out = re.sub(r"[^A-Za-z0-9_.-]", "_", name).lstrip("._-")[:100]
    return out or "model"


def check_name(name: str, what: str = "--name") -> str:
    if not _NAME_RE.match(name) or ".." in name:
        raise UsageError(
            f"{what} {name!r} is not a valid Triton model name: use letters, digits, '_', '-' and '.' "
            "(starting with a letter or digit, no '..', no path separators, at most 128 characters)."
        )
    return name


_IDENTITY = TaskSpec.__dataclass_fields__["run_inputs"].default  # a task without extra run-time inputs


# ---------------------------------------------------------------- per artifact
def read_artifact(directory: Path) -> Manifest:
    manifest = Manifest.read(directory)
    manifest.verify_hashes(directory)  # what is served must be what was validated
    report = manifest.validation
    if report is None or report.skipped:
        raise UsageError(
            f"{directory} was exported without validation (--no-validate): `vlexport triton` serves only "
            "artifacts checked against eager PyTorch. Export it again without --no-validate."
        )
    if not report.passed:
        raise CheckError(
            f"{directory} failed validation ({report.summary or 'see manifest.json'}): it is not served. "
            "Export it again (another precision or backend) until validation passes."
        )
    return manifest


def serving_backend(directory: Path, manifest: Manifest, requested: str | None) -> str:
    # Each backend declares the serving backends that run its files (Backend.triton_backends, default first).
    allowed = get_backend(manifest.backend).triton_backends if manifest.backend in backend_names() else ()
    if not allowed:
        served = sorted(n for n in backend_names() if get_backend(n).triton_backends)
        raise UsageError(
            f"{directory} is a {manifest.backend!r} artifact, which `vlexport triton` cannot serve "
            f"(it serves {', '.join(served)} artifacts)."
        )
    if requested is None:
        return allowed[0]
    if requested not in allowed:
        raise UsageError(
            f"--backend {requested} cannot run {directory}, a {manifest.backend} artifact; use "
            f"{' or '.join(allowed)}."
        )
    return requested


def batch_limit(manifest: Manifest) -> int | None:
    """The largest batch the artifact's files take: a TensorRT profile's max; None when the axis is
    unbounded."""
    shapes = (manifest.derived_from or {}).get("shapes") or {}
    if manifest.backend == "tensorrt":
        batch = shapes.get(tc.BATCH_AXIS)
        # DEFAULT_RANGE max
        return int(batch[2]) if isinstance(batch, (list, tuple)) and len(batch) == 3 else 256
    return None


def graph_inputs(path: Path, component: Component) -> list[Any]:
    """The component's inputs that the ONNX graph declares (optimized graphs drop unused ones, e.g.
    pixel_mask)."""
    if path.suffix != ".onnx":
        return list(component.inputs)
    import onnx

    try:
        names = {i.name for i in onnx.load(str(path), load_external_data=False).graph.input}
    except Exception as e:  # noqa: BLE001  onnx raises DecodeError and others on a damaged file
        raise CheckError(f"{path} is not a readable ONNX file ({e}); export the artifact again.") from None
    return [t for t in component.inputs if t.name in names]


def _support_files(directory: Path, manifest: Manifest) -> dict[str, Path]:
    files = {f"{ARTIFACT_DIR}/{MANIFEST}": directory / MANIFEST}
    files.update({f"{ARTIFACT_DIR}/{rel}": directory / rel for rel in manifest.files})
    return files


def plan_artifact(directory: Path, name: str, opts: tc.ServeOptions, backend: str) -> list[PlannedModel]:
    manifest = read_artifact(directory)
    task = get_family(manifest.family).task(manifest.task)
    limit = batch_limit(manifest)
    if limit is not None and opts.max_batch_size > limit:
        raise UsageError(
            f"--max-batch-size {opts.max_batch_size} is above what {directory} takes: its TensorRT "
            f"profile allows batches up to {limit}. Lower --max-batch-size, or build the engine with a "
            "larger batch range (`vlexport tensorrt --shapes batch=1:OPT:MAX`)."
        )
    if backend == "python-onnxruntime":
        bf16 = [
            t.name
            for c in manifest.components.values()
            for t in [*c.inputs, *c.outputs]
            if t.dtype == "bfloat16"
        ]
        if bf16:
            raise UsageError(
                f"{directory} has bfloat16 tensors ({bf16[:3]}), which python models cannot pass as numpy; "
                "serve it with --backend onnxruntime, or export at fp32/fp16."
            )
    if task.generative and manifest.backend == "aoti":
        raise UsageError(
            f"{directory} is a compiled generative artifact: its decoder updates a static KV cache in "
            "place, which a Triton model cannot share between calls. Serve the ONNX export of this model "
            "(`vlexport onnx`), or its TensorRT build."
        )
    single = len(manifest.components) == 1 and not task.generative and not opts.ensemble
    models: list[PlannedModel] = []
    names: dict[str, str] = {}
    for comp_name, comp in manifest.components.items():
        if task.generative and comp_name == "decoder" and in_process_decoder(comp):
            continue  # the generation model runs it itself: no Triton hop per token
        model_name = name if single else f"{name}_{sanitize(comp_name)}"
        names[comp_name] = model_name
        models.append(_component_model(directory, model_name, comp, opts, backend))
    if task.generative:
        models.append(_generation_model(directory, manifest, name, names, models, opts))
    elif opts.ensemble:
        models += _ensemble_models(directory, manifest, task, name, models[0], opts)
    return models


def in_process_decoder(decoder: Component) -> bool:
    """An ONNX decoder runs inside the generation model (ONNX Runtime, IO binding, steps of concurrent
    requests batched); other files (TensorRT engines) stay Triton models the generation model calls."""
    return Path(decoder.file).suffix == ".onnx"


def _component_model(
    directory: Path, model_name: str, comp: Component, opts: tc.ServeOptions, backend: str
) -> PlannedModel:
    src = directory / comp.file
    target = _SUFFIX.get(src.suffix)
    if target is None:
        raise UsageError(f"{src}: `vlexport triton` does not know how Triton serves {src.suffix!r} files.")
    inputs = graph_inputs(src, comp)
    served = Component(comp.name, comp.file, inputs, comp.outputs)
    cfg = tc.component_config(model_name, served, opts, max_batch_size=opts.max_batch_size, model_file=target)
    files = {target: src}
    if comp.external_data:  # the graph names its data file: it keeps its name, beside the renamed graph
        files[Path(comp.external_data).name] = directory / comp.external_data
    if backend == "python-onnxruntime":
        return python_model(model_name, cfg, "vlexport.serve.py_component", opts.kind, files)
    return PlannedModel(model_name, cfg, files)


def _io(config: Any, which: str) -> list[tuple[str, str, list[int]]]:
    """A model's inputs or outputs as (name, dtype name, full dims: the batch dim put back when folded)."""
    back = {v: k for k, v in tc.DTYPES.items() if k != "bytes"}
    lead = [-1] if config.max_batch_size > 0 else []
    from tritonclient.grpc import model_config_pb2 as pb

    return [
        (t.name, back[pb.DataType.Name(t.data_type)], lead + list(t.dims)) for t in getattr(config, which)
    ]


def score_names(task: Any, outputs: list[tuple[str, str, list[int]]]) -> list[str]:
    """The names of the scores ``task.scores`` reads, found by reading zeros of the outputs' shapes."""
    zeros = {n: np.zeros([2 if d < 0 else d for d in shape], dtype=np.float32) for n, _, shape in outputs}
    return sorted(task.scores(zeros, 2))


def _ensemble_models(
    directory: Path, manifest: Manifest, task: Any, name: str, component: PlannedModel, opts: tc.ServeOptions
) -> list[PlannedModel]:
    if manifest.image_size is None:
        raise UsageError(f"{directory} takes no images: --ensemble builds image-and-text pipelines.")
    comp_in, comp_out = _io(component.config, "input"), _io(component.config, "output")
    raw = [("IMAGE", "bytes", [1]), ("TEXT", "bytes", [-1])]
    from vlexport.runtime.texts import placeholder_text_tokenizer, token_limit

    texts: dict[str, str] = {}
    meta = {
        "task": manifest.task,
        "family": manifest.family,
        "component": component.name,
        "max_batch_size": component.config.max_batch_size,
        "image": _image_json(directory, manifest),
        "input_dtypes": {n: d for n, d, _ in comp_in},
        "token_limit": token_limit(directory, manifest),
        "run_inputs": None if task.run_inputs is _IDENTITY else _code(task.run_inputs, directory),
    }
    # random weights: `vlexport run`'s placeholder, written out
    if _tokenizer_json(directory, manifest) is None:
        tok, meta["pad_token_id"] = placeholder_text_tokenizer(directory)
        texts[f"{ARTIFACT_DIR}/tokenizer.json"] = tok.to_str()
    texts[SERVE_JSON] = json.dumps(meta, indent=1)
    pre_name, post_name = f"{name}_preprocess", f"{name}_postprocess"
    pre = python_model(
        pre_name,
        tc.python_config(pre_name, raw, comp_in, opts),
        "vlexport.serve.py_preprocess",
        opts.kind,
        _support_files(directory, manifest),
        texts,
    )
    steps = [
        (pre_name, {"IMAGE": "IMAGE", "TEXT": "TEXT"}, {n: n for n, _, _ in comp_in}),
        (component.name, {n: n for n, _, _ in comp_in}, {n: n for n, _, _ in comp_out}),
    ]
    models = [pre]
    outputs = comp_out
    if task.scores is not None:
        scores = [(s, "float32", [-1]) for s in score_names(task, comp_out)]
        post_meta = {
            "task": manifest.task,
            "family": manifest.family,
            "scores": _code(task.scores, directory),
        }
        post = python_model(
            post_name,
            tc.python_config(post_name, comp_out, scores, opts),
            "vlexport.serve.py_postprocess",
            opts.kind,
            {f"{ARTIFACT_DIR}/{MANIFEST}": directory / MANIFEST},
            {SERVE_JSON: json.dumps(post_meta, indent=1)},
        )
        models.append(post)
        steps.append((post_name, {n: n for n, _, _ in comp_out}, {s: s for s, _, _ in scores}))
        outputs = scores
    models.append(PlannedModel(name, tc.ensemble_config(name, raw, outputs, steps)))
    return models


def _generation_model(
    directory: Path,
    manifest: Manifest,
    name: str,
    names: dict[str, str],
    components: list[PlannedModel],
    opts: tc.ServeOptions,
) -> PlannedModel:
    if not manifest.generation:
        raise CheckError(f"{directory}/manifest.json has no generation settings; export the artifact again.")
    inputs = [
        ("IMAGE", "bytes", [1]),
        ("TEXT", "bytes", [1]),
        ("MAX_NEW_TOKENS", "int32", [1]),
        ("NUM_BEAMS", "int32", [1]),
        ("RAW_PROMPT", "bool", [1]),
    ]
    outputs = [("TEXT", "bytes", [1]), ("TOKEN_IDS", "int64", [-1])]
    served = {m.name: [t.name for t in m.config.input] for m in components}
    from vlexport.models.host import recipe_to_json
    from vlexport.runtime.generate import artifact_config

    if manifest.tokenizer.get("kind", "none") != "none":
        _tokenizer_json(directory, manifest)
    recipe = get_family(manifest.family).task(manifest.task).generation(artifact_config(directory))
    try:
        recipe_json = recipe_to_json(recipe, embedded.serving_modules())
    except ValueError as e:
        raise CheckError(
            f"{directory}: the {manifest.family} {manifest.task} recipe runs code a repository cannot "
            f"carry ({e}); its host stages belong in vlexport/models/host/."
        ) from None
    meta = {
        "task": manifest.task,
        "family": manifest.family,
        "components": names,
        "served_inputs": served,
        "image": _image_json(directory, manifest),
        "recipe": recipe_json,
        # the most decoder rows (requests x beams) one batched step runs; more requests wait their turn
        "max_rows": max(opts.max_batch_size, 1),
    }
    files = _support_files(directory, manifest)
    decoder = manifest.components["decoder"]
    packages = ("numpy", "pillow", "tokenizers")
    if in_process_decoder(decoder):
        meta["decoder"] = {"file": f"{DECODER_DIR}/{Path(decoder.file).name}", "device": opts.kind}
        files[meta["decoder"]["file"]] = directory / decoder.file
        if decoder.external_data:  # the graph names its data file: beside it, under its own name
            files[f"{DECODER_DIR}/{Path(decoder.external_data).name}"] = directory / decoder.external_data
        packages += ("onnxruntime",)
    cfg = tc.python_config(
        name, inputs, outputs, opts, optional=("TEXT", "MAX_NEW_TOKENS", "NUM_BEAMS", "RAW_PROMPT")
    )
    return python_model(
        name,
        cfg,
        "vlexport.serve.py_generate",
        opts.kind,
        files,
        {SERVE_JSON: json.dumps(meta, indent=1)},
        needs=packages,
    )


def _image_json(directory: Path, manifest: Manifest) -> dict[str, Any]:
    from vlexport.runtime.preprocess import image_settings

    return dataclasses.asdict(image_settings(directory, manifest))


def _code(fn: Any, directory: Path) -> dict[str, Any]:
    try:
        return code_ref(fn, embedded.serving_modules())
    except ValueError as e:
        raise CheckError(
            f"{directory}: its task runs code a repository cannot carry ({e}); such host code belongs "
            "in vlexport/models/host/ or models/scores.py."
        ) from None


def _tokenizer_json(directory: Path, manifest: Manifest) -> Path | None:
    """The artifact's tokenizer.json (what served models read with `tokenizers`); None without a tokenizer."""
    if manifest.tokenizer.get("kind", "none") == "none":
        return None
    path = directory / "tokenizer.json"
    if "tokenizer.json" not in manifest.files or not path.is_file():
        raise UsageError(
            f"{directory} has a tokenizer without tokenizer.json (only a slow tokenizer's files), which "
            "served models cannot read without transformers. Save the fast tokenizer into the export "
            "source (AutoTokenizer.from_pretrained(...).save_pretrained(dir)) and export again."
        )
    return path


# ---------------------------------------------------------------- the repository
def _check_ensemble_applies(directories: list[Path], name: str | None) -> None:
    """--ensemble adds pre- and post-processing to encoder artifacts; given only generative ones (whose model
    already takes image bytes and text and returns text) it would do nothing: a usage error, not ignored."""
    generative = [
        d for d in directories if get_family((m := Manifest.read(d)).family).task(m.task).generative
    ]
    if generative and len(generative) == len(directories):
        first = generative[0]
        model = name or sanitize(Path(os.path.abspath(first)).name)
        raise UsageError(
            f"{first} is a generative artifact: its model `{model}` already takes image bytes and "
            "text and returns text (it runs the generation loop), so --ensemble, which adds pre- and "
            "post-processing to encoder artifacts, would do nothing. Drop --ensemble."
        )


def plan_repository(
    directories: list[Path], opts: tc.ServeOptions, *, name: str | None = None, backend: str | None = None
) -> list[PlannedModel]:
    opts.check()
    if name is not None:
        check_name(name)
        if len(directories) > 1:
            raise UsageError(
                f"--name names one model, and {len(directories)} artifacts were given: their models would "
                "collide. Run `vlexport triton` once per artifact with its own --name."
            )
    if opts.ensemble:
        _check_ensemble_applies(directories, name)
    planned: list[PlannedModel] = []
    for directory in directories:
        base = name or sanitize(Path(os.path.abspath(directory)).name)
        served = serving_backend(directory, Manifest.read(directory), backend)
        planned += plan_artifact(directory, base, dataclasses.replace(opts, backend=served), served)
    seen: dict[str, int] = {}
    for m in planned:
        seen[m.name] = seen.get(m.name, 0) + 1
        # what Triton will read parses back (it always should: built as the protobuf)
        tc.parse(tc.to_text(m.config))
    dup = sorted(n for n, k in seen.items() if k > 1)
    if dup:
        raise UsageError(
            f"Model name(s) {dup} would be written twice (two artifacts with the same directory name?). "
            "Give each artifact its own --name in separate runs."
        )
    return planned


def _clone_or_copy(src: Path, dst: Path) -> None:
    """A reflink where the filesystem has them (no second copy of multi-GB weights), else a copy; never a hard
    link: replacing a served model's file in place would then rewrite the artifact it came from."""
    with src.open("rb") as fin, dst.open("wb") as fout:
        try:
            fcntl.ioctl(fout.fileno(), _FICLONE, fin.fileno())
            cloned = True
        except OSError:
            cloned = False
    if not cloned:
        shutil.copyfile(src, dst)  # sendfile: in the kernel, no Python buffer
    shutil.copymode(src, dst)


def check_repository(repo: Path, display: Path, *, force: bool) -> None:
    """``repo`` (an existing directory) must be a Triton model repository: model folders (a config.pbtxt
    each), and, without --force, whatever else the user keeps there (hidden entries, notes), which stays
    untouched. ``--force`` replaces the whole directory, so it takes only a repository holding nothing but
    models."""
    entries = sorted(repo.iterdir())
    models = [
        p for p in entries if not p.name.startswith(".") and p.is_dir() and (p / "config.pbtxt").is_file()
    ]
    # the root requirements.txt is the repository's own (what its python models import), not a user's entry
    others = [p.name for p in entries if p not in models and p.name != REQUIREMENTS_TXT]
    if any(not p.name.startswith(".") for p in entries) and not models:
        raise UsageError(
            f"-o {display} is a folder that is not a Triton model repository (no model folder with a "
            f"config.pbtxt; it holds {', '.join(others[:5])}{' ...' if len(others) > 5 else ''}). "
            "Nothing was written: choose a new or empty folder, or an existing model repository."
        )
    if force and others:
        raise UsageError(
            f"-o {display} holds {', '.join(others[:5])}{' ...' if len(others) > 5 else ''}, which "
            "are not Triton models, and --force replaces the whole repository. Nothing was written: "
            "drop --force to add the models beside them, or move those entries out first."
        )


def _write_models(root: Path, planned: list[PlannedModel], opts: tc.ServeOptions) -> None:
    for m in planned:
        version = root / m.name / str(opts.version)
        version.mkdir(parents=True)
        (root / m.name / "config.pbtxt").write_text(tc.to_text(m.config))
        for rel, src in m.files.items():
            (version / rel).parent.mkdir(parents=True, exist_ok=True)
            _clone_or_copy(src, version / rel)
        for rel, text in m.texts.items():
            (version / rel).parent.mkdir(parents=True, exist_ok=True)
            (version / rel).write_text(text)


def write_repository(
    directories: list[Path],
    out: Path,
    opts: tc.ServeOptions,
    *,
    name: str | None = None,
    backend: str | None = None,
    force: bool = False,
) -> list[str]:
    """Write (or extend) the repository ``out``; return the names of the models written.

    A new repository, or ``--force``, is staged whole and renamed into place (artifact.staged_dir). An
    existing one is extended in place: the new models are staged beside it and each renamed into it; nothing
    already there is read, copied, re-linked or removed. A symlinked ``out`` is written through to its target.
    """
    planned = plan_repository(directories, opts, name=name, backend=backend)
    out = Path(out)
    real = real_target(out)
    if real.is_dir() and (real / MANIFEST).is_file():
        raise UsageError(
            f"-o {out} is a vlexport artifact directory, not a Triton model repository. Choose another -o."
        )
    if real.is_dir():
        check_repository(real, out, force=force)
    expected = sum(p.stat().st_size for m in planned for p in m.files.values())
    if force or not real.is_dir():
        with staged_dir(out, force=True, expected_bytes=expected, source_dir=directories) as tmp:
            _write_models(tmp, planned, opts)
            needed = [p for m in planned for p in m.packages]
            if needed:
                (tmp / REQUIREMENTS_TXT).write_text(embedded.requirements_text(needed))
        return [m.name for m in planned]
    with output_scope():
        # the lock, before anything is looked at again
        check_output_dir(real, force=True, source_dir=directories)
        check_repository(real, out, force=False)
        taken = sorted({p.name for p in real.iterdir()} & {m.name for m in planned})
        if taken:
            raise UsageError(
                f"Repository {out} already holds model(s) {taken}. Pass --force to replace the "
                "repository, or --name to add these under another name."
            )
        needed = [p for m in planned for p in m.packages]
        req = real / REQUIREMENTS_TXT
        with scratch_dir(real, expected_bytes=expected) as scratch:
            _write_models(scratch, planned, opts)
            moved: list[Path] = []
            with signals_held():
                if needed:  # first: a superset of what the models import is harmless should a rename fail
                    atomic_write_text(
                        req, embedded.requirements_text(needed, req.read_text() if req.is_file() else "")
                    )
                try:
                    for m in planned:
                        (scratch / m.name).rename(real / m.name)
                        moved.append(real / m.name)
                except BaseException:
                    for path in moved:  # all or none of this run's models
                        shutil.rmtree(path, ignore_errors=True)
                    raise
    return [m.name for m in planned]
