"""The regression gate on constructed rows: ratios, absolute latencies (when asked for), missing rows, parity
failures, and a gate that compared nothing."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from vlexport.bench.regress import compare
from vlexport.bench.rows import FAILED_PARITY, SCHEMA, BenchRow, fill_speedups, read_rows, write_rows
from vlexport.cli import main
from vlexport.errors import CheckError


def _row(backend: str, batch: int, p50: float, device: str = "cpu-a", **kw) -> BenchRow:
    return BenchRow(
        model="m",
        task="itm",
        backend=backend,
        precision="fp32",
        batch=batch,
        seq_len=16,
        image_size=64,
        device=device,
        latency_p50_ms=p50,
        **kw,
    )


def _run(eager: dict[int, float], onnx: dict[int, float], device: str = "cpu-a") -> list[BenchRow]:
    rows = [_row("eager", b, p, device) for b, p in eager.items()] + [
        _row("onnx", b, p, device) for b, p in onnx.items()
    ]
    fill_speedups(rows)
    return rows


BASE = _run({1: 10.0, 4: 20.0}, {1: 5.0, 4: 10.0})  # onnx 2.0x at both batches


def test_speedups_are_same_run_ratios() -> None:
    assert [r.speedup_vs_eager for r in BASE] == [1.0, 1.0, 2.0, 2.0]


def test_identical_files_pass() -> None:
    report = compare(BASE, BASE)
    assert not report.failed and report.same_device and not report.absolute
    assert {f.kind for f in report.findings} == {"ok"}
    assert report.compared == 2  # the two onnx rows; eager is the reference and has no ratio to judge


def test_ratio_slowdown_beyond_limit_fails_and_names_the_row() -> None:
    cur = _run({1: 10.0, 4: 20.0}, {1: 5.0, 4: 12.5})  # b4: speed-up 2.0 -> 1.6: 25% slower
    report = compare(BASE, cur, max_slowdown=0.10)
    (slower,) = report.failures  # ratios only: the absolute p50 (10 -> 12.5 ms) is not judged by default
    assert slower.kind == "slower" and "onnx" in slower.label and "b4" in slower.label
    assert slower.baseline == 2.0 and slower.current == 1.6 and slower.change == pytest.approx(0.25)
    assert not compare(BASE, cur, max_slowdown=0.30).failed


def test_absolute_regression_is_flagged_only_when_asked_for() -> None:
    # Same device name, same ratios, eager and onnx both 50% slower in absolute terms.
    cur = _run({1: 15.0, 4: 30.0}, {1: 7.5, 4: 15.0})
    default = compare(BASE, cur)
    assert default.same_device and not default.failed
    assert all(f.detail != "absolute p50 ms" for f in default.findings)  # not even judged
    asked = compare(BASE, cur, absolute=True)
    assert asked.absolute and asked.compared == 4  # eager rows get an absolute check, so they count
    slower = sorted((f.label.split()[2], f.label.split()[4], f.change) for f in asked.failures)
    assert [f.kind for f in asked.failures] == ["slower-absolute"] * 4
    assert slower == [("eager", "b1", 0.5), ("eager", "b4", 0.5), ("onnx", "b1", 0.5), ("onnx", "b4", 0.5)]
    assert {f.limit for f in asked.failures} == {0.10}  # abs_max_slowdown defaults to max_slowdown
    assert not compare(BASE, cur, absolute=True, abs_max_slowdown=0.6).failed  # +50% within a 60% allowance
    # Asked for, absolute times are judged across devices too: the caller vouches for the machines.
    other = _run({1: 15.0, 4: 30.0}, {1: 7.5, 4: 15.0}, device="cpu-b")
    assert len(compare(BASE, other, absolute=True).failures) == 4


def test_slower_machine_with_better_ratios_passes_by_default() -> None:
    # The CI failure: a machine of the same name, 3x slower in absolute terms, onnx 2.0x -> 2.5x eager.
    cur = _run({1: 30.0, 4: 60.0}, {1: 12.0, 4: 24.0})
    report = compare(BASE, cur, max_slowdown=0.10)
    assert report.same_device and not report.failed and report.compared == 2
    assert [f.kind for f in report.findings] == ["faster", "faster"]
    assert all(f.detail == "speed-up vs eager (same-run ratio)" for f in report.findings)
    # The same numbers, judged in absolute terms, are the regression the old gate reported.
    kinds = {(f.kind, f.label.split()[2]) for f in compare(BASE, cur, absolute=True).failures}
    assert kinds == {("slower-absolute", "eager"), ("slower-absolute", "onnx")}
    # Another device name changes only what the report says.
    other = compare(BASE, _run({1: 30.0, 4: 60.0}, {1: 12.0, 4: 24.0}, device="cpu-b"))
    assert not other.failed and not other.same_device


def test_missing_rows_and_parity_failures_fail() -> None:
    cur = [dataclasses.replace(r) for r in BASE if not (r.backend == "onnx" and r.batch == 4)]
    report = compare(BASE, cur)
    assert [f.kind for f in report.failures] == ["missing"]
    assert not compare(BASE, cur, allow_missing=True).failed

    broken = [dataclasses.replace(r) for r in BASE]
    broken[2].status, broken[2].detail = FAILED_PARITY, "logits: tolerance"
    broken[2].latency_p50_ms = broken[2].speedup_vs_eager = None
    (f,) = compare(BASE, broken).failures
    assert f.kind == "parity" and "logits" in f.detail


def test_rows_skipped_by_allow_missing_are_not_comparisons() -> None:
    cur = [dataclasses.replace(r) for r in BASE if not (r.backend == "onnx" and r.batch == 4)]
    report = compare(BASE, cur, allow_missing=True)
    (skipped,) = [f for f in report.findings if "b4" in f.label and "onnx" in f.label]
    assert skipped.kind == "skipped" and not skipped.failed  # not an "ok" that reads as a passed check
    assert not report.failed and report.compared == 1 and report.skipped == 1


def test_a_gate_that_compared_nothing_fails() -> None:
    # Every row absent, let pass by allow_missing: nothing was judged, so nothing may pass as "no
    # regressions".
    report = compare(BASE, [], allow_missing=True)
    assert [f.kind for f in report.failures] == ["nothing-compared"]
    assert report.compared == 0 and report.skipped == 4
    assert compare(BASE, [], allow_missing=True, allow_empty=True).failed is False
    # Only reference rows: no speed-up to judge either, unless absolute times are asked for.
    eager = [r for r in BASE if r.backend == "eager"]
    assert [f.kind for f in compare(eager, eager).failures] == ["nothing-compared"]
    assert (
        compare(eager, eager, absolute=True).compared == 2 and not compare(eager, eager, absolute=True).failed
    )
    # A row whose speed-up is unknown is reported, not counted.
    blank = [dataclasses.replace(r, speedup_vs_eager=None) for r in BASE]
    unknown = compare(BASE, blank)
    assert unknown.compared == 0 and [f.kind for f in unknown.findings] == ["unchecked"] * 2 + [
        "nothing-compared"
    ]
    assert [f.kind for f in compare([], BASE).failures] == ["nothing-compared"]  # an empty baseline, too


def test_new_rows_are_information_but_new_failures_are_not() -> None:
    extra = _row("compile", 1, 4.0)
    cur = [*BASE, extra]
    fill_speedups(cur)
    report = compare(BASE, cur)
    assert not report.failed and [f.kind for f in report.findings if "compile" in f.label] == ["new"]
    extra.status = FAILED_PARITY
    assert [f.kind for f in compare(BASE, cur).failures] == ["parity"]


def test_rows_json_roundtrip_and_schema(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    write_rows(path, BASE, suite="x")
    rows, meta = read_rows(path)
    assert [r.identity for r in rows] == [r.identity for r in BASE] and meta["suite"] == "x"
    doc = json.loads(path.read_text())
    doc["rows"][0]["field_from_the_future"] = 1  # newer files may carry more fields
    path.write_text(json.dumps(doc))
    assert read_rows(path)[0][0].latency_p50_ms == 10.0
    path.write_text(json.dumps({"schema": "other", "rows": []}))
    with pytest.raises(CheckError, match=SCHEMA):
        read_rows(path)


def test_regress_cli_exit_codes(tmp_path: Path, capsys) -> None:
    base, cur = tmp_path / "base.json", tmp_path / "cur.json"
    write_rows(base, BASE)
    write_rows(cur, _run({1: 10.0, 4: 20.0}, {1: 5.0, 4: 12.5}))
    assert main(["regress", str(base), str(base)]) == 0
    assert main(["regress", str(base), str(cur), "--max-slowdown", "0.1"]) == 1
    text = " ".join(capsys.readouterr().out.split())
    assert "SLOWER" in text and "onnx" in text and "+25.0%" in text
    assert main(["regress", str(base), str(cur), "--max-slowdown", "0.3"]) == 0
    assert main(["regress", str(base), str(tmp_path / "nope.json")]) == 2
    empty = tmp_path / "empty.json"
    write_rows(empty, [])
    capsys.readouterr()
    # skipped every row: compared none
    assert main(["regress", str(base), str(empty), "--allow-missing"]) == 1
    captured = capsys.readouterr()
    text = " ".join(captured.out.split())
    assert "NOTHING" in text and "in 0 compared row(s)" in text
    assert "Nothing was compared" in captured.err and "--allow-empty" in captured.err  # the way out is named
