"""int8-dynamic with per-token activation scales (quantize/onnx_per_token.py), and the search that tries it.

The rewritten graph is run by ONNX Runtime and compared with the same arithmetic written in numpy (integer
products are exact, so the two agree to float rounding); per-token scales must beat per-tensor ones on rows of
very different magnitude, and the search must pick them when per-tensor scales miss the target.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from vlexport.contracts.precision import Int8DynamicConfig
from vlexport.errors import UsageError
from vlexport.quantize.onnx_per_token import quantize_per_token
from vlexport.quantize.search import build, search

ort = pytest.importorskip("onnxruntime")
K, N = 32, 16


def _graph(path: Path, seed: int = 0, opset: int = 18) -> dict[str, np.ndarray]:
    """x -> MatMul(W1) -> y1, x -> MatMul(W2) -> Relu -> MatMul(W3) -> y2: two MatMuls share an input."""
    rng = np.random.default_rng(seed)
    w = {f"w{i}": rng.standard_normal((K, N if i < 3 else 8)).astype(np.float32) for i in (1, 2)}
    w["w3"] = rng.standard_normal((N, 8)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["y1"], "mm1"),
        helper.make_node("MatMul", ["x", "w2"], ["h"], "mm2"),
        helper.make_node("Relu", ["h"], ["hr"], "relu"),
        helper.make_node("MatMul", ["hr", "w3"], ["y2"], "mm3"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", K])],
        [
            helper.make_tensor_value_info("y1", TensorProto.FLOAT, None),
            helper.make_tensor_value_info("y2", TensorProto.FLOAT, None),
        ],
        [numpy_helper.from_array(v, k) for k, v in w.items()],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]), str(path))
    return w


def _run(path: Path, x: np.ndarray) -> list[np.ndarray]:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})


def _numpy_per_token(x: np.ndarray, w: np.ndarray, wmax: float) -> np.ndarray:
    s = np.maximum(np.abs(x).max(axis=-1, keepdims=True) / np.float32(127), np.finfo(np.float32).tiny)
    q = np.clip(np.round(x / s) + 128, 0, 255).astype(np.int64) - 128
    sw = np.maximum(np.abs(w).max(axis=0), np.finfo(np.float32).tiny) / np.float32(wmax)
    wq = np.clip(np.round(w / sw), -wmax, wmax).astype(np.int64)
    return (q @ wq).astype(np.float32) * s * sw.astype(np.float32)


@pytest.mark.parametrize("opset", [17, 18])  # ReduceMax's axes: an attribute at 17, an input from 18
@pytest.mark.parametrize("reduce_range", [False, True])
def test_per_token_graph_is_the_per_token_arithmetic(tmp_path: Path, reduce_range: bool, opset: int) -> None:
    w = _graph(tmp_path / "fp32.onnx", opset=opset)
    names = quantize_per_token(
        tmp_path / "fp32.onnx", tmp_path / "q.onnx", per_channel=True, reduce_range=reduce_range
    )
    assert sorted(names) == ["mm1", "mm2", "mm3"]
    model = onnx.load(str(tmp_path / "q.onnx"))
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("MatMulInteger") == 3 and "MatMul" not in ops
    assert ops.count("ReduceMax") == 2  # mm1 and mm2 share one quantization of x
    wmax = 63.0 if reduce_range else 127.0
    int8 = [numpy_helper.to_array(i) for i in model.graph.initializer if i.name.endswith("weight_int8")]
    assert max(int(np.abs(q).max()) for q in int8) == int(wmax)

    x = np.random.default_rng(1).standard_normal((3, 7, K)).astype(np.float32)
    x[0, 2] *= 50  # rows of very different magnitude
    x[1, 4] = 0  # an all-zero row (padding) must not divide by zero
    y1, y2 = _run(tmp_path / "q.onnx", x)
    np.testing.assert_allclose(y1, _numpy_per_token(x, w["w1"], wmax), rtol=1e-5, atol=1e-5)
    h = np.maximum(_numpy_per_token(x, w["w2"], wmax), 0)
    np.testing.assert_allclose(y2, _numpy_per_token(h, w["w3"], wmax), rtol=1e-4, atol=1e-4)
    assert np.all(np.isfinite(y1)) and np.all(y1[1, 4] == 0)

    # the sensitivity sweep's form: one MatMul alone, the others left fp32
    names = quantize_per_token(
        tmp_path / "fp32.onnx", tmp_path / "one.onnx", per_channel=True, reduce_range=reduce_range, only="mm2"
    )
    ops = [n.op_type for n in onnx.load(str(tmp_path / "one.onnx")).graph.node]
    assert names == ["mm2"] and ops.count("MatMulInteger") == 1 and ops.count("MatMul") == 2
    y1, y2 = _run(tmp_path / "one.onnx", x)
    np.testing.assert_allclose(y1, x @ w["w1"], rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(
        y2, np.maximum(_numpy_per_token(x, w["w2"], wmax), 0) @ w["w3"], rtol=1e-4, atol=1e-4
    )


def test_per_token_scales_keep_small_rows_that_per_tensor_loses(tmp_path: Path) -> None:
    _graph(tmp_path / "fp32.onnx")
    x = np.random.default_rng(2).standard_normal((2, 9, K)).astype(np.float32)
    x[0, 0] *= 200  # one token 200x the others: one per-tensor scale leaves the rest a few int8 steps
    ref = _run(tmp_path / "fp32.onnx", x)[0]

    def worst_row_cosine(path: Path) -> float:
        got = _run(path, x)[0].reshape(-1, N)
        r = ref.reshape(-1, N)
        return float(np.min((got * r).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(r, axis=1)))

    config = Int8DynamicConfig(reduce_range=False)
    build(tmp_path / "fp32.onnx", tmp_path / "tensor.onnx", config, list, tmp_path)
    per_token = Int8DynamicConfig(reduce_range=False, activations="per-token")
    build(tmp_path / "fp32.onnx", tmp_path / "token.onnx", per_token, list, tmp_path)
    tensor, token = worst_row_cosine(tmp_path / "tensor.onnx"), worst_row_cosine(tmp_path / "token.onnx")
    assert token > 0.999 and tensor < 0.99, (token, tensor)


def test_search_moves_to_per_token_when_per_tensor_misses(tmp_path: Path) -> None:
    _graph(tmp_path / "fp32.onnx")
    rng = np.random.default_rng(3)
    feeds = []
    for i in range(4):  # one loud token, one quiet sequence: the whole-output cosine feels both
        x = rng.standard_normal((2, 9, K)).astype(np.float32)
        x[i % 2, i] *= 10
        x[1 - i % 2] *= 0.05
        feeds.append({"x": x})
    # measured: per-tensor scales ~0.9998 whatever the smoothing, per-token ~0.99996
    config = Int8DynamicConfig(reduce_range=False, min_cosine=0.9999, search=True)
    result = search(tmp_path / "fp32.onnx", config, feeds, tmp_path)
    labels = [c["candidate"] for c in result.candidates]
    assert labels[0] == "plain" and "per-token plain" in labels
    assert labels.index("per-token plain") > labels.index("smooth 0.85")  # per-tensor first: cheaper
    assert all(not c["passed"] for c in result.candidates if c["activations"] == "per-tensor")
    assert result.config.activations == "per-token" and not result.config.search
    assert result.record()["recipe"]["activations"] == "per-token"
    # the recipe replays to the same graph
    for name in ("a.onnx", "b.onnx"):
        build(tmp_path / "fp32.onnx", tmp_path / name, result.config, lambda: feeds, tmp_path)
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()


def test_activations_knob_is_checked() -> None:
    with pytest.raises(UsageError, match="--activations takes per-tensor or per-token"):
        Int8DynamicConfig(activations="per-channel")
