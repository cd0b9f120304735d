"""int8-dynamic with one activation scale per token (``Int8DynamicConfig.activations="per-token"``).

ONNX Runtime's dynamic quantizer scales a whole activation tensor at once (``DynamicQuantizeLinear``): one
token with a large value coarsens the steps of every other token in the batch. Per-token scales are the
activation half of the usual W8A8 recipe (SmoothQuant's), and on the real all-MiniLM-L6-v2 they move the mean
text-embedding cosine from 0.9920 (per tensor) to 0.9973, and to 0.9990 with SmoothQuant 0.5, for about 0.15x
of fp32's time more than the per-tensor graph (benchmarks/real_minilm_precision.py, README). No ONNX Runtime
quantizer writes per-row activation scales, so this rewrite does, with standard operators around
``MatMulInteger`` (uint8 x int8: MLAS's fast path)::

    x2 = x viewed as rows (-1, K)
    s = max(|x2|, axis 1) / 127                one scale per row, computed per call
    q = QuantizeLinear(x2, s, 128, axis=0)      uint8(clip(round(x2 / s) + 128, 0, 255)), one fused pass
    y = float(MatMulInteger(q, Wq, 128)) * sw * s, viewed back as (..., N)

``Wq`` / ``sw``: int8 weights with one scale per output channel (``per_channel``) or per tensor, 7-bit when
``reduce_range`` (the saturating u8 x s8 multiply of CPUs without VNNI; contracts/precision.py). MatMuls that
read the same tensor (an attention block's Q, K and V) share one quantization of it. The rows view is what
lets ONNX's per-axis QuantizeLinear do in one pass what Div, Round, Add, Clip and Cast did in five (ONNX
Runtime fuses none of them: its MatMulIntegerToFloat takes one activation scale). The product side stays
Cast and two Muls: ONNX Runtime 1.32's per-axis DequantizeLinear of int32 is not vectorised (3x slower on real
MiniLM at batch 8, measured with its profiler). Node and initializer
names derive from the MatMul's, so the same source and knobs write the same graph (``--recipe`` replays).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from vlexport.quantize.smoothing import constant_weight_matmuls

ZERO_POINT = 128  # activations are symmetric around it: one uint8 code per step either side


def quantize_per_token(
    src: Path,
    dst: Path,
    *,
    per_channel: bool,
    reduce_range: bool,
    exclude: Sequence[str] = (),
    only: str | None = None,
    external: bool = False,
) -> list[str]:
    """Write ``src`` with every constant-weight MatMul not in ``exclude`` (or the one named ``only``)
    quantized per token; returns their names."""
    model = onnx.load(str(src))
    graph = model.graph
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 18)
    inits = {i.name: i for i in graph.initializer}
    skip = set(exclude)
    chosen = [
        n
        for ns in constant_weight_matmuls(model).values()
        for n in ns
        if n.name not in skip and only in (None, n.name)
    ]
    targets = {id(n) for n in chosen}
    wmax = 63.0 if reduce_range else 127.0
    # activation -> (uint8 codes as rows, per-row scale (rows, 1), its shape without the last axis)
    quantized_inputs: dict[str, tuple[str, str, str]] = {}
    nodes: list[onnx.NodeProto] = []
    added: list[onnx.TensorProto] = []
    consts = _constants(added)
    for node in graph.node:
        if id(node) not in targets:
            nodes.append(node)
            continue
        x, w_name = node.input[0], node.input[1]
        p = f"{node.name or node.output[0]}/pertoken"
        w = numpy_helper.to_array(inits[w_name]).astype(np.float32)
        if x not in quantized_inputs:
            quantized_inputs[x] = _quantize_rows(x, w.shape[0], p, opset, consts, nodes, added)
        codes, scale, lead = quantized_inputs[x]
        peak = np.abs(w).max(axis=0) if per_channel else np.array(np.abs(w).max())
        sw = (np.maximum(peak, np.finfo(np.float32).tiny) / wmax).astype(np.float32)
        wq = np.clip(np.round(w / sw), -wmax, wmax).astype(np.int8)
        added += [
            numpy_helper.from_array(wq, f"{p}/weight_int8"),
            numpy_helper.from_array(sw, f"{p}/weight_scale"),
            numpy_helper.from_array(np.array([w.shape[1]], np.int64), f"{p}/n"),
        ]
        nodes += [
            helper.make_node(
                "MatMulInteger", [codes, f"{p}/weight_int8", consts["zp"]], [f"{p}/acc"], f"{p}/MatMulInteger"
            ),
            helper.make_node("Cast", [f"{p}/acc"], [f"{p}/acc_f"], f"{p}/Cast", to=TensorProto.FLOAT),
            helper.make_node("Mul", [f"{p}/acc_f", f"{p}/weight_scale"], [f"{p}/cols"], f"{p}/MulCols"),
            helper.make_node("Mul", [f"{p}/cols", scale], [f"{p}/rows"], f"{p}/MulRows"),
            helper.make_node("Concat", [lead, f"{p}/n"], [f"{p}/shape"], f"{p}/OutShape", axis=0),
            helper.make_node("Reshape", [f"{p}/rows", f"{p}/shape"], [node.output[0]], f"{p}/Unrows"),
        ]
    used = {i for n in nodes for i in n.input}
    kept = [i for i in graph.initializer if i.name in used]
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.initializer[:]
    graph.initializer.extend([*kept, *added])
    if external:
        onnx.save(model, str(dst), save_as_external_data=True, location=dst.name + ".data")
    else:
        onnx.save(model, str(dst))
    return [n.name for n in chosen]


def _constants(added: list[onnx.TensorProto]) -> dict[str, str]:
    """The scalars every quantization shares, added once."""
    values = {
        "127": np.array(127.0, np.float32),
        "tiny": np.array(np.finfo(np.float32).tiny, np.float32),
        "zp": np.array(ZERO_POINT, np.uint8),
        "one_axis": np.array([1], np.int64),
        "0": np.array([0], np.int64),
        "-1": np.array([-1], np.int64),
    }
    names = {k: f"pertoken/{k}" for k in values}
    added += [numpy_helper.from_array(v, names[k]) for k, v in values.items()]
    return names


def _quantize_rows(
    x: str,
    k: int,
    p: str,
    opset: int,
    c: dict[str, str],
    nodes: list[onnx.NodeProto],
    added: list[onnx.TensorProto],
) -> tuple[str, str, str]:
    """Nodes that turn ``x`` (..., k) into uint8 codes (rows, k) with one scale per row; returns the codes,
    the scales (rows, 1) and ``x``'s shape without its last axis (to view the product back)."""
    added.append(numpy_helper.from_array(np.array([-1, k], np.int64), f"{p}/rows_shape"))
    if opset >= 18:  # ReduceMax took its axes as an attribute before opset 18
        reduce = helper.make_node(
            "ReduceMax", [f"{p}/abs", c["one_axis"]], [f"{p}/peak"], f"{p}/ReduceMax", keepdims=0
        )
    else:
        reduce = helper.make_node(
            "ReduceMax", [f"{p}/abs"], [f"{p}/peak"], f"{p}/ReduceMax", axes=[1], keepdims=0
        )
    nodes += [
        helper.make_node("Reshape", [x, f"{p}/rows_shape"], [f"{p}/x2"], f"{p}/Rows"),
        helper.make_node("Shape", [x], [f"{p}/xshape"], f"{p}/Shape"),
        helper.make_node("Slice", [f"{p}/xshape", c["0"], c["-1"]], [f"{p}/lead"], f"{p}/Lead"),
        helper.make_node("Abs", [f"{p}/x2"], [f"{p}/abs"], f"{p}/Abs"),
        reduce,
        helper.make_node("Div", [f"{p}/peak", c["127"]], [f"{p}/scale0"], f"{p}/DivPeak"),
        # an all-zero row (padding) gets the smallest scale, not a division by zero
        helper.make_node("Max", [f"{p}/scale0", c["tiny"]], [f"{p}/scale"], f"{p}/MaxTiny"),
        # per-axis zero points take the scales' shape: 128 for every row
        helper.make_node("Shape", [f"{p}/scale"], [f"{p}/row_count"], f"{p}/RowCount"),
        helper.make_node("Expand", [c["zp"], f"{p}/row_count"], [f"{p}/zps"], f"{p}/ZeroPoints"),
        helper.make_node(
            "QuantizeLinear", [f"{p}/x2", f"{p}/scale", f"{p}/zps"], [f"{p}/codes"], f"{p}/Quantize", axis=0
        ),
        helper.make_node("Unsqueeze", [f"{p}/scale", c["one_axis"]], [f"{p}/scale_col"], f"{p}/ScaleCol"),
    ]
    return f"{p}/codes", f"{p}/scale_col", f"{p}/lead"
