"""One MatMul in ONNX Runtime: fp32 vs MatMulNBits (8 / 4 bits, blocks 32 / 128, accuracy levels 1 / 4).

The shape is OPT-2.7b's FFN projection (x[M, 2560] @ W[2560, 10240]) at M = 1 (batch-1 decode) and M = 8
(batch x beams, short prefill). Every variant runs in one process, 2 intra-op threads, interleaved (one call
of each variant per round, so a load change hits all of them alike), median of ``--reps`` rounds; results
are ratios to the fp32 MatMul's median only (absolute times follow the machine's load, which is recorded:
``uptime`` before and after). The quantized weights come from vlexport's own pass
(quantize/matmul_nbits.py), so what is timed is what an int8-weight / int4-weight artifact runs.
What it answers: which accuracy level makes each width fast on this CPU (contracts/precision.py defaults).

Run: ``python benchmarks/matmulnbits_micro.py [--reps 40]``
(writes benchmarks/results/matmulnbits-micro.json).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper

RESULTS = Path(__file__).parent / "results" / "matmulnbits-micro.json"
K, N = 2560, 10240
ROWS = (1, 8)
WIDTHS = (8, 4)
BLOCKS = (32, 128)
LEVELS = (1, 4)


def _model(nodes: list, inits: list) -> bytes:
    graph = helper.make_graph(
        nodes,
        "mm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", N])],
        inits,
    )
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets).SerializeToString()


def models(weight: np.ndarray) -> dict[str, bytes]:
    from vlexport.quantize.matmul_nbits import quantize_block

    out = {
        "fp32": _model(
            [helper.make_node("MatMul", ["x", "W"], ["y"])], [numpy_helper.from_array(weight, "W")]
        )
    }
    for bits in WIDTHS:
        for block in BLOCKS:
            packed, scales, zero_points = quantize_block(weight, bits, block, symmetric=False)
            inits = [
                numpy_helper.from_array(packed, "Wq"),
                numpy_helper.from_array(scales, "scales"),
                numpy_helper.from_array(zero_points, "zp"),
            ]
            for level in LEVELS:
                node = helper.make_node(
                    "MatMulNBits",
                    ["x", "Wq", "scales", "zp"],
                    ["y"],
                    domain="com.microsoft",
                    K=K,
                    N=N,
                    bits=bits,
                    block_size=block,
                    accuracy_level=level,
                )
                out[f"{bits}-bit block {block} accuracy_level {level}"] = _model([node], inits)
    return out


def uptime() -> str:
    return subprocess.run(["uptime"], check=False, capture_output=True, text=True).stdout.strip()


def cpu() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    name = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), "?")
    flags = next((ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), [])
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags]
    return f"{name} ({', '.join(isa)})"


def main() -> int:
    import onnxruntime as ort

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=40, help="interleaved rounds (median; >= 30)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    load_before = uptime()
    rng = np.random.default_rng(0)
    weight = (rng.standard_normal((K, N)) * 0.02).astype(np.float32)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = args.threads, 1
    sessions = {
        name: ort.InferenceSession(m, opts, providers=["CPUExecutionProvider"])
        for name, m in models(weight).items()
    }
    del weight
    feeds = {m: {"x": rng.standard_normal((m, K)).astype(np.float32)} for m in ROWS}
    cases = [(name, m) for m in ROWS for name in sessions]
    ref = {m: sessions["fp32"].run(None, feeds[m])[0] for m in ROWS}
    cosine = {}
    for name, m in cases:  # parity: every variant computes the same product
        got = sessions[name].run(None, feeds[m])[0]
        cosine[(name, m)] = float((got * ref[m]).sum() / (np.linalg.norm(got) * np.linalg.norm(ref[m])))
    for _ in range(args.warmup - 1):
        for name, m in cases:
            sessions[name].run(None, feeds[m])
    times: dict[tuple[str, int], list[float]] = {c: [] for c in cases}
    for _ in range(args.reps):
        for name, m in cases:
            t = time.perf_counter()
            sessions[name].run(None, feeds[m])
            times[(name, m)].append(time.perf_counter() - t)
    median = {c: float(np.median(v)) for c, v in times.items()}
    rows = {
        name: {
            f"M={m}": {
                "ratio_to_fp32": round(median[(name, m)] / median[("fp32", m)], 3),
                "cosine_vs_fp32": round(cosine[(name, m)], 6),
            }
            for m in ROWS
        }
        for name in sessions
        if name != "fp32"
    }
    doc = {
        "what": f"x[M, {K}] @ W[{K}, {N}] in ONNX Runtime {ort.__version__}, CPU provider, "
        f"{args.threads} intra-op threads, one process, interleaved, median of {args.reps} rounds "
        f"({args.warmup} warm-up); time relative to the fp32 MatMul at the same M",
        "cpu": cpu(),
        "python": sys.version.split()[0],
        "uptime_before": load_before,
        "uptime_after": uptime(),
        "results": rows,
    }
    print(json.dumps(doc, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
