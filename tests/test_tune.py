"""`vlexport tune`: candidates built and judged at the shapes to serve, the ones that miss excluded with the
reason, survivors benched in one run, the fastest passing one written as a normal validated artifact."""

from __future__ import annotations

import json
from pathlib import Path

from vlexport.cli import main
from vlexport.manifest import Manifest


def test_tune_excludes_a_candidate_that_misses_and_writes_the_fastest(tmp_path: Path, capsys) -> None:
    out = tmp_path / "tuned"
    # int8-weight keeps cosine ~0.9999 on random weights: a 0.999999 target excludes it (no search knob);
    # fp32 is judged value-exact (its own tolerance), fp16 by the target.
    args = ["tune", "bridgetower-tiny", "--task", "itm", "--random-weights", "-o", str(out)]
    args += ["--backends", "onnx", "--precisions", "fp32,int8-weight", "--min-cosine", "0.999999"]
    args += ["--batch-sizes", "1,2", "--seq-lens", "8,16", "--warmup", "1", "--iters", "3"]
    assert main(args) == 0, capsys.readouterr().err
    printed = " ".join(capsys.readouterr().out.split())
    report = json.loads((out / "tune" / "report.json").read_text())
    by = {c["name"]: c for c in report["candidates"]}
    assert set(by) == {"onnx fp32", "onnx int8-weight"}
    w8 = by["onnx int8-weight"]
    assert not w8["passed"] and "cosine" in w8["reason"] and "< 0.999999" in w8["reason"]
    assert not w8["p50_ms"]  # excluded before the bench
    fp32 = by["onnx fp32"]
    assert (
        fp32["passed"] and set(fp32["p50_ms"]) == {"1", "2"} and all(v > 0 for v in fp32["p50_ms"].values())
    )
    serve = fp32["accuracy"]["serve_shapes"]
    assert serve["passed"] and serve["shapes"] == ["b1s8", "b1s16", "b2s8", "b2s16"]
    assert report["chosen"]["backend"] == "onnx" and report["chosen"]["precision"] == "fp32"
    # the bench rows come from one run with eager as the reference, and the chosen row is the candidate's
    rows = report["bench_rows"]
    assert {r["backend"] for r in rows} == {"eager", "onnx"}
    assert all(r["status"] == "ok" for r in rows)
    assert "chosen: onnx fp32" in printed and "onnx int8-weight: dropped" in printed
    m = Manifest.read(out)
    assert m.backend == "onnx" and m.precision == "fp32" and m.validation.passed
    assert (out / "tune" / "report.md").read_text().count("| onnx") == 2
    assert (out / "tune" / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["validate", str(out)]) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["tuned"]  # the work dir went with the run
