"""benchmarks/gpu_suite.sh --dry-run: every step of the GPU suite on the CPU, every file it writes, checked.

A lent GPU comes with one 15-minute call; a typo in the script, a suite case that no longer parses or a
generation row that calls a renamed function must fail here, in CI, not on that call.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FILES = (
    "gpu-dry-run-kernels.json",
    "gpu-dry-run.json",
    "gpu-dry-run.md",
    "gpu-dry-run.png",
    "gpu-dry-run-generation.json",
)


@pytest.mark.slow
@pytest.mark.xdist_group("gpu-suite-dry-run")
def test_gpu_suite_dry_run_writes_every_file(tmp_path: Path) -> None:
    env = {**os.environ, "OUT": str(tmp_path)}
    env.pop("TRITON_INTERPRET", None)  # the script sets it itself before Python starts
    run = subprocess.run(
        ["bash", "benchmarks/gpu_suite.sh", "--dry-run"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
        check=False,
    )
    log = run.stdout[-4000:] + run.stderr[-4000:]
    assert run.returncode == 0, log
    written = sorted(p.name for p in tmp_path.iterdir())
    assert all((tmp_path / name).is_file() for name in FILES), (written, log)

    # Kernels: our Triton kernels (interpreted) agree with eager at every shrunk case.
    kernels = json.loads((tmp_path / "gpu-dry-run-kernels.json").read_text())
    ours = [r for r in kernels if r["impl"] == "vlexport"]
    cases = {(r["name"], json.dumps(r["shape"], sort_keys=True)) for r in kernels}
    assert len(ours) == len(cases) and all(r["max_abs_err"] < 1e-4 for r in ours), ours

    # The suite: every case of [[gpu]] ran on its tiny twin; every row passed parity with eager.
    report = json.loads((tmp_path / "gpu-dry-run.json").read_text())
    rows = report["rows"]
    failed = [(r["model"], r["backend"], r["detail"]) for r in rows if r["status"] != "ok"]
    assert rows and not failed, failed
    assert {r["model"] for r in rows} == {"bridgetower-tiny", "blip-tiny", "blip2-opt-tiny"}
    assert {"eager", "compile", "onnx", "onnx-opt", "aoti"} <= {r["backend"] for r in rows}
    assert "tensorrt: left out of the dry run" in run.stdout + run.stderr  # named, not silently dropped

    # Generation rows: each ran or says which requirement is absent; none errored.
    generation = json.loads((tmp_path / "gpu-dry-run-generation.json").read_text())
    by_row = {r["row"]: r for r in generation["rows"]}
    assert set(by_row) == {"hf-fp16", "hf-llm-int8", "aoti-fp16", "aoti-int8-weight"}
    assert not [r for r in by_row.values() if "error" in r], by_row
    assert by_row["hf-fp16"]["tokens_per_s"] > 0 and by_row["aoti-fp16"]["tokens_per_s"] > 0
    assert by_row["hf-llm-int8"]["skipped"] == "needs CUDA"
