"""The artifact manifest (``manifest.json``, schema ``vlexport-artifact/1``): read and written only here.

Every stage reads and writes an artifact directory described by its manifest, so no stage needs to
know which stage ran before it.
"""

from __future__ import annotations

import hashlib
import json
import platform
import time
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from vlexport.contracts.precision import PrecisionConfig, precision_from_record
from vlexport.errors import CheckError, UsageError
from vlexport.userdata import ShapeError, checked_fields, kind_of, read_json

SCHEMA = "vlexport-artifact/1"
MANIFEST = "manifest.json"
_VERSIONED = ("vlexport", "torch", "transformers", "onnx", "onnxruntime", "onnxscript", "triton", "tensorrt")


@dataclass
class TensorSpec:
    name: str
    dtype: str  # numpy-style name: float32, int64, ...
    shape: list[int | str]  # ints are static, strings name dynamic axes


@dataclass
class Component:
    name: str
    file: str  # relative to the artifact directory
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    external_data: str | None = None  # relative path of the external-data file, when there is one
    size_bytes: int = 0
    opset: int | None = None  # ONNX files: the default-domain opset the graph declares (read off the file)

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "component") -> Component:
        """Raises ShapeError naming ``where`` and the field when ``d`` is not a component record."""
        values = checked_fields(cls, d, where)
        for key in ("inputs", "outputs"):
            values[key] = [
                TensorSpec(**checked_fields(TensorSpec, t, f"{where}.{key}[{i}]"))
                for i, t in enumerate(values[key])
            ]
        return cls(**values)

    def input(self, name: str) -> TensorSpec | None:
        return next((t for t in self.inputs if t.name == name), None)


@dataclass
class AccuracyReport:
    """What a reduced-precision variant did to accuracy against eager fp32 (written by validate.accuracy).

    Measured on the seeded validation inputs, never on a calibration set. ``outputs``: per output, the
    smallest cosine and largest absolute error over the shapes; ``tasks``: per output, the task-level
    agreement kind (ITM argmax, ITC rank@1, MLM top-1, ...) and its share; ``generation``: greedy token
    agreement, mean first-divergence step, per-step logit cosine up to the first divergence.
    """

    precision: str
    passed: bool
    thresholds: dict[str, float] = field(default_factory=dict)  # the precision config's Tolerance
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)
    generation: dict[str, Any] | None = None
    misses: list[str] = field(default_factory=list)  # one line per threshold missed
    degraded: bool = False  # kept below its thresholds with --accept-degraded
    calibration: dict[str, Any] | None = None  # int8-static: where its scales came from (not these inputs)
    # generative variants with two or more changed components: each alone at reduced precision, the others
    # fp32 (validate/attribution.py): {"decoder": {"precision": ..., "greedy_token_agreement": ..., ...}}
    components: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "validation.accuracy") -> AccuracyReport:
        return cls(**checked_fields(cls, d, where))

    def lines(self) -> list[str]:
        """The report as the CLI prints it."""
        out = [
            f"accuracy vs eager fp32 ({self.precision}): {'passed' if self.passed else 'BELOW THRESHOLD'}"
            + (" - kept with --accept-degraded" if self.degraded else "")
        ]
        for name, o in self.outputs.items():
            out.append(f"  {name}: cosine {_g6(o.get('cosine'))}, max abs err {_g(o.get('max_abs'))}")
        for name, t in self.tasks.items():
            out.append(
                f"  {name}: {t.get('kind')} agreement {_pct(t.get('agreement'))} (near-ties included: "
                f"{_pct(t.get('agreement_with_near_ties'))})"
            )
        g = self.generation or {}
        if g:
            out.append(
                f"  generation: greedy tokens equal for {_pct(g.get('greedy_token_agreement'))} of samples "
                f"(near-ties included: {_pct(g.get('agreement_with_near_ties'))}), mean first divergence "
                f"step {_g(g.get('mean_first_divergence_step'))}, logit cosine min "
                f"{_g6(g.get('min_logit_cosine'))} / mean {_g6(g.get('mean_logit_cosine'))}; beam tokens "
                f"equal for {_pct(g.get('beam_token_agreement'))} (near-ties included: "
                f"{_pct(g.get('beam_agreement_with_near_ties'))})"
            )
        if self.components:
            out.append("  per component (each alone at its precision, the others fp32; greedy decoding):")
            for name, c in self.components.items():
                out.append(
                    f"    {name} {c.get('precision')}: greedy tokens equal for "
                    f"{_pct(c.get('greedy_token_agreement'))} (near-ties included: "
                    f"{_pct(c.get('agreement_with_near_ties'))}), mean first divergence step "
                    f"{_g(c.get('mean_first_divergence_step'))}, logit cosine min "
                    f"{_g6(c.get('min_logit_cosine'))} / mean {_g6(c.get('mean_logit_cosine'))}"
                )
        if self.calibration:
            out.append(
                f"  calibration: {self.calibration.get('source')} ({self.calibration.get('samples')} "
                "samples, "
                f"{self.calibration.get('method')})"
            )
        out += [f"  missed: {m}" for m in self.misses]
        return out


@dataclass
class ValidationReport:
    """What validation found, as the manifest stores it (written by vlexport.validate, read by everyone else).

    ``checks`` / ``failures`` hold one dict per check (validate's OutputCheck / TokenCheck, serialised):
    per output and shape for encoders, per sample and decode mode for generation.
    """

    passed: bool | None  # None: validation was skipped (--no-validate)
    reference: str = ""
    precision: str = ""
    tolerance: dict[str, Any] = field(default_factory=dict)
    shapes: list[str] = field(default_factory=list)
    max_abs_error: dict[str, float] = field(default_factory=dict)
    checks: list[dict[str, Any]] = field(default_factory=list)
    failures: list[dict[str, Any]] = field(default_factory=list)
    summary: str = ""
    generation: dict[str, Any] | None = None  # generative tasks: samples, modes, tokens compared, margins
    accuracy: AccuracyReport | None = None  # reduced precisions: the accuracy report (validate/accuracy.py)

    @property
    def skipped(self) -> bool:
        return self.passed is None

    @property
    def verdict(self) -> str:
        return "skipped" if self.skipped else ("passed" if self.passed else "FAILED")

    @classmethod
    def skipped_report(cls) -> ValidationReport:
        return cls(passed=None, summary="validation skipped (--no-validate)")

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "validation") -> ValidationReport:
        """Raises ShapeError naming ``where`` and the field when ``d`` is not a validation report."""
        if isinstance(d, dict) and d.get("skipped"):  # manifests written before this class
            return cls.skipped_report()
        values = checked_fields(cls, d, where)
        if values.get("accuracy") is not None:
            values["accuracy"] = AccuracyReport.from_dict(values["accuracy"], f"{where}.accuracy")
        return cls(**values)

    def failure_lines(self, limit: int = 8) -> list[str]:
        """One line per failed check, for the error a miss raises."""
        lines = []
        for f in self.failures[:limit]:
            if f.get("step") is not None or f.get("output") == "tokens":  # generation mismatch
                lines.append(f"  sample {f.get('sample')}: {f.get('detail')}")
                continue
            err = ", ".join(
                f"{k}={_g(f[k])}"
                for k in ("max_abs", "max_rel", "cosine", "agreement")
                if f.get(k) is not None
            )
            lines.append(
                f"  {f.get('output')} @ {f.get('shape')}: {f.get('kind')} ({err}) limit "
                f"{f.get('limit') or '-'} {f.get('detail', '')}"
            )
        if len(self.failures) > limit:
            lines.append(f"  ... and {len(self.failures) - limit} more")
        return lines


@dataclass
class Manifest:
    family: str
    task: str
    hf_class: str
    backend: str  # a registered backend name (contracts/backends.py): onnx | onnx-opt | aoti | tensorrt | ...
    precision: str  # a registered precision name (contracts/precision.py PRECISIONS): fp32 | fp16 | ...
    source: dict[str, Any]  # {"preset": ..., "path": ..., "checkpoint": ...}
    weights: dict[str, Any]  # origin: {"kind": local|hf-cache|hub|random, "seed"/"path"/"header_sha256"...}
    components: dict[str, Component]
    kernels: list[str] = field(default_factory=list)
    # the precision config's knobs (PrecisionConfig.knobs: block size, calibration method...); with
    # ``precision`` they rebuild the config (``precision_config``). Absent in manifests written before knobs
    # were recorded.
    precision_knobs: dict[str, Any] = field(default_factory=dict)
    # `quantize --components`: each component's precision name ({"decoder": "int4-weight",
    # "image_encoder": "fp32"}); ``precision`` is then the loosest of them, and ``derived_from`` holds each
    # pass's details under its name. Empty: every component is at ``precision``.
    component_precisions: dict[str, str] = field(default_factory=dict)
    opset: int | None = None
    image_size: int | None = None
    files: list[str] = field(default_factory=list)  # config / processor / tokenizer files copied in
    tokenizer: dict[str, Any] = field(default_factory=dict)  # {"kind": "copied"|"placeholder", ...}
    generation: dict[str, Any] = field(default_factory=dict)  # generation settings for generative tasks
    derived_from: dict[str, Any] | None = None  # for quantized / converted artifacts: the parent's identity
    # component -> fused op counts (onnx-opt)
    fused_ops: dict[str, dict[str, int]] = field(default_factory=dict)
    validation: ValidationReport | None = None
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage (load, export, validate...)
    # relative path -> sha256 of every component and support file, recorded before validation: what was
    # validated
    sha256: dict[str, str] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    created: str = ""
    schema: str = SCHEMA

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, default=str) + "\n"

    @property
    def precision_config(self) -> PrecisionConfig:
        """The precision this artifact was built at, with its knobs (a name enters the program here)."""
        return precision_from_record(self.precision, self.precision_knobs)

    def write(self, directory: Path) -> None:
        if not self.versions:
            self.versions = library_versions()
        if not self.created:
            self.created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        (directory / MANIFEST).write_text(self.to_json())

    @classmethod
    def read(cls, directory: str | Path) -> Manifest:
        from vlexport.artifact import describe_partial

        directory = Path(directory)
        path = directory / MANIFEST
        # a staging dir (a killed run's, or one in progress) is no artifact
        note = describe_partial(directory)
        if note:
            raise UsageError(note)
        if not directory.is_dir():
            raise UsageError(
                f"{directory} is not a directory. Pass an artifact directory written by vlexport."
            )
        if not path.is_file():
            raise UsageError(
                f"{directory} has no {MANIFEST}: it is not a vlexport artifact directory. Export one first, "
                "e.g. "
                "`vlexport onnx bridgetower-tiny --random-weights -o DIR`."
            )
        d = read_json(path, advice="The artifact is damaged: export it again.")
        if not isinstance(d, dict):
            raise CheckError(
                f"{path} holds {kind_of(d)}, not a manifest object (schema {SCHEMA}); the artifact is "
                "damaged, export it again."
            )
        if d.get("schema") != SCHEMA:
            raise CheckError(f"{path} has schema {d.get('schema')!r}, expected {SCHEMA!r}; export it again.")
        try:
            values = checked_fields(cls, d, "manifest")
            values["components"] = {
                k: Component.from_dict(v, f"components[{k!r}]") for k, v in values["components"].items()
            }
            validation = values.get("validation") or None
            if validation is not None and "fused_ops" in validation:  # written before the fused_ops field
                values.setdefault("fused_ops", validation["fused_ops"])
                if not isinstance(values["fused_ops"], dict):
                    raise ShapeError(
                        f"validation.fused_ops must be an object, got {kind_of(values['fused_ops'])}"
                    )
            values["validation"] = ValidationReport.from_dict(validation) if validation is not None else None
            manifest = cls(**values)
        except ShapeError as e:
            raise CheckError(
                f"{path} does not match schema {SCHEMA}: {e}. The artifact is damaged or was not "
                "written by vlexport: export it again."
            ) from None
        manifest.check_files(directory)
        return manifest

    def check_files(self, directory: Path) -> None:
        """Every file the manifest names must exist with the recorded size."""
        for comp in self.components.values():
            for rel in filter(None, (comp.file, comp.external_data)):
                _check_inside(directory, rel)
                if not (directory / rel).is_file():
                    raise CheckError(
                        f"{directory} is incomplete: component {comp.name!r} needs {rel}, which is missing. "
                        "Export the artifact again."
                    )
            size = component_size(directory, comp)
            if comp.size_bytes and size != comp.size_bytes:
                raise CheckError(
                    f"{directory}: component {comp.name!r} files are {size} bytes, the manifest records "
                    f"{comp.size_bytes}: the files were changed or truncated. Export the artifact again."
                )
        for rel in self.files:
            _check_inside(directory, rel)
            if not (directory / rel).is_file():
                raise CheckError(f"{directory} is incomplete: {rel} is missing. Export the artifact again.")

    def hashed_files(self) -> list[str]:
        """The files the content hashes cover: every component's graph and external data, the support
        files."""
        comps = [rel for c in self.components.values() for rel in (c.file, c.external_data) if rel]
        return [*comps, *self.files]

    def record_hashes(self, directory: Path) -> None:
        """Hash every file of ``hashed_files`` (streamed: one read of each, whatever its size)."""
        self.sha256 = {rel: file_sha256(directory / rel) for rel in self.hashed_files()}

    def verify_hashes(self, directory: Path, *, suffixes: tuple[str, ...] | None = None) -> None:
        """Each recorded file (those ending in ``suffixes`` only, when given) still has its recorded content.

        A mismatch is a CheckError naming the file: what would run is not what was validated. Manifests
        written before hashes were recorded have none; they pass (their sizes were checked by :meth:`read`).
        """
        for rel, digest in self.sha256.items():
            if suffixes is not None and not rel.endswith(suffixes):
                continue
            _check_inside(directory, rel)
            path = directory / rel
            if not path.is_file():
                raise CheckError(f"{directory} is incomplete: {rel} is missing. Export the artifact again.")
            if file_sha256(path) != digest:
                what = (
                    "the config the graph was exported from"
                    if rel == "config.json"
                    else "a support file"
                    if rel in self.files
                    else "a component file"
                )
                raise CheckError(
                    f"{path} ({what}) changed after export: its sha256 is not the one recorded when the "
                    "artifact was validated, so it is not the file that was validated (and native code "
                    "in it is not loaded). Restore the artifact from a good copy or export it again."
                )


def file_sha256(path: Path) -> str:
    """sha256 of a file, streamed in 8 MiB blocks (a 15 GB weights file costs one read, no memory)."""
    with path.open("rb") as f:
        return _stream(f)


def _stream(f: Any) -> str:
    h = hashlib.sha256()
    buf = bytearray(8 << 20)
    view = memoryview(buf)
    while n := f.readinto(buf):
        h.update(view[:n])
    return h.hexdigest()


def _check_inside(directory: Path, rel: str) -> None:
    """A manifest names files inside its directory only: an artifact from elsewhere must not point us at
    others."""
    if Path(rel).is_absolute() or ".." in Path(rel).parts:
        raise CheckError(
            f"{directory / MANIFEST} names {rel!r}, a path outside the artifact directory; the "
            "manifest is damaged or not from vlexport. Export the artifact again."
        )


def _pct(share: float | None) -> str:
    return "n/a" if share is None else f"{share:.0%}"


def _g(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, (int, float)) else str(value)


def _g6(value: Any) -> str:
    return f"{value:.6f}" if isinstance(value, float) else str(value)


def component_size(directory: Path, comp: Component) -> int:
    return sum((directory / rel).stat().st_size for rel in filter(None, (comp.file, comp.external_data)))


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out
