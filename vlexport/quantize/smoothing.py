"""SmoothQuant for ONNX graphs: move activation outliers into the weights before int8 quantization.

Real checkpoints have a few activation channels orders of magnitude above the rest (BERT's FFN output
after GELU, the inputs of attention projections after LayerNorm); a per-tensor int8 activation scale
set by them rounds every other channel to a few levels. For each MatMul ``X @ W`` with a constant
weight, with per-input-channel ranges ``a_j = max|X_j|`` (measured on calibration feeds) and
``w_j = max|W_j,:|``, SmoothQuant's scale ``s_j = a_j**alpha / w_j**(1 - alpha)`` gives
``(X / s) @ (diag(s) W)``: the same product in exact arithmetic, with the activation's range evened
out and the weights (quantized per output channel) absorbing it. The division is one ``Mul`` per
activation, shared by the MatMuls that read it (Q, K and V). Xiao et al., SmoothQuant (2022).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection, Iterable

import numpy as np
import onnx
from onnx import numpy_helper

EPS = 1e-5


def constant_weight_matmuls(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    """Activation name -> the MatMuls that multiply it by a 2-D constant weight."""
    init = {i.name: i for i in model.graph.initializer}
    out: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.input[1] in init and len(init[node.input[1]].dims) == 2:
            out[node.input[0]].append(node)
    return dict(out)


def activation_ranges(
    model: onnx.ModelProto, names: Iterable[str], feeds: Iterable[dict[str, np.ndarray]]
) -> dict[str, np.ndarray]:
    """Per-channel (last dim) max |x| of the tensors ``names`` over ``feeds`` (ONNX Runtime, CPU)."""
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    names = list(names)
    declared = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in declared)
    sess = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    accepted = {i.name for i in sess.get_inputs()}
    ranges: dict[str, np.ndarray] = {}
    for feed in feeds:
        for name, value in zip(names, sess.run(names, {k: v for k, v in feed.items() if k in accepted})):
            amax = np.abs(value.reshape(-1, value.shape[-1])).max(0)
            ranges[name] = amax if name not in ranges else np.maximum(ranges[name], amax)
    return ranges


def smooth(
    model: onnx.ModelProto,
    feeds: list[dict[str, np.ndarray]],
    alpha: float = 0.5,
    *,
    leave: Collection[str] = (),
    ranges: dict[str, np.ndarray] | None = None,
) -> int:
    """Rewrite ``model`` in place (graph below 2 GiB: the probe is serialised); returns activations
    smoothed. ``leave``: MatMuls that keep their weight and read the activation as it was (those a recipe
    keeps out of int8 gain nothing from smoothing, and an activation none of whose MatMuls is smoothed needs
    no ``Mul``); ``ranges``: ``activation_ranges`` of this graph already measured (they do not depend on
    alpha or ``leave``)."""
    groups = {
        act: scaled
        for act, nodes in constant_weight_matmuls(model).items()
        if (scaled := [n for n in nodes if n.name not in leave])
    }
    if not groups:
        return 0
    ranges = ranges if ranges is not None else activation_ranges(model, groups, feeds)
    init = {i.name: i for i in model.graph.initializer}
    users = defaultdict(int)
    for node in model.graph.node:
        for i in node.input:
            users[i] += 1
    position = {id(n): k for k, n in enumerate(model.graph.node)}
    inserts = []
    for act, nodes in groups.items():
        weights = [init[n.input[1]] for n in nodes]
        if act not in ranges or any(users[w.name] > 1 for w in weights):
            continue  # a weight shared with another node cannot be rescaled for this one alone
        arrays = [numpy_helper.to_array(w).astype(np.float32) for w in weights]
        if any(a.shape[0] != ranges[act].shape[0] for a in arrays):
            continue
        w_max = np.max([np.abs(a).max(1) for a in arrays], axis=0)
        s = (np.maximum(ranges[act], EPS) ** alpha) / (np.maximum(w_max, EPS) ** (1 - alpha))
        s = np.clip(s, 1e-2, 1e2).astype(np.float32)  # bounded: channels that are ~0 stay as they were
        for w, a in zip(weights, arrays):
            w.CopyFrom(numpy_helper.from_array(a * s[:, None], w.name))
        inv = numpy_helper.from_array((1.0 / s).astype(np.float32), f"{act}_smooth_inv")
        model.graph.initializer.append(inv)
        smoothed = f"{act}_smoothed"
        for n in nodes:
            n.input[0] = smoothed
        first = min(position[id(n)] for n in nodes)
        inserts.append(
            (first, onnx.helper.make_node("Mul", [act, inv.name], [smoothed], name=f"{act}_smooth"))
        )
    for k, node in sorted(inserts, key=lambda t: -t[0]):  # from the back: earlier positions stay valid
        model.graph.node.insert(k, node)
    return len(inserts)


def after_activation_matmuls(
    model: onnx.ModelProto, activations: tuple[str, ...] = ("Gelu", "Erf", "FastGelu"), depth: int = 4
) -> list[str]:
    """Names of the constant-weight MatMuls fed (within ``depth`` nodes) by a GELU: the FFN output
    projections, whose inputs carry real checkpoints' largest outlier channels (the most int8-sensitive nodes
    measured on all-MiniLM-L6-v2, benchmarks/results/real-minilm-precision.json)."""
    producer = {o: n for n in model.graph.node for o in n.output}

    def fed(name: str, left: int) -> bool:
        node = producer.get(name)
        if node is None or left == 0:
            return False
        return node.op_type in activations or any(fed(i, left - 1) for i in node.input)

    return [
        n.name for nodes in constant_weight_matmuls(model).values() for n in nodes if fed(n.input[0], depth)
    ]
