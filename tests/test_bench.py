"""`vlexport bench` on the tiny preset: rows, parity against eager, reports, and the regress gate end to
end."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from vlexport.bench import RUNNERS, BenchPlan, read_rows, register_runner, run_bench
from vlexport.bench.variants import BenchContext, Variant, eager_module, torch_variant
from vlexport.cli import main
from vlexport.contracts.precision import PrecisionConfig

TINY = ["bridgetower-tiny", "--random-weights", "--task", "itm"]
# One worker runs this module, so that the module-scoped acceptance bench runs once, not once per worker.
pytestmark = pytest.mark.xdist_group("bench-acceptance")


@pytest.fixture(scope="module")
def acceptance(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The issue's acceptance command (fewer iterations): eager vs ONNX at batch 1 and 4."""
    out = tmp_path_factory.mktemp("bench")
    argv = [
        "bench",
        "bridgetower-tiny",
        "--random-weights",
        "--backends",
        "eager,onnx",
        "--batch-sizes",
        "1,4",
        "--warmup",
        "1",
        "--iters",
        "5",
        "--json",
        str(out / "a.json"),
        "--plot",
        str(out / "a.png"),
        "--markdown",
        str(out / "a.md"),
    ]
    code = main(argv)
    rows, meta = read_rows(out / "a.json")
    return {"code": code, "rows": rows, "meta": meta, "dir": out}


def test_bench_rows_eager_vs_onnx(acceptance: dict) -> None:
    assert acceptance["code"] == 0
    rows = acceptance["rows"]
    assert [(r.backend, r.batch) for r in rows] == [("eager", 1), ("onnx", 1), ("eager", 4), ("onnx", 4)]
    for r in rows:
        assert r.ok and r.model == "bridgetower-tiny" and r.task == "itm" and r.precision == "fp32"
        assert r.seq_len == 32 and r.image_size == 64 and r.device_kind == "cpu" and r.threads >= 1
        assert r.warmup == 1 and r.iters == 5 and r.versions["torch"] and r.versions["onnxruntime"]
        assert 0 < r.latency_min_ms <= r.latency_p50_ms <= r.latency_p90_ms <= r.latency_p99_ms
        assert r.throughput == pytest.approx(r.batch / (r.latency_p50_ms / 1e3), rel=1e-3)
        assert r.peak_memory_mb is not None and r.memory_kind == "rss-delta"
    eager = {r.batch: r for r in rows if r.backend == "eager"}
    onnx = {r.batch: r for r in rows if r.backend == "onnx"}
    for b in (1, 4):
        # Parity of ONNX Runtime against eager fp32 on the benchmark's own inputs: close, but a real
        # comparison.
        err = onnx[b].parity["logits"]["max_abs"]
        assert 0 < err <= 1e-4, err
        assert eager[b].parity["logits"]["max_abs"] == 0.0  # the reference itself
        assert eager[b].speedup_vs_eager == 1.0
        expected = eager[b].latency_p50_ms / onnx[b].latency_p50_ms
        assert onnx[b].speedup_vs_eager == pytest.approx(expected, rel=1e-3)
        assert onnx[b].build_s > 0 and eager[b].first_call_s > 0


def test_bench_reports(acceptance: dict) -> None:
    out = acceptance["dir"]
    md = (out / "a.md").read_text()
    assert md.count("| bridgetower-tiny | itm |") == 4 and "speed-up vs eager" in md
    import matplotlib.image as mpimg

    png = out / "a.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = mpimg.imread(png)
    assert image.shape[0] >= 400 and image.shape[1] >= 1000  # two readable panels side by side
    assert image[..., :3].std() > 0.05  # not a blank canvas
    assert acceptance["meta"]["schema"] == "vlexport-bench/2"
    assert "GFLOP" in md and "% of fp32-gemm" in md and "Peaks of this machine" in md


def test_rows_say_how_close_to_the_peak(acceptance: dict) -> None:
    """Work counted once per shape, the peak measured in the same run, fraction = achieved / peak in the
    JSON."""
    rows, meta = acceptance["rows"], acceptance["meta"]
    (measured,) = [m for m in meta["peaks"] if m["threads"] == rows[0].threads]
    work = {b: {r.work_flops for r in rows if r.batch == b} for b in (1, 4)}
    assert len(work[1]) == len(work[4]) == 1  # one count per shape, whichever backend ran it
    (w1,), (w4,) = work[1], work[4]
    assert w1 > 0 and w4 == 4 * w1
    for r in rows:
        assert r.peak_kind == "fp32-gemm" and r.peak_value == measured["peaks"]["fp32-gemm"]["value"] > 0
        assert r.achieved_gflops == pytest.approx(r.work_flops / (r.latency_p50_ms / 1e3) / 1e9, rel=1e-3)
        assert r.peak_fraction == pytest.approx(r.achieved_gflops / r.peak_value, rel=1e-3)
        assert r.work_bytes_per_step is None and r.achieved_gbps is None  # encoders: FLOPs, not decode bytes


def test_regress_passes_on_itself(acceptance: dict) -> None:
    path = str(acceptance["dir"] / "a.json")
    assert main(["regress", path, path]) == 0


@pytest.fixture
def fake_backends():
    """Test-only runners: a slowed-down eager and a wrong one. Removed afterwards."""
    delay = {"s": 0.0}

    @register_runner("sleepy")
    def sleepy(ctx: BenchContext, precision: PrecisionConfig) -> Variant:
        module, close = eager_module(ctx, precision, ())
        variant = torch_variant("sleepy", module, ctx, precision, device=ctx.device, close=close)
        call = variant.call

        def slow_call(args):
            time.sleep(delay["s"])
            return call(args)

        variant.call = slow_call
        return variant

    @register_runner("wrong")
    def wrong(ctx: BenchContext, precision: PrecisionConfig) -> Variant:
        module, close = eager_module(ctx, precision, ())
        variant = torch_variant("wrong", module, ctx, precision, device=ctx.device, close=close)
        outputs = variant.outputs
        variant.outputs = lambda raw: {k: v + np.float32(0.01) for k, v in outputs(raw).items()}
        return variant

    yield delay
    del RUNNERS["sleepy"], RUNNERS["wrong"]


def test_injected_slowdown_makes_regress_exit_1(fake_backends, tmp_path: Path, capsys) -> None:
    # One thread: two-thread eager calls stall when other jobs share the 2 cores, which would drown the sleep.
    plan = {
        "backends": ("eager", "sleepy"),
        "batch_sizes": (1,),
        "warmup": 1,
        "iters": 5,
        "random_weights": True,
        "task": "itm",
        "threads": 1,
    }
    base, cur = tmp_path / "base.json", tmp_path / "cur.json"
    fake_backends["s"] = 0.0
    assert (
        main(
            [
                "bench",
                *TINY,
                "--backends",
                "eager,sleepy",
                "--batch-sizes",
                "1",
                "--warmup",
                "1",
                "--iters",
                "5",
                "--threads",
                "1",
                "--json",
                str(base),
            ]
        )
        == 0
    )
    fake_backends["s"] = 0.1  # 100 ms per call: ~20x the tiny model's own latency
    rows = run_bench(BenchPlan(("bridgetower-tiny",), **plan))
    from vlexport.bench import write_rows

    write_rows(cur, rows)
    sleepy = next(r for r in rows if r.backend == "sleepy")
    assert sleepy.ok and sleepy.latency_p50_ms >= 100 and sleepy.speedup_vs_eager < 0.5
    capsys.readouterr()
    assert main(["regress", str(base), str(cur), "--max-slowdown", "0.5"]) == 1  # ratios: the default gate
    text = " ".join(capsys.readouterr().out.split())
    assert "SLOWER" in text and "sleepy" in text
    assert main(["regress", str(base), str(base), "--max-slowdown", "0.5"]) == 0


def test_parity_failure_is_reported_not_timed(fake_backends, tmp_path: Path, capsys) -> None:
    out = tmp_path / "p.json"
    code = main(
        [
            "bench",
            *TINY,
            "--backends",
            "eager,wrong",
            "--batch-sizes",
            "2",
            "--warmup",
            "0",
            "--iters",
            "2",
            "--json",
            str(out),
            "--markdown",
            str(tmp_path / "p.md"),
        ]
    )
    assert code == 1
    rows, _ = read_rows(out)
    wrong = next(r for r in rows if r.backend == "wrong")
    assert wrong.status == "failed-parity" and "logits" in wrong.detail and "tolerance" in wrong.detail
    assert wrong.parity["logits"]["max_abs"] == pytest.approx(0.01, rel=1e-3)
    assert wrong.latency_p50_ms is None and wrong.throughput is None and wrong.speedup_vs_eager is None
    assert "FAILED parity" in (tmp_path / "p.md").read_text()
    assert "failed parity" in capsys.readouterr().err


def test_bench_usage_errors(capsys) -> None:
    assert main(["bench", *TINY, "--backends", "eager,flash"]) == 2
    assert "Unknown backend" in capsys.readouterr().err
    assert main(["bench", *TINY, "--backends", "onnx-opt", "--precision", "fp16", "--batch-sizes", "1"]) == 2
    # The registry knows what each backend builds: refused before any timing, with what it does build.
    assert "onnx-opt backend builds fp32, not fp16" in " ".join(capsys.readouterr().err.split())
    assert (
        main(["bench", *TINY, "--backends", "compile", "--precision", "int8-static", "--batch-sizes", "1"])
        == 2
    )
    assert "compile runner runs fp32, fp16, bf16, not int8-static" in " ".join(
        capsys.readouterr().err.split()
    )
    assert main(["bench", *TINY, "--precision", "fp8"]) == 2
    assert main(["bench"]) == 2


def test_bench_reuses_an_artifact_directory(exported, tmp_path: Path) -> None:
    """An artifact dir joins the group of its source model and is measured against the same eager
    reference."""
    directory = exported("bridgetower-tiny", "itm")
    rows = run_bench(BenchPlan((str(directory),), batch_sizes=(3,), warmup=0, iters=2, seq_len=7))
    assert [(r.backend, r.batch, r.seq_len) for r in rows] == [("eager", 3, 7), ("onnx", 3, 7)]
    assert all(r.ok for r in rows) and rows[0].model == "bridgetower-tiny"
    assert 0 < rows[1].parity["logits"]["max_abs"] <= 1e-4
    meta = json.loads((directory / "manifest.json").read_text())
    assert rows[1].build_s == pytest.approx(sum(meta["timings"].values()), abs=1e-3)


def test_work_dir_artifacts_are_derived_once_and_reused(tmp_path: Path) -> None:
    """Export backends come from the registry: onnx-opt is derived from the work dir's ONNX export, then
    reused."""
    plan = BenchPlan(
        ("bridgetower-tiny",),
        backends=("onnx-opt", "onnx"),
        task="itm",
        random_weights=True,
        batch_sizes=(1,),
        warmup=0,
        iters=1,
        threads=1,
        work_dir=tmp_path,
    )
    first = run_bench(plan)
    assert [r.backend for r in first] == ["eager", "onnx-opt", "onnx"] and all(r.ok for r in first)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "bridgetower-tiny-itm-onnx",
        "bridgetower-tiny-itm-onnx-opt",
    ]
    assert first[1].build_s > first[2].build_s > 0  # onnx-opt's build includes the export it was derived from
    second = run_bench(plan)
    assert [r.detail.split(",")[0] for r in second[1:]] == [
        "reused bridgetower-tiny-itm-onnx-opt",
        "reused bridgetower-tiny-itm-onnx",
    ]
    # An artifact directory the user names: the row's backend is the manifest's.
    rows = run_bench(
        BenchPlan(
            (str(tmp_path / "bridgetower-tiny-itm-onnx-opt"),), batch_sizes=(1,), warmup=0, iters=1, threads=1
        )
    )
    assert [(r.backend, r.ok) for r in rows] == [("eager", True), ("onnx-opt", True)]
    assert 0 < rows[1].parity["logits"]["max_abs"] <= 1e-4


def test_plan_names_one_spelling_per_backend_and_precision() -> None:
    plan = BenchPlan(
        ("bridgetower-tiny",), backends=("eager", "trt", "tensorrt"), precisions=("fp32", "int8")
    )
    assert plan.backends == ("eager", "tensorrt") and plan.precisions == ("fp32", "int8-static")


def test_a_parity_miss_names_the_number_that_missed() -> None:
    # tune drops a candidate with this text; "logits: tolerance (limit cosine >= 0.98)" said not how far
    from vlexport.bench.measure import output_parity
    from vlexport.contracts.precision import get_precision

    rng = np.random.default_rng(0)
    ref = rng.standard_normal((4, 2)).astype(np.float32)
    got = ref + 0.5 * rng.standard_normal((4, 2)).astype(np.float32)
    cos = float(got.ravel() @ ref.ravel() / np.linalg.norm(got) / np.linalg.norm(ref))
    status, _, detail = output_parity({"logits": got}, {"logits": ref}, get_precision("int8-dynamic"), {}.get)
    assert status == "failed-parity" and cos < 0.98
    assert detail.startswith(f"logits: tolerance cosine {cos:.5f} (limit cosine >= 0.98")


def test_a_busy_machine_is_recorded_and_named(tmp_path: Path, capsys, monkeypatch) -> None:
    import os

    from vlexport.bench.rows import shared_cores_note

    cores = os.cpu_count() or 1
    assert shared_cores_note(0.1, 1, cores=cores + 1) is None  # quiet: nothing to say
    assert shared_cores_note(None, 64) is None  # no load average on this OS: no guess
    monkeypatch.setattr(os, "getloadavg", lambda: (cores + 3.0, 0.0, 0.0))
    out = tmp_path / "busy.json"
    args = ["bench", *TINY, "--backends", "eager", "--batch-sizes", "1", "--warmup", "0", "--iters", "2"]
    assert main([*args, "--threads", "1", "--json", str(out)]) == 0
    rows, _ = read_rows(out)
    assert rows and all(r.load_average == cores + 3.0 and r.threads == 1 for r in rows)
    err = " ".join(capsys.readouterr().err.split())
    assert f"load average {cores + 3.0:.1f} on {cores} core(s)" in err and "--threads 1 or fewer" in err
