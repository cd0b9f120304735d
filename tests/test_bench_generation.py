"""Generation benchmarks: prefill / per-token decode / tokens-per-second rows, eager vs the ONNX runtime
loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vlexport.bench import BenchPlan, run_bench
from vlexport.bench.generation import hf_generate_timed, timing_from_stamps, token_parity
from vlexport.contracts.precision import Bf16Config, Fp32Config
from vlexport.errors import UsageError
from vlexport.models.inputs import InputShape
from vlexport.weights import load_model, resolve


def test_caption_rows_eager_vs_onnx() -> None:
    plan = BenchPlan(
        ("blip-tiny",),
        task="caption",
        backends=("eager", "onnx"),
        batch_sizes=(2,),
        seq_len=5,
        warmup=1,
        iters=3,
        new_tokens=6,
        random_weights=True,
        device="cpu",
    )
    rows = run_bench(plan)
    assert [(r.backend, r.batch) for r in rows] == [("eager", 2), ("onnx", 2)]
    for r in rows:
        assert r.ok and r.new_tokens == 6 and r.seq_len == 5 and r.throughput_unit == "tokens/s"
        # fp32: the artifact's greedy tokens equal eager generate()'s, token for token.
        assert r.parity["tokens"]["agreement"] == 1.0
        assert 0 < r.prefill_ms < r.latency_p50_ms and 0 < r.decode_ms_per_token < r.latency_p50_ms
        assert r.throughput == pytest.approx(r.batch * 6 / (r.latency_p50_ms / 1e3), rel=1e-3)
    assert rows[1].build_s > 0 and rows[1].speedup_vs_eager == pytest.approx(
        rows[0].latency_p50_ms / rows[1].latency_p50_ms, rel=1e-3
    )
    # Decode is bandwidth-bound: bytes per step (weights + KV cache, the same for both at fp32) over ms/token.
    assert rows[0].work_bytes_per_step == rows[1].work_bytes_per_step > 0
    for r in rows:
        assert r.peak_kind == "memory" and r.peak_value > 0 and r.work_flops is None
        assert r.achieved_gbps == pytest.approx(
            r.work_bytes_per_step / (r.decode_ms_per_token / 1e3) / 1e9, rel=1e-3
        )
        assert r.peak_fraction == pytest.approx(r.achieved_gbps / r.peak_value, rel=1e-3)


def test_hf_generate_timed_forces_the_token_count() -> None:
    source = resolve("blip-tiny", random_weights=True)
    model = load_model(source, "caption")
    inputs = source.family.task("caption").make_inputs(model.config, InputShape(3, 0), 0)  # image only
    timing = hf_generate_timed(model, inputs, 5, "cpu")
    assert timing.tokens.shape == (3, 5) and len(timing.decode_s) == 4
    assert 0 < timing.prefill_s < timing.total_s
    with torch.no_grad():
        ref = model.generate(**inputs, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    np.testing.assert_array_equal(timing.tokens, ref[:, -5:].numpy())  # the stamps change nothing


def test_stamps_and_token_parity() -> None:
    t = timing_from_stamps(0, [2_000_000, 3_000_000, 5_000_000], 6_000_000, np.zeros((1, 3)))
    assert t.prefill_s == pytest.approx(0.002) and t.decode_s == pytest.approx([0.001, 0.002])
    ref = np.array([[1, 2, 3, 4]])
    assert token_parity(ref.copy(), ref, Fp32Config())[0] == "ok"
    status, report, detail = token_parity(np.array([[1, 2, 3, 5]]), ref, Fp32Config())
    assert status == "failed-parity" and report["tokens"]["agreement"] == 0.75 and "75.0%" in detail
    # bf16 needs 95% agreement: 3 of 4 tokens is not enough.
    assert token_parity(np.array([[1, 2, 3, 5]]), ref, Bf16Config())[0] == "failed-parity"


def test_compile_runner_refuses_generation() -> None:
    plan = BenchPlan(
        ("blip-tiny",),
        task="caption",
        backends=("compile",),
        batch_sizes=(1,),
        seq_len=5,
        warmup=0,
        iters=1,
        new_tokens=2,
        random_weights=True,
        device="cpu",
    )
    with pytest.raises(UsageError, match="compile runner benchmarks encoder tasks"):
        run_bench(plan)
