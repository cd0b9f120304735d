"""The ``aoti`` backend: torch.export -> AOTInductor package (``<component>.pt2``) per component.

The component's dynamic axes are the ONNX spec's. The package carries its input/output names in its
metadata, so the runtime loader (runtime/components.py) needs nothing but the file. JIT ``torch.compile``
has no artifact: it is a benchmark runner (bench/) built with :func:`jit_compile`.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from vlexport.contracts.backends import LOAD_DEFAULTS, BackendBase, ExportJob, LoadOptions, register_backend
from vlexport.contracts.family import ComponentSpec
from vlexport.contracts.manifest import Component, TensorSpec
from vlexport.contracts.precision import PrecisionConfig
from vlexport.errors import CheckError, MissingToolchain, UsageError
from vlexport.export.decode_gemms import FREEZE_CHOICES, choose_freezing
from vlexport.export.onnx import _quiet_exporter, dynamic_shapes
from vlexport.models.generative import CachedDecoder
from vlexport.runtime.static_step import META_STATIC

MODES = ("default", "reduce-overhead", "max-autotune")
# Package metadata keys (strings only: AOTI metadata is a str -> str map).
META_INPUTS = "vlexport.inputs"
META_OUTPUTS = "vlexport.outputs"


def inductor_configs(mode: str, device: str = "cpu") -> dict[str, Any]:
    """Inductor settings for a ``torch.compile`` mode, applied to an AOT compile.

    reduce-overhead means CUDA graphs, which AOTInductor packages do not capture themselves: it compiles
    like default, and the runtime captures the static-cache decode step (runtime/static_step.py).
    max-autotune benchmarks matmul / conv templates at compile time (minutes). On CPU its GEMM templates
    (C++ micro-kernels over prepacked weights) only apply to constant weights, so it also freezes the
    parameters into the package. Measured on blip-image-captioning-base (one run each, ratios to the ORT
    loop, an Intel Xeon): decode step b1 0.80x -> 1.03x, b8 0.51x -> 0.74x
    (benchmarks/results/generation_compiled_cpu-modes.json). Whether freezing alone helps depends on the
    CPU's GEMMs: default-mode CPU decoders choose it by measurement (export/decode_gemms.py).
    """
    if mode not in MODES:
        raise UsageError(f"Unknown --mode {mode!r}: choose one of {', '.join(MODES)}.")
    if mode == "max-autotune":
        # quiet: Inductor writes a table per tuned matmul to stderr; the choice is in the package, not the log
        configs: dict[str, Any] = {
            "max_autotune": True,
            "max_autotune_gemm": True,
            "autotune_num_choices_displayed": 0,
            "max_autotune_report_choices_stats": False,
        }
        if device == "cpu":
            configs |= {"freezing": True, "max_autotune_gemm_backends": "CPP,ATEN"}
        return configs
    return {}


def compile_component(
    module: nn.Module,
    spec: ComponentSpec,
    example: Mapping[str, torch.Tensor],
    path: Path,
    *,
    device: str = "cpu",
    configs: Mapping[str, Any] | None = None,
    metadata: Mapping[str, str] | None = None,
    copied: bool = False,
) -> Component:
    """torch.export ``module`` with the spec's dynamic axes, AOT-compile it to ``path``, describe it.

    ``copied``: ``module`` is already a copy of the eager model's modules, so it may be moved."""
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda needs a CUDA build of torch and a GPU; this machine has neither.")
    if device != "cpu":
        # A copy: the caller's eager model stays on the CPU as the validation reference.
        module = (module if copied else copy.deepcopy(module)).to(device)
    args = tuple(example[name].to(device) for name in spec.inputs)
    meta = {
        META_INPUTS: json.dumps(list(spec.inputs)),
        META_OUTPUTS: json.dumps(list(spec.outputs)),
        **dict(metadata or {}),
    }
    with torch.no_grad(), _quiet_exporter():
        try:
            program = torch.export.export(
                module.eval(), args, dynamic_shapes=dynamic_shapes(spec, example), strict=False
            )
            torch._inductor.aoti_compile_and_package(
                program,
                package_path=str(path),
                inductor_configs={**dict(configs or {}), "aot_inductor.metadata": meta},
            )
        except (RuntimeError, torch._dynamo.exc.TorchDynamoException) as e:
            why = explain_compile_error(e)
            raise CheckError(f"AOTInductor could not compile component {spec.name!r}: {why}") from e
    return _describe(program, spec, path)


def explain_compile_error(e: BaseException) -> str:
    """The part of a torch.export / Inductor error that says why, in one paragraph (not a 200-line trace).

    A constraint violation names the dim, the guard the model put on it and torch's suggested fix; a
    missing compiler is only blamed when there is none.
    """
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    keep = [
        ln for ln in lines if not ln.startswith(("For more information", "The error above", "If you would"))
    ]
    text = " ".join(keep[:4])[:600] or type(e).__name__
    compiler = os.environ.get("CXX", "g++")
    if shutil.which(compiler) is None:
        text += f" (no C++ compiler: AOTInductor needs {compiler} on the PATH for CPU packages)"
    return text


def _describe(program: torch.export.ExportedProgram, spec: ComponentSpec, path: Path) -> Component:
    """Manifest record from the exported program: dtypes and shapes, dynamic axes under the spec's names."""
    user_inputs = set(program.graph_signature.user_inputs)
    placeholders = [n for n in program.graph.nodes if n.op == "placeholder" and n.name in user_inputs]
    (output,) = [n for n in program.graph.nodes if n.op == "output"]
    outputs = output.args[0]
    inputs = [
        TensorSpec(name, *_spec_of(node.meta["val"], spec.dynamic_axes.get(name, {})))
        for name, node in zip(spec.inputs, placeholders)
    ]
    outs = [
        TensorSpec(name, *_spec_of(node.meta["val"], spec.dynamic_axes.get(name, {})))
        for name, node in zip(spec.outputs, outputs)
    ]
    return Component(
        name=spec.name, file=path.name, inputs=inputs, outputs=outs, size_bytes=path.stat().st_size
    )


def _spec_of(val: torch.Tensor, axes: Mapping[int, str]) -> tuple[str, list[int | str]]:
    dtype = str(val.dtype).removeprefix("torch.")
    shape: list[int | str] = [
        axes.get(i, d if isinstance(d, int) else str(d)) for i, d in enumerate(val.shape)
    ]
    return dtype, shape


def jit_compile(module: nn.Module, *, mode: str = "default") -> nn.Module:
    """``torch.compile`` for benchmarking (no artifact); dynamic=None recompiles once with symbolic shapes."""
    inductor_configs(mode)  # validates the mode name
    return torch.compile(module, mode=None if mode == "default" else mode, dynamic=None)


def torchao_hint(precision: PrecisionConfig) -> str:
    return (
        f"--precision {precision.name} for compiled packages needs torchao (its int{precision.weight_bits} "
        "weight-only linears): `pip install torchao` (0.18 works with torch 2.13), then compile again."
    )


DEFAULT_MAX_LENGTH = 64  # static KV-cache slots of generative packages (prompt + new tokens)
DEFAULT_MAX_BATCH = 16  # decoder rows (batch x beams) a generative package takes


class CastIO(nn.Module):
    """Runs ``module`` in a reduced float dtype behind float32 inputs and outputs (``keep``: inputs already in
    that dtype, the static caches that the graph updates in place), so the runtime's numpy I/O is unchanged.
    """

    def __init__(
        self, module: nn.Module, dtype: torch.dtype, input_names: tuple[str, ...], keep: frozenset[str]
    ):
        super().__init__()
        self.module, self.dtype, self.input_names, self.keep = module, dtype, input_names, keep

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        args = tuple(
            a.to(self.dtype) if a.is_floating_point() and n not in self.keep else a
            for n, a in zip(self.input_names, args)
        )
        return tuple(o.float() if o.is_floating_point() else o for o in self.module(*args))


def with_precision(
    module: nn.Module,
    spec: ComponentSpec,
    example: dict[str, torch.Tensor],
    precision: PrecisionConfig,
    device: str = "cpu",
) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """A copy of ``module`` on ``device`` in ``precision`` (a float dtype: cast; int8 weights: torchao int8
    weight-only linears, quantized where they will run)."""
    # the eager model stays fp32 on the CPU: the validation reference
    module = copy.deepcopy(module).to(device)
    caches = frozenset(n for n in spec.inputs if n.startswith("cache."))
    if precision.quantizes_weights:
        try:
            from torchao.quantization import quantize_
        except ImportError:
            raise MissingToolchain(torchao_hint(precision)) from None
        quantize_(module, _torchao_config(precision))
        return module, example
    dtype = precision.torch_dtype
    example = {k: v.to(dtype) if k in caches else v for k, v in example.items()}
    return CastIO(module.to(dtype), dtype, spec.inputs, caches), example


def _torchao_config(precision: PrecisionConfig) -> object:
    """torchao's weight-only config for ``precision``: int8 per channel, or int4 in groups of the config's
    ``block_size`` packed for the CPU kernels (torchao moved that packing between releases: both
    spellings)."""
    if precision.weight_bits == 8:
        from torchao.quantization import Int8WeightOnlyConfig

        return Int8WeightOnlyConfig()
    if precision.weight_bits != 4:
        raise UsageError(
            f"AOTInductor packages quantize weights to 8 or 4 bits (torchao), not {precision.weight_bits} "
            f"({precision.name})."
        )
    group = getattr(precision, "block_size", 128)
    try:  # later torchao releases moved the CPU packing into a prototype config of its own
        from torchao.prototype.int4_opaque_tensor import Int4WeightOnlyOpaqueTensorConfig

        return Int4WeightOnlyOpaqueTensorConfig(group_size=group)
    except ImportError:
        from torchao.quantization import Int4WeightOnlyConfig

        return Int4WeightOnlyConfig(group_size=group, int4_packing_format="opaque")


def _freeze_decides(job: ExportJob) -> bool:
    """Whether --freeze chooses anything for this compile: CPU fp32 decoders in the default mode
    (max-autotune always freezes; CUDA and reduced precisions never do)."""
    return job.option("device") == "cpu" and job.option("mode") == "default" and job.precision.name == "fp32"


class AotiBackend(BackendBase):
    name = "aoti"
    triton_backends = ("pytorch",)
    suffix = ".pt2"
    options: ClassVar[dict[str, Any]] = {
        "mode": "default",
        "device": "cpu",
        "max_length": DEFAULT_MAX_LENGTH,
        "max_batch": DEFAULT_MAX_BATCH,
        "freeze": "auto",  # CPU fp32 decoders: export/decode_gemms.py
    }
    description = (
        "AOTInductor packages (torch.export + aoti_compile_and_package), `vlexport compile`; "
        "decoders over a static KV cache"
    )

    def check(self, job: ExportJob) -> None:
        inductor_configs(job.option("mode"))
        if job.option("device") not in ("cpu", "cuda"):
            raise UsageError(
                f"--device {job.option('device')!r}: AOTInductor packages are built for cpu or cuda."
            )
        if job.option("device") == "cuda" and not torch.cuda.is_available():
            raise UsageError("--device cuda needs a CUDA build of torch and a GPU; this machine has neither.")
        if job.option("mode") == "reduce-overhead" and job.option("device") != "cuda":
            raise UsageError(
                "--mode reduce-overhead captures the decode step in CUDA graphs, which exist only on "
                "a GPU: with --device cpu it would build a default package. Drop the option, or "
                "compile with --device cuda."
            )
        if not 16 <= int(job.option("max_length")) <= 1 << 15:
            raise UsageError(f"--max-length {job.option('max_length')}: give 16..32768 static cache slots.")
        if not 1 <= int(job.option("max_batch")) <= 1 << 12:
            raise UsageError(f"--max-batch {job.option('max_batch')}: give 1..4096 decoder rows.")
        if job.option("freeze") not in FREEZE_CHOICES:
            raise UsageError(f"--freeze {job.option('freeze')!r}: choose one of {', '.join(FREEZE_CHOICES)}.")
        if job.option("freeze") != "auto" and not _freeze_decides(job):
            raise UsageError(
                f"--freeze {job.option('freeze')} decides how a CPU fp32 decoder in the default mode "
                "multiplies; this compile has none (max-autotune always freezes, CUDA and reduced precisions "
                "never do). Drop --freeze."
            )
        if job.precision.quantizes_weights and importlib.util.find_spec("torchao") is None:
            raise MissingToolchain(torchao_hint(job.precision))

    def export_component(
        self,
        module: nn.Module,
        spec: ComponentSpec,
        example: Mapping[str, torch.Tensor],
        path: Path,
        job: ExportJob,
        translation_table: Mapping[Any, Any],
    ) -> Component:
        metadata = {}
        configs = inductor_configs(job.option("mode"), job.option("device"))
        copied = job.precision.quantizes_weights or job.precision.dtype != "float32"
        if isinstance(module, CachedDecoder):  # generative: the static-cache twin of the ONNX decoder
            from vlexport.export.static_cache import static_decoder

            max_length, max_batch = int(job.option("max_length")), int(job.option("max_batch"))
            module, spec, example = static_decoder(
                module, spec, example, max_length=max_length, max_batch=max_batch
            )
            static: dict[str, Any] = {
                "max_length": max_length,
                "max_batch": max_batch,
                "cuda_graphs": job.option("mode") == "reduce-overhead",
            }
            if _freeze_decides(job):  # MKL's or oneDNN's GEMMs, whichever this machine runs faster
                choice = choose_freezing(job.option("freeze"), module, sorted({1, max_batch}))
                static["freezing"] = choice.as_dict()
                if choice.freeze:
                    configs = {**configs, "freezing": True}
            metadata[META_STATIC] = json.dumps(static)
        if copied:
            module, example = with_precision(module, spec, dict(example), job.precision, job.option("device"))
        return compile_component(
            module,
            spec,
            example,
            path,
            device=job.option("device"),
            configs=configs,
            metadata=metadata,
            copied=copied,
        )

    def load(self, path: Path, options: LoadOptions = LOAD_DEFAULTS) -> Any:
        from vlexport.runtime.components import AotiComponent

        return AotiComponent(path, device=options.device, threads=options.threads)


BACKEND = register_backend(AotiBackend())
