"""The regression gate on constructed rows: ratios, absolute latencies, missing rows, parity failures."""

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
    return BenchRow(model="m", task="itm", backend=backend, precision="fp32", batch=batch, seq_len=16,
                    image_size=64, device=device, latency_p50_ms=p50, **kw)


def _run(eager: dict[int, float], onnx: dict[int, float], device: str = "cpu-a") -> list[BenchRow]:
    rows = [_row("eager", b, p, device) for b, p in eager.items()] + [_row("onnx", b, p, device)
                                                                      for b, p in onnx.items()]
    fill_speedups(rows)
    return rows


BASE = _run({1: 10.0, 4: 20.0}, {1: 5.0, 4: 10.0})  # onnx 2.0x at both batches


def test_speedups_are_same_run_ratios() -> None:
    assert [r.speedup_vs_eager for r in BASE] == [1.0, 1.0, 2.0, 2.0]


def test_identical_files_pass() -> None:
    report = compare(BASE, BASE)
    assert not report.failed and report.same_device
    assert {f.kind for f in report.findings} == {"ok"}


def test_ratio_slowdown_beyond_limit_fails_and_names_the_row() -> None:
    cur = _run({1: 10.0, 4: 20.0}, {1: 5.0, 4: 12.5})  # b4: speed-up 2.0 -> 1.6: 25% slower
    report = compare(BASE, cur, max_slowdown=0.10)
    (slower,) = [f for f in report.failures if f.kind == "slower"]
    assert "onnx" in slower.label and "b4" in slower.label
    assert slower.baseline == 2.0 and slower.current == 1.6 and slower.change == pytest.approx(0.25)
    # Same device, so the absolute p50 is judged as well: 10 -> 12.5 ms.
    (absolute,) = [f for f in report.failures if f.kind == "slower-absolute"]
    assert absolute.change == pytest.approx(0.25)
    assert not compare(BASE, cur, max_slowdown=0.30).failed


def test_slower_machine_with_same_ratios_passes() -> None:
    # Everything 3x slower on another (busier) device: the ratios are unchanged, absolute times are not compared.
    cur = _run({1: 30.0, 4: 60.0}, {1: 15.0, 4: 30.0}, device="cpu-b")
    report = compare(BASE, cur, max_slowdown=0.10)
    assert not report.failed and not report.same_device
    # The same numbers from the same device are an absolute regression of eager too.
    same = _run({1: 30.0, 4: 60.0}, {1: 15.0, 4: 30.0}, device="cpu-a")
    kinds = {(f.kind, f.label.split()[2]) for f in compare(BASE, same).failures}
    assert kinds == {("slower-absolute", "eager"), ("slower-absolute", "onnx")}
    assert not compare(BASE, same, same_device=False).failed  # --ratios-only
    assert not compare(BASE, same, abs_max_slowdown=2.5).failed  # 200% slower is within a 250% allowance


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
