"""The contract between the orchestrator (pipeline.run_export) and the backends, and the one registry of
backends.

A backend turns components into files and loads them back:

* a **base** backend (``parent is None``: ONNX, AOTInductor) exports each component from the eager torch
  module with :meth:`Backend.export_component`;
* a **derived** backend (``parent`` names another backend: TensorRT and ONNX-Runtime-optimized graphs from
  ONNX now, quantized variants next) builds its components from a parent artifact with
  :meth:`Backend.derive`. The orchestrator makes the parent first when the user gave a model.

Every backend :meth:`Backend.load`\\ s its component files as callables (named numpy arrays in and out),
which is all the runtime, validation and the benchmark need. The name a backend registers under is the
one the CLI takes, the manifest records and bench rows show. Backends never import the orchestrator;
see docs/ARCHITECTURE.md for the layers and the "new backend" checklist.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from vlexport.contracts.precision import Fp32Config, PrecisionConfig, precisions_for_backend
from vlexport.errors import UsageError

if TYPE_CHECKING:
    from transformers import PretrainedConfig

    from vlexport.contracts.family import ComponentSpec, FamilySpec, TaskSpec
    from vlexport.contracts.manifest import Component, Manifest

ComponentFn = Callable[[dict[str, Any]], dict[str, Any]]
Progress = Callable[[str], None]

KERNEL_NAMES = ("attention", "bridge")


@dataclass
class ExportJob:
    """One export: what to build, with which backend and precision, and where. The orchestrator's only
    input."""

    model: str  # preset name, save_pretrained directory, or (derived backends) a parent artifact directory
    output: Path | None  # None: ./<model>-<task>-<backend>
    backend: str = "onnx"
    task: str | None = None
    # the precision config with its knobs (contracts/precision.py), built once where the name entered
    precision: PrecisionConfig = field(default_factory=Fp32Config)
    random_weights: bool = False
    seed: int = 0
    # glob patterns of checkpoint tensors that may be absent and freshly (seeded) initialised, e.g. a new head
    allow_new_weights: tuple[str, ...] = ()
    kernels: tuple[str, ...] = ()
    force: bool = False
    validate: bool = True
    options: dict[str, Any] = field(default_factory=dict)  # backend options (Backend.options names them)
    # reduced precisions: a variant below its accuracy thresholds is kept, marked degraded (--accept-degraded)
    accept_degraded: bool = False
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage, filled by the orchestrator
    # derived builds only: every component's own precision (`quantize --components`); ``precision`` is then
    # the loosest of them (contracts/precision.py ``loosest``), whose tolerance judges the whole artifact
    component_precisions: dict[str, PrecisionConfig] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.output = Path(self.output) if self.output is not None else None
        self.kernels = tuple(self.kernels)
        self.allow_new_weights = tuple(self.allow_new_weights)
        if not isinstance(self.precision, PrecisionConfig):
            raise TypeError(
                f"ExportJob.precision takes a PrecisionConfig (contracts.precision.get_precision at the "
                f"place the name enters), got {self.precision!r}"
            )
        unknown = [k for k in self.kernels if k not in KERNEL_NAMES]
        if unknown:
            raise UsageError(
                f"Unknown kernel(s) {unknown}: --kernels takes a comma list of {', '.join(KERNEL_NAMES)}."
            )

    def option(self, name: str) -> Any:
        return self.options[name]


@dataclass(frozen=True)
class LoadOptions:
    """How the caller will run a loaded component: one value for every backend's ``load``."""

    device: str = "auto"  # cpu | cuda | auto
    threads: int | None = None  # intra-op threads; None: the runtime's default
    # the caller alternates this component with other work on the same cores (the benchmark): thread pools
    # must not spin-wait between calls
    interleaved: bool = False
    # a generative decoder, called once per new token (one query row per sequence), which a backend may load
    # with kernels for that shape (runtime/onnx_session.py)
    decode_step: bool = False


LOAD_DEFAULTS = LoadOptions()


@dataclass
class DeriveContext:
    """What a derived backend gets: the parent artifact, the staging directory, and the task it serves."""

    parent_dir: Path
    parent: Manifest  # of the parent artifact
    out_dir: Path  # the staging directory: write the new component files here
    job: ExportJob
    task_spec: TaskSpec
    family: FamilySpec
    config: PretrainedConfig  # the HF config (calibration inputs need it)
    progress: Progress = lambda msg: None
    parent_is_scratch: bool = False  # the parent was built for this export only: its files may be moved
    only: frozenset[str] | None = (
        None  # the components this build rewrites (None: all; the rest are built apart)
    )


@dataclass
class Derived:
    components: dict[str, Component]
    # recorded in manifest.derived_from (e.g. TRT shapes)
    details: dict[str, Any] = field(default_factory=dict)
    fused_ops: dict[str, dict[str, int]] = field(default_factory=dict)  # component -> fused op type counts
    files: list[str] = field(default_factory=list)  # other files written into the artifact (hashed, listed)


@runtime_checkable
class Backend(Protocol):
    name: str  # CLI, manifest and bench rows
    suffix: str  # component file suffix, e.g. ".onnx"
    parent: str | None  # derived backends: the backend whose artifacts they are built from
    options: Mapping[str, Any]  # option name -> default (ExportJob.options)
    validation_device: str  # where validation runs the artifact: "cpu" | "cuda"
    description: str
    # The precisions it builds. None (the built-ins): the precision configs' ``backends`` say
    # (contracts/precision.py); a backend registered from outside declares its own.
    precisions: tuple[str, ...] | None
    # Triton Inference Server backends that run its files, the default first (``vlexport triton``); () = none
    triton_backends: tuple[str, ...]

    def check(self, job: ExportJob) -> None:
        """Fail (UsageError) before any work: a missing toolchain or device, a bad option value."""

    def export_component(
        self,
        module: Any,
        spec: ComponentSpec,
        example: Mapping[str, Any],
        path: Path,
        job: ExportJob,
        translation_table: Mapping[Any, Any],
    ) -> Component:
        """Base backends: export ``module`` (forward(*inputs) -> tuple) to ``path``; return a
        manifest.Component."""

    def derive(self, ctx: DeriveContext) -> Derived:
        """Derived backends: build every component of the parent artifact into ``ctx.out_dir``."""

    def load(self, path: Path, options: LoadOptions = LOAD_DEFAULTS) -> ComponentFn:
        """A component file as a callable with ``input_names`` / ``output_names``, run as ``options``
        say."""


class BackendBase:
    """Defaults for the protocol's optional parts, so a backend writes only what it does."""

    parent: str | None = None
    options: Mapping[str, Any] = {}
    validation_device = "cpu"
    description = ""
    precisions: tuple[str, ...] | None = None
    triton_backends: tuple[str, ...] = ()

    def check(self, job: ExportJob) -> None:
        return None

    def export_component(
        self,
        module: Any,
        spec: ComponentSpec,
        example: Mapping[str, Any],
        path: Path,
        job: ExportJob,
        translation_table: Mapping[Any, Any],
    ) -> Component:
        raise UsageError(
            f"Backend {self.name} is built from a {self.parent} artifact, not exported from torch."
        )

    def derive(self, ctx: DeriveContext) -> Derived:
        raise UsageError(f"Backend {self.name} exports from torch; it is not derived from another artifact.")


# ---------------------------------------------------------------- the registry
# The built-in backends, by name -> the module whose import registers it. Names are listed here so that
# `--help` and `vlexport list` can show them without importing torch.
BUILTIN: dict[str, str] = {
    "onnx": "vlexport.export.onnx",
    "onnx-opt": "vlexport.export.onnx_optimized",
    "aoti": "vlexport.export.aoti",
    "tensorrt": "vlexport.export.tensorrt",
}
# Earlier spellings users may still type; never written anywhere.
ALIASES = {"trt": "tensorrt"}
_REGISTRY: dict[str, Backend] = {}


def register_backend(backend: Backend) -> Backend:
    """Add ``backend`` under ``backend.name`` (tests register throwaway backends the same way)."""
    if not isinstance(backend, Backend):
        raise TypeError(f"{backend!r} does not implement the Backend protocol (contracts/backends.py)")
    if backend.parent is not None and backend.parent == backend.name:
        raise ValueError(f"backend {backend.name} cannot derive from itself")
    _REGISTRY[backend.name] = backend
    return backend


def unregister_backend(name: str) -> None:
    _REGISTRY.pop(name, None)


def backend_precisions(backend: Backend) -> tuple[str, ...]:
    """What ``backend`` builds: its own declaration, else every precision config that names it."""
    if getattr(backend, "precisions", None) is not None:
        return tuple(backend.precisions)
    return precisions_for_backend(backend.name)


def backend_options(backend: Backend) -> dict[str, Any]:
    """Option name -> default; a derived backend also takes its parent's options (``--optimize --opset
    17``)."""
    parent = backend_options(get_backend(backend.parent)) if backend.parent else {}
    return {**parent, **dict(backend.options)}


def canonical_name(name: str) -> str:
    return ALIASES.get(name, name)


def backend_names() -> tuple[str, ...]:
    return tuple(dict.fromkeys([*BUILTIN, *_REGISTRY]))


def get_backend(name: str) -> Backend:
    name = canonical_name(name)
    if name not in _REGISTRY and name in BUILTIN:
        importlib.import_module(BUILTIN[name])  # registers it
    backend = _REGISTRY.get(name)
    if backend is None:
        raise UsageError(f"Unknown backend {name!r}: choose from {', '.join(backend_names())}.")
    return backend
