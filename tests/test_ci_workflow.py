"""docs/ci/vlexport-bench.yml, the workflow users copy: its `run:` steps, run as GitHub Actions runs them
(bash -eo pipefail, the job's env), in a scratch repository on a tiny suite. The gate passes against a
baseline of the same run and fails (exit 1) against one whose speed-up the current run has lost."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = ROOT / "docs" / "ci" / "vlexport-bench.yml"

SUITE = """
[[ci]]
description = "tiny BridgeTower ITM: eager vs ONNX Runtime"
models = ["bridgetower-tiny"]
task = "itm"
random_weights = true
backends = ["eager", "onnx"]
batch_sizes = [1]
seq_len = 16
warmup = 1
iters = 3
device = "cpu"
threads = 1
"""


def _steps() -> tuple[dict, list[dict]]:
    doc = yaml.safe_load(WORKFLOW.read_text())
    job = doc["jobs"]["bench"]
    return doc["env"], job["steps"]


def _run_step(step: dict, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    # GitHub's `shell: bash` default: bash --noprofile --norc -eo pipefail {0}
    return subprocess.run(
        ["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", step["run"]],
        check=False,
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_workflow_declares_the_bench_gate_and_uploads_reports() -> None:
    env, steps = _steps()
    runs = "\n".join(s.get("run", "") for s in steps)
    assert "vlexport bench --suite" in runs and "vlexport regress" in runs and "--absolute" not in runs
    upload = next(s for s in steps if str(s.get("uses", "")).startswith("actions/upload-artifact"))
    assert upload["if"] == "always()"
    assert {"vlexport-bench/current.md", "vlexport-bench/current.png"} <= set(upload["with"]["path"].split())
    assert env["VLEXPORT_OUT"] == "vlexport-bench"


def test_workflow_run_steps_in_a_scratch_repository(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    env_block, steps = _steps()
    repo = tmp_path / "user-repo"
    (repo / "benchmarks").mkdir(parents=True)
    (repo / "benchmarks" / "suites.toml").write_text(SUITE)
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    bin_dir = tmp_path / "bin"  # `vlexport` on PATH as the install step would put it, from this checkout
    bin_dir.mkdir()
    (bin_dir / "vlexport").write_text(f'#!/bin/sh\nexec {sys.executable} -m vlexport.cli "$@"\n')
    (bin_dir / "vlexport").chmod(0o755)
    summary = tmp_path / "summary.md"
    env = {
        **os.environ,
        **{k: str(v) for k, v in env_block.items()},
        "GITHUB_STEP_SUMMARY": str(summary),
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "kernels"), os.environ.get("PYTHONPATH", "")]),
    }
    run_steps = [
        s for s in steps if "run" in s and s.get("id") != "install"
    ]  # installing: this checkout is used
    names = [s["name"] for s in run_steps]
    assert names == ["Benchmark", "Gate against the committed baseline (ratios only)", "Job summary"]
    bench, gate, summary_step = run_steps

    done = _run_step(bench, repo, env)
    assert done.returncode == 0, done.stderr[-2000:]
    out = repo / "vlexport-bench"
    rows = json.loads((out / "current.json").read_text())["rows"]
    assert {r["backend"] for r in rows} == {"eager", "onnx"} and all(r["status"] == "ok" for r in rows)
    assert (out / "current.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "bridgetower-tiny" in (out / "current.md").read_text()

    # The user commits a baseline (here: this run's rows), then the gate runs against it.
    baseline = repo / env_block["VLEXPORT_BASELINE"]
    baseline.write_text((out / "current.json").read_text())
    subprocess.run(["git", "-C", str(repo), "add", "-A"], check=True)
    subprocess.run(
        ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "baseline"],
        check=True,
    )
    done = _run_step(gate, repo, env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "no regressions" in (out / "regress.txt").read_text()

    # A baseline in which ONNX was 100x faster than eager: the current run lost that speed-up, the gate fails.
    doc = json.loads(baseline.read_text())
    for row in doc["rows"]:
        if row["backend"] == "onnx":
            row["speedup_vs_eager"] = 100.0
            row["latency_p50_ms"] = row["latency_p50_ms"] / 1000  # absolute latency is not what is judged
    baseline.write_text(json.dumps(doc))
    done = _run_step(gate, repo, env)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "regression" in (out / "regress.txt").read_text() + done.stderr

    done = _run_step(summary_step, repo, env)
    assert done.returncode == 0, done.stderr
    text = summary.read_text()
    assert "bridgetower-tiny" in text and "regression" in text
