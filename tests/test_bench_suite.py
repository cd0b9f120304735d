"""The CI benchmark gate: run the `ci-cpu` suite, then `regress` it against the committed CPU baseline.

The gate itself is exercised on every CI run, on same-run ratios only: CI machines of the same name differ
2-4x in absolute speed, so an absolute p50 from the machine that wrote the baseline says nothing about this
one. The tolerance is wide because CI machines are shared and noisy: a same-run speed-up may lose 75% of
itself (x1.75) before this fails; tests/test_bench.py shows that a real slowdown trips it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from vlexport.bench import compare, read_rows
from vlexport.bench.suite import load_suite
from vlexport.cli import main
from vlexport.errors import UsageError

REPO = Path(__file__).resolve().parents[1]
SUITES = REPO / "benchmarks" / "suites.toml"
BASELINE = REPO / "benchmarks" / "results" / "cpu-ci.json"
CI_MAX_SLOWDOWN = 0.75
CI_GATE = ["--max-slowdown", str(CI_MAX_SLOWDOWN)]  # ratios only: no --absolute


@pytest.mark.timing
def test_ci_suite_then_regress_against_committed_baseline(tmp_path: Path, capsys) -> None:
    current = tmp_path / "ci.json"
    assert main(["bench", "--suite", "ci-cpu", "--suite-file", str(SUITES), "--json", str(current)]) == 0
    rows, meta = read_rows(current)
    assert meta["suite"] == "ci-cpu"
    assert [(r.backend, r.batch) for r in rows] == [("eager", 1), ("onnx", 1), ("eager", 4), ("onnx", 4)]
    assert all(r.ok and r.threads == 1 and r.iters == 20 for r in rows)
    baseline, _ = read_rows(BASELINE)
    assert {r.identity for r in baseline} == {r.identity for r in rows}  # the baseline covers the suite
    code = main(["regress", str(BASELINE), str(current), *CI_GATE])
    assert code == 0, capsys.readouterr().out
    # What the gate judged: both onnx ratios, and no absolute latency (eager rows only have one to judge).
    report = compare(baseline, rows, max_slowdown=CI_MAX_SLOWDOWN)
    assert report.compared == 2 and not report.absolute and not report.failed
    checked = sorted((f.label.split()[2], f.label.split()[4], f.detail) for f in report.findings)
    assert checked == [("onnx", f"b{b}", "speed-up vs eager (same-run ratio)") for b in (1, 4)]


def test_suite_loading(tmp_path: Path) -> None:
    (plan,) = load_suite("ci-cpu", SUITES, threads=None, device="cpu")
    assert plan.models == ("bridgetower-tiny",) and plan.backends == ("eager", "onnx") and plan.threads == 1
    assert {p.models[0] for p in load_suite("gpu", SUITES)} == {
        "bridgetower-base-itm-mlm",
        "blip-image-captioning-base",
        "blip2-opt-2.7b",
    }
    bad = tmp_path / "s.toml"
    bad.write_text('[[x]]\nmodels = ["bridgetower-tiny"]\nbatch = 3\n')
    with pytest.raises(UsageError, match="unknown key"):
        load_suite("x", bad)
    with pytest.raises(UsageError, match="No suite 'y'"):
        load_suite("y", bad)
    # a string, not a list: would be read letter by letter
    bad.write_text('[[x]]\nmodels = "bridgetower-tiny"\n')
    with pytest.raises(UsageError, match="case 1: models must be a list of strings"):
        load_suite("x", bad)
