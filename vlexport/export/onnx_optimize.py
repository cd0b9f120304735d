"""ONNX Runtime graph optimizations and transformer fusions (SkipLayerNorm, BiasGelu, Attention...)."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import onnx

# The op types worth reporting: what the fusions produce.
FUSED_OPS = ("Attention", "MultiHeadAttention", "SkipLayerNormalization", "LayerNormalization", "BiasGelu",
             "FastGelu", "Gelu", "EmbedLayerNormalization", "SkipSimplifiedLayerNormalization")


def optimize_onnx(path: Path, *, model_type: str, use_gpu: bool = False) -> dict[str, int]:
    """Optimize ``path`` in place with ORT's transformer optimizer; return counts of fused op types.

    ``model_type``: the optimizer's model type, the family's ``FamilySpec.ort_model_type``;
    num_heads/hidden_size 0 lets the optimizer read them off the graph.
    """
    from onnxruntime.transformers.optimizer import optimize_model

    model = optimize_model(str(path), model_type=model_type, num_heads=0, hidden_size=0, opt_level=1,
                           use_gpu=use_gpu, only_onnxruntime=False)
    external = any(init.data_location == onnx.TensorProto.EXTERNAL
                   for init in onnx.load(str(path), load_external_data=False).graph.initializer)
    data = path.with_suffix(path.suffix + ".data")
    if external and data.exists():
        os.remove(data)
    model.save_model_to_file(str(path), use_external_data_format=external, all_tensors_to_one_file=True)
    return op_counts(path)


def op_counts(path: Path) -> dict[str, int]:
    graph = onnx.load(str(path), load_external_data=False).graph
    counts = Counter(node.op_type for node in graph.node)
    return {op: counts[op] for op in FUSED_OPS if counts[op]}
