"""The ``aoti`` backend: torch.export -> AOTInductor package (``<component>.pt2``) per component.

The component's dynamic axes are the ONNX spec's. The package carries its input/output names in its
metadata, so the runtime loader (runtime/backends.py) needs nothing but the file. JIT ``torch.compile``
has no artifact: it is a benchmark runner (bench/) built with :func:`jit_compile`.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlexport.errors import CheckError, UsageError
from vlexport.export.backend import BackendBase, ExportJob, register_backend
from vlexport.export.onnx import _quiet_exporter, dynamic_shapes
from vlexport.manifest import Component, TensorSpec
from vlexport.models.base import ComponentSpec

MODES = ("default", "reduce-overhead", "max-autotune")
# Package metadata keys (strings only: AOTI metadata is a str -> str map).
META_INPUTS = "vlexport.inputs"
META_OUTPUTS = "vlexport.outputs"


def inductor_configs(mode: str) -> dict[str, Any]:
    """Inductor settings for a ``torch.compile`` mode, applied to an AOT compile.

    reduce-overhead means CUDA graphs, which AOTInductor packages do not capture: it compiles like
    default. max-autotune benchmarks matmul / conv templates at compile time (minutes, GPU mostly).
    """
    if mode not in MODES:
        raise UsageError(f"Unknown --mode {mode!r}: choose one of {', '.join(MODES)}.")
    if mode == "max-autotune":
        return {"max_autotune": True, "max_autotune_gemm": True}
    return {}


def compile_component(module: nn.Module, spec: ComponentSpec, example: Mapping[str, torch.Tensor], path: Path, *,
                      device: str = "cpu", configs: Mapping[str, Any] | None = None) -> Component:
    """torch.export ``module`` with the spec's dynamic axes, AOT-compile it to ``path``, describe it."""
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda needs a CUDA build of torch and a GPU; this machine has neither.")
    if device != "cpu":
        # A copy: the caller's eager model stays on the CPU as the validation reference.
        module = copy.deepcopy(module).to(device)
    args = tuple(example[name].to(device) for name in spec.inputs)
    meta = {META_INPUTS: json.dumps(list(spec.inputs)), META_OUTPUTS: json.dumps(list(spec.outputs))}
    with torch.no_grad(), _quiet_exporter():
        try:
            program = torch.export.export(module.eval(), args, dynamic_shapes=dynamic_shapes(spec, example),
                                          strict=False)
            torch._inductor.aoti_compile_and_package(
                program, package_path=str(path),
                inductor_configs={**dict(configs or {}), "aot_inductor.metadata": meta})
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
    keep = [ln for ln in lines if not ln.startswith(("For more information", "The error above", "If you would"))]
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
    inputs = [TensorSpec(name, *_spec_of(node.meta["val"], spec.dynamic_axes.get(name, {})))
              for name, node in zip(spec.inputs, placeholders)]
    outs = [TensorSpec(name, *_spec_of(node.meta["val"], spec.dynamic_axes.get(name, {})))
            for name, node in zip(spec.outputs, outputs)]
    return Component(name=spec.name, file=path.name, inputs=inputs, outputs=outs, size_bytes=path.stat().st_size)


def _spec_of(val: torch.Tensor, axes: Mapping[int, str]) -> tuple[str, list[int | str]]:
    dtype = str(val.dtype).removeprefix("torch.")
    shape: list[int | str] = [axes.get(i, d if isinstance(d, int) else str(d)) for i, d in enumerate(val.shape)]
    return dtype, shape


def jit_compile(module: nn.Module, *, mode: str = "default") -> nn.Module:
    """``torch.compile`` for benchmarking (no artifact); dynamic=None recompiles once with symbolic shapes."""
    inductor_configs(mode)  # validates the mode name
    return torch.compile(module, mode=None if mode == "default" else mode, dynamic=None)


class AotiBackend(BackendBase):
    name = "aoti"
    suffix = ".pt2"
    options = {"mode": "default", "device": "cpu"}
    description = "AOTInductor packages (torch.export + aoti_compile_and_package), `vlexport compile`"

    def check(self, job: ExportJob) -> None:
        inductor_configs(job.option("mode"))
        if job.option("device") not in ("cpu", "cuda"):
            raise UsageError(f"--device {job.option('device')!r}: AOTInductor packages are built for cpu or cuda.")
        if job.option("device") == "cuda" and not torch.cuda.is_available():
            raise UsageError("--device cuda needs a CUDA build of torch and a GPU; this machine has neither.")

    def export_component(self, module: nn.Module, spec: ComponentSpec, example: Mapping[str, torch.Tensor],
                         path: Path, job: ExportJob, translation_table: Mapping[Any, Any]) -> Component:
        return compile_component(module, spec, example, path, device=job.option("device"),
                                 configs=inductor_configs(job.option("mode")))

    def load(self, path: Path, *, device: str = "auto", threads: int | None = None,
             interleaved: bool = False) -> Any:
        from vlexport.runtime.backends import AotiComponent

        return AotiComponent(path, device=device, threads=threads)


BACKEND = register_backend(AotiBackend())
