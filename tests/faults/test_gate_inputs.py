"""The regression gate cannot be fooled by its input files: non-finite or non-positive speed-ups and latencies
(in either file) and duplicate row identities are errors (exit 1) naming the rows, before anything is judged.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from tests.faults.cli_helpers import cli
from vlexport.bench.rows import BenchRow, fill_speedups, write_rows


def _rows(onnx_p50: float = 5.0) -> list[BenchRow]:
    rows = [
        BenchRow(
            model="m",
            task="itm",
            backend=b,
            precision="fp32",
            batch=1,
            seq_len=16,
            device="cpu",
            latency_p50_ms=p,
        )
        for b, p in (("eager", 10.0), ("onnx", onnx_p50))
    ]
    fill_speedups(rows)
    return rows


def _write(path: Path, rows: list[BenchRow], **changes: object) -> Path:
    """Write ``rows`` with the onnx row's fields set to ``changes`` (NaN / inf go through as JSON's NaN)."""
    rows = [dataclasses.replace(r, **changes) if r.backend == "onnx" else r for r in rows]
    write_rows(path, rows)
    return path


@pytest.mark.parametrize("which", ["baseline", "current"])
@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("speedup_vs_eager", float("nan")),
        ("speedup_vs_eager", float("inf")),
        ("speedup_vs_eager", -2.0),
        ("speedup_vs_eager", 0.0),
        ("latency_p50_ms", float("nan")),
        ("latency_p50_ms", -1.0),
    ],
)
def test_bad_figures_are_errors_naming_the_row(
    tmp_path: Path, capsys, which: str, field: str, value: float
) -> None:
    good = _write(tmp_path / "good.json", _rows())
    bad = _write(tmp_path / "bad.json", _rows(), **{field: value})
    files = (bad, good) if which == "baseline" else (good, bad)
    rc, err = cli(capsys, "regress", *files, "--absolute")
    assert (
        rc == 1 and f"{bad} cannot be judged" in err and "m itm onnx fp32 b1 s16" in err and field in err
    ), err


def test_a_file_listing_every_row_twice_slow_first_fails(tmp_path: Path, capsys) -> None:
    base = _write(tmp_path / "base.json", _rows())
    doc = json.loads(_write(tmp_path / "cur.json", _rows(onnx_p50=9.0)).read_text())
    fast = json.loads(_write(tmp_path / "fast.json", _rows()).read_text())["rows"]
    doc["rows"] += fast  # slow rows first, then the same identities fast: the last value would win
    (tmp_path / "cur.json").write_text(json.dumps(doc))
    rc, err = cli(capsys, "regress", base, tmp_path / "cur.json")
    assert rc == 1 and "2 row(s) listed more than once" in err and "m itm onnx fp32 b1 s16 (x2)" in err, err


def test_clean_files_still_pass(tmp_path: Path, capsys) -> None:
    from vlexport.cli import main

    base = _write(tmp_path / "base.json", _rows())
    assert main(["regress", str(base), str(base), "--absolute"]) == 0
