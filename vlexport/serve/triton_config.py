"""Triton ``config.pbtxt`` files, built as tritonclient's ``ModelConfig`` protobuf and written in text format.

Building the message (not a template) means a wrong field or value fails here, before anything is written, and
what is written is what Triton parses ("failed to read text proto" cannot happen). The batch dimension of
a component's inputs/outputs is folded into ``max_batch_size`` when every tensor has a dynamic axis 0 named
``batch``; dynamic axes become -1.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from vlexport.contracts.manifest import Component, TensorSpec
from vlexport.errors import CheckError, UsageError

KINDS = ("gpu", "cpu")
BACKENDS = ("onnxruntime", "tensorrt", "pytorch", "python-onnxruntime")
BATCH_AXIS = "batch"

# numpy / manifest dtype name -> Triton DataType name
DTYPES = {
    "bool": "TYPE_BOOL",
    "uint8": "TYPE_UINT8",
    "uint16": "TYPE_UINT16",
    "uint32": "TYPE_UINT32",
    "uint64": "TYPE_UINT64",
    "int8": "TYPE_INT8",
    "int16": "TYPE_INT16",
    "int32": "TYPE_INT32",
    "int64": "TYPE_INT64",
    "float16": "TYPE_FP16",
    "float32": "TYPE_FP32",
    "float64": "TYPE_FP64",
    "bfloat16": "TYPE_BF16",
    "string": "TYPE_STRING",
    "bytes": "TYPE_STRING",
}


def _pb() -> Any:
    try:
        from tritonclient.grpc import model_config_pb2
    except (ImportError, RuntimeError) as e:  # tritonclient without its grpc extra raises RuntimeError
        raise UsageError(
            f"`vlexport triton` builds configs with tritonclient's ModelConfig protobuf, which is not "
            f"importable here ({e}). pip install 'vlexport[triton]' (tritonclient[grpc])."
        ) from None
    return model_config_pb2


def triton_dtype(name: str) -> str:
    """The Triton data type of a manifest dtype name; unknown names are refused (never guessed)."""
    try:
        return DTYPES[name]
    except KeyError:
        raise CheckError(
            f"The manifest records tensor dtype {name!r}, which has no Triton data type; the artifact "
            "is damaged or from a newer vlexport. Export it again."
        ) from None


INT32_MAX, INT64_MAX = 2**31 - 1, 2**63 - 1


@dataclass(frozen=True)
class ServeOptions:
    """What `vlexport triton` takes besides the artifacts; checked in ``check`` before anything is written."""

    max_batch_size: int = 8
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_delay_us: int = 100
    instances: int = 1
    kind: str = "gpu"
    backend: str = "onnxruntime"
    version: int = 1
    ensemble: bool = False
    extra: Mapping[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        if self.kind not in KINDS:
            raise UsageError(f"--kind must be one of {', '.join(KINDS)}, got {self.kind!r}.")
        if self.backend not in BACKENDS:
            raise UsageError(f"--backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}.")
        if self.max_batch_size < 0:
            raise UsageError(f"--max-batch-size must be >= 0 (0: no batching), got {self.max_batch_size}.")
        bad = [b for b in self.preferred_batch_sizes if not 1 <= b <= max(self.max_batch_size, 0)]
        if bad:
            raise UsageError(
                f"--preferred-batch-sizes {bad} lie outside 1..--max-batch-size "
                f"({self.max_batch_size}); each preferred size must be a batch Triton may form."
            )
        if self.max_queue_delay_us < 0:
            raise UsageError(f"--max-queue-delay-us must be >= 0, got {self.max_queue_delay_us}.")
        if self.instances < 1:
            raise UsageError(f"--instances must be >= 1, got {self.instances}.")
        if self.version < 1:
            raise UsageError(
                f"--version must be >= 1 (Triton's version folders are 1, 2, ...), got {self.version}."
            )
        # What Triton's config fields and version folders hold (int32, uint64, int64): larger values made
        # protobuf raise a raw ValueError, or a version folder Triton cannot parse.
        for flag, value, limit in (
            ("--max-batch-size", self.max_batch_size, INT32_MAX),
            ("--instances", self.instances, INT32_MAX),
            ("--max-queue-delay-us", self.max_queue_delay_us, INT64_MAX),
            ("--version", self.version, INT64_MAX),
        ):
            if value > limit:
                raise UsageError(
                    f"{flag} {value} is beyond what Triton reads there (at most {limit}); give a "
                    "smaller value."
                )

    @property
    def instance_kind(self) -> str:
        return "KIND_GPU" if self.kind == "gpu" else "KIND_CPU"


def batched(component: Component) -> bool:
    """True when every input and output has a dynamic axis 0 named ``batch`` (Triton batches along it)."""
    tensors = [*component.inputs, *component.outputs]
    return bool(tensors) and all(t.shape and t.shape[0] == BATCH_AXIS for t in tensors)


def dims(spec: TensorSpec, fold_batch: bool) -> list[int]:
    shape = spec.shape[1:] if fold_batch else spec.shape
    return [d if isinstance(d, int) else -1 for d in shape]


def _tensors(repeated: Any, specs: Sequence[TensorSpec], fold_batch: bool) -> None:
    for t in specs:
        repeated.add(name=t.name, data_type=triton_dtype(t.dtype), dims=dims(t, fold_batch))


def _common(pb: Any, cfg: Any, opts: ServeOptions, *, kind: str | None = None, batching: bool = True) -> None:
    cfg.instance_group.add(kind=kind or opts.instance_kind, count=opts.instances)
    if batching and cfg.max_batch_size > 0:
        cfg.dynamic_batching.max_queue_delay_microseconds = opts.max_queue_delay_us
        cfg.dynamic_batching.preferred_batch_size.extend(opts.preferred_batch_sizes)
    cfg.version_policy.latest.num_versions = 1


def component_config(
    name: str, component: Component, opts: ServeOptions, *, max_batch_size: int, model_file: str
) -> Any:
    """The config of one artifact component served by ``opts.backend``."""
    pb = _pb()
    cfg = pb.ModelConfig(name=name)
    fold = max_batch_size > 0 and batched(component)
    cfg.max_batch_size = max_batch_size if fold else 0
    _tensors(cfg.input, component.inputs, fold)
    _tensors(cfg.output, component.outputs, fold)
    gpu = opts.kind == "gpu"
    if opts.backend == "onnxruntime":
        cfg.platform = "onnxruntime_onnx"
        cfg.default_model_filename = model_file
        # The artifact was validated as ORT runs it with all graph optimizations (ORT's default level).
        cfg.optimization.graph.level = 1
    elif opts.backend == "tensorrt":
        cfg.platform = "tensorrt_plan"
        cfg.default_model_filename = model_file
        if gpu:
            cfg.optimization.cuda.graphs = (
                True  # the engine's profile bounds the shapes; graphs cut launch cost
            )
    elif opts.backend == "pytorch":
        cfg.backend = "pytorch"
        cfg.default_model_filename = model_file
    else:  # python-onnxruntime: the same ONNX file, run by ONNX Runtime inside a python model
        cfg.backend = "python"
        cfg.parameters["model_file"].string_value = model_file
        cfg.parameters["device"].string_value = opts.kind
    _common(pb, cfg, opts)
    return cfg


def python_config(
    name: str,
    inputs: Sequence[tuple[str, str, list[int]]],
    outputs: Sequence[tuple[str, str, list[int]]],
    opts: ServeOptions,
    *,
    optional: Sequence[str] = (),
    parameters: Mapping[str, str] | None = None,
    decoupled: bool = False,
) -> Any:
    """A python-backend model (pre/post-processing, BLS generation); tensors as (name, dtype name, dims).

    No batching at this level: one request is one image (+ texts), as `vlexport run` takes them.
    """
    pb = _pb()
    cfg = pb.ModelConfig(name=name, backend="python", max_batch_size=0)
    for n, dtype, shape in inputs:
        cfg.input.add(name=n, data_type=triton_dtype(dtype), dims=shape, optional=n in optional)
    for n, dtype, shape in outputs:
        cfg.output.add(name=n, data_type=triton_dtype(dtype), dims=shape)
    for key, value in (parameters or {}).items():
        cfg.parameters[key].string_value = value
    if decoupled:
        cfg.model_transaction_policy.decoupled = True
    # Python models do host work (decode images, tokenize, drive the decode loop): CPU instances.
    _common(pb, cfg, opts, kind="KIND_CPU", batching=False)
    return cfg


def ensemble_config(
    name: str,
    inputs: Sequence[tuple[str, str, list[int]]],
    outputs: Sequence[tuple[str, str, list[int]]],
    steps: Sequence[tuple[str, Mapping[str, str], Mapping[str, str]]],
) -> Any:
    """An ensemble: ``steps`` are (model, {model input: ensemble tensor}, {model output: ensemble tensor})."""
    pb = _pb()
    cfg = pb.ModelConfig(name=name, platform="ensemble", max_batch_size=0)
    for n, dtype, shape in inputs:
        cfg.input.add(name=n, data_type=triton_dtype(dtype), dims=shape)
    for n, dtype, shape in outputs:
        cfg.output.add(name=n, data_type=triton_dtype(dtype), dims=shape)
    for model, input_map, output_map in steps:
        step = cfg.ensemble_scheduling.step.add(model_name=model, model_version=-1)
        step.input_map.update(input_map)
        step.output_map.update(output_map)
    return cfg


def to_text(cfg: Any) -> str:
    from google.protobuf import text_format

    return text_format.MessageToString(cfg)


def parse(text: str) -> Any:
    """Parse config.pbtxt text into ``ModelConfig`` (what Triton does on load); raises CheckError when it
    fails."""
    from google.protobuf import text_format

    try:
        return text_format.Parse(text, _pb().ModelConfig())
    except text_format.ParseError as e:
        raise CheckError(f"config.pbtxt does not parse as Triton's ModelConfig: {e}") from None
