"""The ``onnx-opt`` backend: an ONNX artifact rewritten by ONNX Runtime's transformer optimizer.

Derived from ``onnx`` (``vlexport onnx --optimize``): the graphs are copied and fused in place
(SkipLayerNormalization, BiasGelu, ...; the family module names the optimizer's model type), then
described again from the files and validated like any artifact. The fused op counts go in the manifest.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from vlexport.contracts.backends import BackendBase, DeriveContext, Derived, register_backend


class OnnxOptimizedBackend(BackendBase):
    name = "onnx-opt"
    suffix = ".onnx"
    parent = "onnx"
    description = "ONNX graphs fused by ONNX Runtime's transformer optimizer"

    def derive(self, ctx: DeriveContext) -> Derived:
        from vlexport.export.onnx import describe
        from vlexport.export.onnx_optimize import optimize_onnx

        specs = {s.name: s for s in ctx.task_spec.components(ctx.config)}
        components, fused = {}, {}
        for name, comp in ctx.parent.components.items():
            ctx.progress(f"optimizing {name}")
            for rel in filter(None, (comp.file, comp.external_data)):
                # A scratch parent is ours: move, not copy, a multi-GB external-data file.
                (shutil.move if ctx.parent_is_scratch else shutil.copy2)(ctx.parent_dir / rel, ctx.out_dir / rel)
            path = ctx.out_dir / comp.file
            fused[name] = optimize_onnx(path, model_type=ctx.family.ort_model_type)
            components[name] = describe(path, name, specs[name].dynamic_axes, root=ctx.out_dir)
        return Derived(components, fused_ops=fused)

    def load(self, path: Path, *, device: str = "auto", threads: int | None = None,
             interleaved: bool = False) -> Any:
        from vlexport.export.onnx import BACKEND as ONNX

        return ONNX.load(path, device=device, threads=threads, interleaved=interleaved)


BACKEND = register_backend(OnnxOptimizedBackend())
