"""The ``onnx-opt`` backend: an ONNX artifact rewritten with ONNX Runtime's fused operators.

Derived from ``onnx`` (``vlexport onnx --optimize``): the graphs are copied and fused in place, first by
export/ort_fusions.py (onnxscript's fusions for dynamo-exported graphs: MultiHeadAttention with past,
(Skip)SimplifiedLayerNormalization, ...; the decode-step rewrites for the decoder), then by ONNX Runtime's
transformer optimizer for what its patterns still find (the family module names its model type), then
described again from the files and validated like any artifact. The fused op counts go in the manifest.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import onnx

from vlexport.contracts.backends import (
    LOAD_DEFAULTS,
    BackendBase,
    DeriveContext,
    Derived,
    LoadOptions,
    register_backend,
)
from vlexport.export.ort_fusions import fuse_for_ort, op_counts
from vlexport.models.host import DECODER


def optimize_onnx(path: Path, *, model_type: str, use_gpu: bool = False) -> dict[str, int]:
    """Optimize ``path`` in place with ORT's transformer optimizer; return counts of fused op types.

    ``model_type``: the optimizer's model type, the family's ``FamilySpec.ort_model_type``;
    num_heads/hidden_size 0 lets the optimizer read them off the graph.
    """
    from onnxruntime.transformers.optimizer import optimize_model

    model = optimize_model(
        str(path),
        model_type=model_type,
        num_heads=0,
        hidden_size=0,
        opt_level=1,
        use_gpu=use_gpu,
        only_onnxruntime=False,
    )
    external = any(
        init.data_location == onnx.TensorProto.EXTERNAL
        for init in onnx.load(str(path), load_external_data=False).graph.initializer
    )
    data = path.with_suffix(path.suffix + ".data")
    if external and data.exists():
        os.remove(data)
    model.save_model_to_file(str(path), use_external_data_format=external, all_tensors_to_one_file=True)
    return op_counts(path)


class OnnxOptimizedBackend(BackendBase):
    name = "onnx-opt"
    triton_backends = ("onnxruntime", "python-onnxruntime")
    suffix = ".onnx"
    parent = "onnx"
    description = "ONNX graphs with ONNX Runtime's fused attention and normalization ops"

    def derive(self, ctx: DeriveContext) -> Derived:
        from vlexport.export.onnx import describe

        specs = {s.name: s for s in ctx.task_spec.components(ctx.config)}
        components, fused = {}, {}
        for name, comp in ctx.parent.components.items():
            ctx.progress(f"optimizing {name}")
            for rel in filter(None, (comp.file, comp.external_data)):
                # A scratch parent is ours: move, not copy, a multi-GB external-data file.
                (shutil.move if ctx.parent_is_scratch else shutil.copy2)(
                    ctx.parent_dir / rel, ctx.out_dir / rel
                )
            path = ctx.out_dir / comp.file
            fuse_for_ort(path, external=comp.external_data is not None, decode_step=name == DECODER)
            fused[name] = optimize_onnx(path, model_type=ctx.family.ort_model_type)
            components[name] = describe(path, name, specs[name].dynamic_axes, root=ctx.out_dir)
        return Derived(components, fused_ops=fused)

    def load(self, path: Path, options: LoadOptions = LOAD_DEFAULTS) -> Any:
        from vlexport.export.onnx import BACKEND as ONNX

        return ONNX.load(path, options)


BACKEND = register_backend(OnnxOptimizedBackend())
