"""ONNX for the ``vlexport::`` ops: ``torch.onnx.export(..., dynamo=True, custom_translation_table=table)``.

Each op becomes one node that ONNX Runtime runs fused (CPU and CUDA execution providers, fp32 / fp16):

* ``vlexport::attention``      -> ``com.microsoft::MultiHeadAttention`` (query (B, Sq, H*D); key / value in
  BNSH (B, H, Sk, D), which ORT accepts as they are; masks and causality folded into ``attention_bias``).
* ``vlexport::add_layer_norm`` -> ``com.microsoft::SkipLayerNormalization`` (a Mul before it when scaled).

Chosen over the standard ONNX ``Attention`` (opset 23; ORT 1.32's CPU kernel computes it correctly too):
vlexport exports at opset 18, and the contrib op is what ORT's own transformer fusions emit and what its
CPU and CUDA execution providers run fused.

onnx ships no schemas for com.microsoft ops, and the exporter needs one to build a node: the
``OpSchema`` objects below declare the subset of inputs and attributes used here (the rest stay absent).
"""

from __future__ import annotations

from typing import Any

import torch
from onnx.defs import OpSchema
from onnxscript import opset18 as op
from onnxscript.values import Op, Opset

_MSFT = Opset("com.microsoft", 1)
_FLOAT_TYPES = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]
_In = OpSchema.FormalParameter
_OPTIONAL = OpSchema.FormalParameterOption.Optional

_MHA_SCHEMA = OpSchema(
    "MultiHeadAttention",
    "com.microsoft",
    1,
    inputs=[
        _In("query", "T"),
        _In("key", "T", param_option=_OPTIONAL),
        _In("value", "T", param_option=_OPTIONAL),
        _In("bias", "T", param_option=_OPTIONAL),
        _In("key_padding_mask", "M", param_option=_OPTIONAL),
        _In("attention_bias", "T", param_option=_OPTIONAL),
    ],
    outputs=[_In("output", "T")],
    type_constraints=[("T", _FLOAT_TYPES, ""), ("M", ["tensor(int32)"], "")],
    attributes=[
        OpSchema.Attribute("num_heads", OpSchema.AttrType.INT, required=True),
        OpSchema.Attribute("scale", OpSchema.AttrType.FLOAT, required=False),
    ],
)
_SKIP_LN_SCHEMA = OpSchema(
    "SkipLayerNormalization",
    "com.microsoft",
    1,
    inputs=[_In("input", "T"), _In("skip", "T"), _In("gamma", "T"), _In("beta", "T", param_option=_OPTIONAL)],
    outputs=[_In("output", "T")],
    type_constraints=[("T", _FLOAT_TYPES, "")],
    attributes=[OpSchema.Attribute("epsilon", OpSchema.AttrType.FLOAT, required=False)],
)
MultiHeadAttention = Op(_MSFT, "MultiHeadAttention", _MHA_SCHEMA)
SkipLayerNormalization = Op(_MSFT, "SkipLayerNormalization", _SKIP_LN_SCHEMA)

_BOOL = 9  # onnx.TensorProto.BOOL
_TORCH_DTYPE = {1: torch.float32, 10: torch.float16, 16: torch.bfloat16, 11: torch.float64}  # by ONNX dtype


def _lowest(value: Any) -> float:
    """The most negative finite value of ``value``'s dtype: HF's "masked" score (never -inf: no NaN in
    ORT)."""
    return torch.finfo(_TORCH_DTYPE[int(value.dtype)]).min


def _combine(bias: Any, extra: Any, lowest: Any) -> Any:
    """bias + extra, clamped: two finfo.min terms would overflow to -inf (and fully masked rows to NaN)."""
    return extra if bias is None else op.Max(op.Add(bias, extra), lowest)


def attention_onnx(
    q: Any,
    k: Any,
    v: Any,
    key_padding_mask: Any = None,
    attn_bias: Any = None,
    causal: bool = False,
    scale: float | None = None,
) -> Any:
    """``vlexport::attention`` -> com.microsoft::MultiHeadAttention, same semantics (see
    fused_attention.py)."""
    num_heads, head_dim = q.shape[1], q.shape[3]
    if not isinstance(num_heads, int) or not isinstance(head_dim, int):  # symbolic: attributes need numbers
        raise ValueError(  # noqa: TRY004
            f"vlexport::attention to ONNX: heads and head dim must be static, got q shape {q.shape}"
        )
    scale = head_dim**-0.5 if scale is None else float(scale)
    # Typed constants: a bare Python float next to a value made inside this function becomes fp32.
    lowest = op.CastLike(_lowest(q), q)
    zero = op.CastLike(0.0, q)

    # Sources of attention_bias and whether each already spans all queries / all keys (static shapes).
    bias, spans_queries, spans_keys = None, False, False
    if attn_bias is not None:
        rank = len(attn_bias.shape)
        bias = attn_bias if rank == 4 else op.Unsqueeze(attn_bias, list(range(4 - rank)))
        if attn_bias.dtype != q.dtype:  # clamp first: fp32 finfo.min is -inf in fp16
            bias = op.CastLike(op.Max(bias, op.CastLike(_lowest(q), attn_bias)), q)
        spans_queries = _spans(attn_bias.shape[-2] if rank >= 2 else 1, q.shape[2])
        spans_keys = _spans(attn_bias.shape[-1], k.shape[2])
    keep = None
    if key_padding_mask is not None:
        keep = op.Cast(key_padding_mask, to=_BOOL)  # (B, Sk), nonzero = keep
        pad = op.Where(keep, zero, lowest)
        bias = _combine(bias, op.Unsqueeze(pad, [1, 2]), lowest)  # (B, 1, 1, Sk)
        spans_keys = True
    row_offset = None
    if causal:
        sq, sk = op.Shape(q, start=2, end=3), op.Shape(k, start=2, end=3)
        rows = op.Range(0, op.Squeeze(sq), 1)
        cols = op.Range(0, op.Squeeze(sk), 1)
        row_offset = op.Add(rows, op.Sub(sk, sq))  # query i sees keys j <= i + Sk - Sq
        allowed = op.LessOrEqual(op.Unsqueeze(cols, [0]), op.Unsqueeze(row_offset, [1]))
        bias = _combine(bias, op.Unsqueeze(op.Where(allowed, zero, lowest), [0, 1]), lowest)
        spans_queries = spans_keys = True
    if bias is not None and not (spans_queries and spans_keys):
        # ORT wants attention_bias as (B or 1, H or 1, Sq, Sk): materialise broadcast query / key dims only.
        target = op.Concat(
            op.Constant(value_ints=[1, 1]), op.Shape(q, start=2, end=3), op.Shape(k, start=2, end=3), axis=0
        )
        bias = op.Expand(bias, target)

    query = op.Reshape(op.Transpose(q, perm=[0, 2, 1, 3]), op.Constant(value_ints=[0, 0, -1]))  # (B, Sq, H*D)
    out = MultiHeadAttention(query, k, v, None, None, bias, num_heads=num_heads, scale=scale)
    out = op.Transpose(
        op.Reshape(out, op.Constant(value_ints=[0, 0, num_heads, head_dim])), perm=[0, 2, 1, 3]
    )

    # Rows with no key to attend to are 0 (as in the kernel); ORT, given finite masked scores, would
    # return the mean of v there.
    if keep is not None:
        any_key = op.ReduceMax(op.CastLike(keep, q), op.Constant(value_ints=[1]), keepdims=1)  # (B, 1)
        out = op.Mul(out, op.Unsqueeze(any_key, [2, 3]))
    if row_offset is not None:
        row_has_key = op.CastLike(op.GreaterOrEqual(row_offset, 0), q)  # false only when Sq > Sk
        out = op.Mul(out, op.Unsqueeze(row_has_key, [0, 1, 3]))
    return out


def _spans(bias_dim: Any, data_dim: Any) -> bool:
    """Whether a bias dim is certainly not a broadcast 1 against the data's dim (symbolic dims are full)."""
    return not (bias_dim == 1 and data_dim != 1)


def add_layer_norm_onnx(
    x: Any,
    residual: Any,
    weight: Any,
    bias: Any = None,
    eps: float = 1e-5,
    alpha: float = 1.0,
    residual_scale: float = 1.0,
) -> Any:
    """``vlexport::add_layer_norm`` -> com.microsoft::SkipLayerNormalization(alpha * x, residual_scale *
    residual)."""
    shape = x.shape  # read off the inputs: values made by ops below need not carry shapes or dtypes
    residual, weight, bias = (
        t if t is None or t.dtype == x.dtype else op.CastLike(t, x)  # ORT: one dtype T
        for t in (residual, weight, bias)
    )
    if alpha != 1.0:
        x = op.Mul(x, float(alpha))
    if residual_scale != 1.0:
        residual = op.Mul(residual, float(residual_scale))
    if len(shape) in (2, 3):  # the ranks ORT's SkipLayerNormalization accepts
        return SkipLayerNormalization(x, residual, weight, bias, epsilon=float(eps))
    if not isinstance(shape[-1], int):
        raise ValueError(  # noqa: TRY004
            f"vlexport::add_layer_norm to ONNX: the hidden size must be static, got x shape {shape}"
        )
    flat = op.Constant(value_ints=[-1, shape[-1]])
    out = SkipLayerNormalization(
        op.Reshape(x, flat), op.Reshape(residual, flat), weight, bias, epsilon=float(eps)
    )
    return op.Reshape(out, op.Shape(x))


def onnx_translation_table() -> dict[Any, Any]:
    """``{torch op overload: onnxscript function}`` for the ``vlexport::`` ops."""
    from . import fused_add_layer_norm, fused_attention  # noqa: F401  (registers the ops)

    return {
        torch.ops.vlexport.attention.default: attention_onnx,
        torch.ops.vlexport.add_layer_norm.default: add_layer_norm_onnx,
    }
