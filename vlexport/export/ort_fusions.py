"""ONNX Runtime's fused operators in a dynamo-exported graph: onnxscript's ORT fusions plus a rewrite.

The torch.onnx (dynamo) exporter writes attention and RMSNorm as the primitives torch decomposed them into:
per attention a Shape / Slice / Concat / Reshape / Transpose chain around the key, per T5 layer norm seven
nodes. onnxscript's ``optimize_for_ort`` matches exactly these decompositions and writes ONNX Runtime's
contrib ops instead (``MultiHeadAttention`` with past/present, ``SimplifiedLayerNormalization``,
``SkipSimplifiedLayerNormalization``, ``SkipLayerNormalization``, ...). ORT's older transformer optimizer
(export/onnx_optimized.py) looks for the TorchScript exporter's patterns and fuses no attention here.

Ours, two rewrites:
- the fused cross-attention is handed its cached keys/values through a Transpose back to [batch, sequence,
  hidden], and MultiHeadAttention transposes them again inside, every decode step. It takes them as they are
  cached, [batch, heads, sequence, head_size] (its "BNSH" key/value form), so the rewire drops both copies.
- in a decode step the attention scale moves out of MultiHeadAttention onto its one query row (a Mul), so
  the kernel's q.K^T runs at alpha 1: MLAS multiplies one row by a transposed matrix with its GEMV kernel
  only then (the reason runtime/onnx_session.py leaves MatMulScaleFusion out of decode steps). BLIP's
  caption decoder (scale 1/8, 577 image tokens): with the scale inside, the fused step was 1.07x the
  unfused one's time at batch 8; with it outside, 0.92x. T5 attends unscaled and is left as it is.

Measured on BLIP-2 Flan-T5-XL's decoder step, int4-weight (2 threads, Xeon with AMX): 2047 nodes -> 623;
batch 1 61.0 -> 53.0 ms, batch 4 110.2 -> 85.5 ms; fp32 215.8 -> 201.8 ms and 255.9 -> 227.4 ms; logits
within 7.9e-6 of the unfused fp32 graph.

The ops are ONNX Runtime's (com.microsoft and its onnx-domain SimplifiedLayerNormalization), so only graphs
that run on ONNX Runtime alone get them: onnx-opt (export/onnx_optimized.py) and the weight-only variants
(MatMulNBits already ties them to it), never the fp32 artifact TensorRT parses.
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import onnx

if TYPE_CHECKING:
    import onnx_ir as ir

# The op types worth reporting: what the fusions produce (manifest ``fused_ops``).
FUSED_OPS = (
    "Attention",
    "MultiHeadAttention",
    "GroupQueryAttention",
    "SkipLayerNormalization",
    "LayerNormalization",
    "SimplifiedLayerNormalization",
    "SkipSimplifiedLayerNormalization",
    "RotaryEmbedding",
    "BiasGelu",
    "FastGelu",
    "Gelu",
    "EmbedLayerNormalization",
)


def op_counts(path: Path) -> dict[str, int]:
    graph = onnx.load(str(path), load_external_data=False).graph
    counts = Counter(node.op_type for node in graph.node)
    return {op: counts[op] for op in FUSED_OPS if counts[op]}


def fuse_for_ort(path: Path, *, external: bool, decode_step: bool = False) -> dict[str, int]:
    """Rewrite the graph at ``path`` in place with ORT's fused ops; return the counts of fused op types.

    ``external``: the graph keeps its weights in ``<name>.data`` beside it. That file is not rewritten: the
    fused graph refers to the weights where they lie, and the few tensors the fusions make (1 KiB and up) are
    appended to it. Only the graph file is replaced, atomically.
    ``decode_step``: the graph is a generative decoder, called with one query row per sequence.
    """
    import onnx_ir as ir
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    model = ir.load(str(path))
    model, _ = optimize_for_ort(model)
    if _cached_kv_as_bnsh(model.graph):
        ir.passes.common.RemoveUnusedNodesPass()(model)
    if decode_step:
        _scale_on_query(model.graph)
    proto = ir.serde.serialize_model(model)  # external weights stay references (location, offset)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        os.chmod(tmp, os.stat(path).st_mode & 0o777)  # the graph's own mode, not mkstemp's 0600
        if external:
            onnx.save_model(proto, tmp, save_as_external_data=True, location=f"{path.name}.data")
        else:
            onnx.save_model(proto, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return op_counts(path)


def _cached_kv_as_bnsh(graph: ir.Graph) -> int:
    """MultiHeadAttention(q, Reshape(Transpose(k, [0, 2, 1, 3])), Reshape(Transpose(v, ...))) with 4-D k, v
    and no bias or past -> MultiHeadAttention(q, k, v): ORT takes the key/value in [batch, heads, sequence,
    head_size] directly (cross-attention over a cache). Returns how many nodes were rewired."""
    rewired = 0
    for node in graph:
        if node.op_type != "MultiHeadAttention" or node.domain != "com.microsoft":
            continue
        inputs = list(node.inputs)
        # q, k, v, then bias, key_padding_mask, attention_bias, past_key, past_value: only the mask and the
        # attention bias may be present
        if len(inputs) < 3 or (len(inputs) > 3 and inputs[3] is not None) or any(inputs[6:]):
            continue
        heads = [_bnsh_source(inputs[i]) for i in (1, 2)]
        if None in heads:
            continue
        for i, value in zip((1, 2), heads, strict=True):
            node.replace_input_with(i, value)
        rewired += 1
    return rewired


def _scale_on_query(graph: ir.Graph) -> int:
    """MultiHeadAttention(q, ..., scale=s) -> MultiHeadAttention(Mul(q, s), ..., scale=1); returns how many.
    Without the attribute the scale is 1/sqrt(head_size), read off q's hidden size; a q of unknown width is
    left alone."""
    import numpy as np
    import onnx_ir as ir

    moved = 0
    for node in list(graph):
        if node.op_type != "MultiHeadAttention" or node.domain != "com.microsoft":
            continue
        attr = node.attributes.get("scale")
        scale = attr.as_float() if attr is not None else None
        query = node.inputs[0]
        if scale is None:
            # q as [batch, sequence, hidden] beside a key (not packed QKV), of known width
            shape = query.shape if query is not None and len(node.inputs) > 1 and node.inputs[1] else None
            width = shape[-1] if shape is not None and len(shape) == 3 else None
            if not isinstance(width, int):
                continue
            scale = float(width // node.attributes["num_heads"].as_int()) ** -0.5
        if scale == 1.0:
            continue
        factor = ir.Value(name=f"{node.name}_query_scale", const_value=ir.tensor(np.array(scale, np.float32)))
        graph.register_initializer(factor)
        mul = ir.Node("", "Mul", [query, factor], name=f"{node.name}_scale_query")
        graph.insert_before(node, mul)
        node.replace_input_with(0, mul.outputs[0])
        node.attributes["scale"] = ir.AttrFloat32("scale", 1.0)
        moved += 1
    return moved


def _bnsh_source(value: ir.Value | None) -> ir.Value | None:
    """``x`` when ``value`` is Reshape(Transpose(x, perm=[0, 2, 1, 3]), shape), else None (the perm says
    ``x`` is 4-D: [batch, heads, sequence, head_size] under a [batch, sequence, hidden] reshape)."""
    reshape = value.producer() if value is not None else None
    if reshape is None or reshape.op_type != "Reshape" or reshape.domain not in ("", "ai.onnx"):
        return None
    if value.shape is not None and len(value.shape) != 3:  # merging heads into [batch, sequence, hidden]
        return None
    transpose = reshape.inputs[0].producer()
    if transpose is None or transpose.op_type != "Transpose":
        return None
    perm = transpose.attributes.get("perm")
    if perm is None or list(perm.as_ints()) != [0, 2, 1, 3]:
        return None
    return transpose.inputs[0]
