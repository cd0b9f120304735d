"""ONNX Runtime sessions leave the cores alone between calls (runtime/onnx_session.py ``session_options``):
after a run returns, their threads neither spin nor work, where ORT's default pool goes on spinning and slows
whatever runs next (eager torch beside the benchmark's variants, the caller's own work)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

IDLE_S = 0.2


@pytest.fixture(scope="module")
def matmul(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A MatMul big enough that ORT splits it across two threads."""
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.random((512, 512), dtype=np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "matmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [256, 512])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [256, 512])],
        [weight],
    )
    path = tmp_path_factory.mktemp("threads") / "matmul.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


# Run in a fresh interpreter: a test process holds other pools (torch's OpenMP threads spin after their own
# work) whose CPU time would count too.
_PROBE = """
import sys, time
import numpy as np, onnxruntime as ort
from vlexport.runtime.onnx_session import OnnxComponent

path, mode, IDLE_S = sys.argv[1], sys.argv[2], float(sys.argv[3])
x = {"x": np.ones((256, 512), np.float32)}
if mode == "ort-default":
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    run = lambda: session.run(None, x)[0]
else:
    component = OnnxComponent(path, providers=["CPUExecutionProvider"], threads=2, spin=mode == "spin")
    run = lambda: component(x)["y"]
for _ in range(5):
    y = run()
start = time.process_time()
run()
ran = time.process_time() - start
time.sleep(IDLE_S)
print(float(y.sum()), time.process_time() - start - ran)
"""


def _cpu_while_idle(path: Path, mode: str) -> tuple[float, float]:
    """The output's sum and the CPU seconds a fresh process spends in IDLE_S of sleep right after a run of
    ``path`` (warm pool) returned."""
    argv = [sys.executable, "-c", _PROBE, str(path), mode, str(IDLE_S)]
    out = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    total, idle = out.stdout.split()
    return float(total), float(idle)


def _want(path: Path) -> float:
    weight = numpy_helper.to_array(onnx.load(str(path)).graph.initializer[0])
    return float((np.ones((256, 512), np.float32) @ weight).sum())


def test_ort_default_pool_spins_after_a_run(matmul: Path) -> None:
    """The control: the probe sees ORT's default pool spinning on after its run."""
    total, idle = _cpu_while_idle(matmul, "ort-default")
    assert total == pytest.approx(_want(matmul), rel=1e-5)
    assert idle > 0.02


@pytest.mark.parametrize("mode", ["spin", "never"], ids=["spins-within-a-run", "never-spins"])
def test_sessions_leave_the_cores_alone_after_a_run(matmul: Path, mode: str) -> None:
    total, idle = _cpu_while_idle(matmul, mode)
    assert total == pytest.approx(_want(matmul), rel=1e-5)
    assert idle < 0.01
