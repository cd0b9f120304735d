"""ONNX Runtime's quantize_dynamic behind vlexport's memory guard: refused before it starts when the machine
cannot hold it, run in a child process for big graphs (the same graph as in process), and an OOM kill of
that child reported as what it is, with nothing written."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import vlexport.quantize.ort_quantizer as oq
from vlexport.cli import main
from vlexport.errors import CheckError, InsufficientMemory


def chain(path: Path, n: int = 3, d: int = 64) -> Path:
    """x @ W0 @ W1 ... with seeded weights, external data like the exporter's big graphs."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((d, d), dtype=np.float32), f"w{i}") for i in range(n)
    ]
    nodes = [
        helper.make_node("MatMul", ["x" if i == 0 else f"h{i - 1}", f"w{i}"], [f"h{i}"]) for i in range(n)
    ]
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", d])],
        [helper.make_tensor_value_info(f"h{n - 1}", TensorProto.FLOAT, ["b", d])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, path, save_as_external_data=True, location=path.name + ".data", size_threshold=0)
    return path


def run(path: Path, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_weight_bytes_counts_external_data(tmp_path: Path) -> None:
    src = chain(tmp_path / "m.onnx")
    assert oq.weight_bytes(src) == src.stat().st_size + 3 * 64 * 64 * 4


def test_the_child_process_writes_the_graph_the_in_process_call_writes(tmp_path: Path, monkeypatch) -> None:
    src = chain(tmp_path / "m.onnx")
    kwargs = {"per_channel": True, "reduce_range": False, "external": True}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    oq.quantize_dynamic(src, tmp_path / "a" / "q.onnx", **kwargs)
    monkeypatch.setattr(oq, "ISOLATE_ABOVE", 0)
    oq.quantize_dynamic(src, tmp_path / "b" / "q.onnx", **kwargs)
    a, b = (onnx.load(str(tmp_path / d / "q.onnx")) for d in "ab")
    assert [n.op_type for n in a.graph.node] == [n.op_type for n in b.graph.node]
    assert "MatMulInteger" in {n.op_type for n in a.graph.node}
    for ta, tb in zip(a.graph.initializer, b.graph.initializer, strict=True):
        np.testing.assert_array_equal(numpy_helper.to_array(ta), numpy_helper.to_array(tb))
    x = np.random.default_rng(1).standard_normal((4, 64), dtype=np.float32)
    np.testing.assert_array_equal(run(tmp_path / "a" / "q.onnx", x), run(tmp_path / "b" / "q.onnx", x))
    ref = run(src, x)
    cos = float((ref * run(tmp_path / "b" / "q.onnx", x)).sum() / np.linalg.norm(ref) ** 2)
    assert 0.98 < cos < 1.02  # quantized, and still the same function


def test_too_little_free_memory_is_refused_before_the_quantizer_starts(tmp_path: Path, monkeypatch) -> None:
    src = chain(tmp_path / "m.onnx")
    monkeypatch.setattr(oq, "available_bytes", lambda: 2 * oq.weight_bytes(src))  # < 3x
    with pytest.raises(InsufficientMemory, match="per-token") as e:
        oq.quantize_dynamic(src, tmp_path / "q.onnx", per_channel=True, reduce_range=False, external=True)
    assert "3x" in str(e.value) and not (tmp_path / "q.onnx").exists()


def test_an_oom_killed_quantizer_is_reported_as_out_of_memory(tmp_path: Path, monkeypatch) -> None:
    src = chain(tmp_path / "m.onnx")
    monkeypatch.setattr(oq, "ISOLATE_ABOVE", 0)
    monkeypatch.setattr(oq, "_CHILD", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)")
    with pytest.raises(InsufficientMemory, match="out-of-memory killer"):
        oq.quantize_dynamic(src, tmp_path / "q.onnx", per_channel=True, reduce_range=False, external=True)
    monkeypatch.setattr(oq, "_CHILD", "raise ValueError('bad graph')")
    with pytest.raises(CheckError, match="exit 1.*ValueError: bad graph"):
        oq.quantize_dynamic(src, tmp_path / "q.onnx", per_channel=True, reduce_range=False, external=True)


def test_quantize_refuses_with_one_paragraph_and_writes_nothing(
    exported, tmp_path: Path, monkeypatch, capsys
):
    parent = exported("bridgetower-tiny", "itm")
    monkeypatch.setattr(oq, "available_bytes", lambda: 1000)
    out = tmp_path / "int8"
    args = ["quantize", str(parent), "-o", str(out), "--precision", "int8-dynamic", "--no-reduce-range"]
    assert main(args) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "Not enough memory to quantize" in err and "--activations per-token" in err
    assert "Traceback" not in err and not out.exists() and list(tmp_path.iterdir()) == []
