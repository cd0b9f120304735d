"""int8-weight (MatMulNBits) and int8-static (calibrated QDQ) ONNX variants, and the accuracy report.

Each variant is validated against eager fp32 (HF generate() for generation) with its precision's
thresholds; the report lands in the manifest, is printed, and decides the exit code.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image

from vlexport.cli import main
from vlexport.manifest import Manifest
from vlexport.quantize.precision import Int8WeightConfig, Tolerance, get_precision
from vlexport.validate import validate_directory


def _ops(directory: Path, file: str) -> set[str]:
    return {n.op_type for n in onnx.load(str(directory / file), load_external_data=False).graph.node}


@pytest.mark.parametrize(("preset", "task"), [("blip2-opt-tiny", "generate"), ("blip2-flan-t5-tiny", "generate"),
                                               ("blip-tiny", "caption"), ("blip-tiny", "vqa")])
def test_int8_weight_generation_keeps_fp32_tokens(exported, tmp_path: Path, capsys, preset: str, task: str) -> None:
    parent = exported(preset, task)
    out = tmp_path / "w8"
    assert main(["quantize", str(parent), "-o", str(out), "--precision", "int8-weight"]) == 0
    printed = capsys.readouterr().out
    m = Manifest.read(out)
    assert m.precision == "int8-weight" and m.derived_from["block_size"] == Int8WeightConfig().block_size
    # Every component with constant-weight MatMuls (decoder steps included) now runs MatMulNBits.
    for name, comp in m.components.items():
        nodes = onnx.load(str(out / comp.file), load_external_data=False).graph.node
        assert m.derived_from["matmul_nbits"][Path(comp.file).stem] == sum(n.op_type == "MatMulNBits" for n in nodes)
        ops = {n.op_type for n in nodes}
        assert "MatMul" not in ops or "MatMulNBits" in ops, (name, ops)
    assert any(m.derived_from["matmul_nbits"].values())
    acc = m.validation.accuracy
    tol = get_precision("int8-weight").tolerance
    g = acc.generation
    assert acc.passed and g["greedy_samples"] > 0
    assert g["agreement_with_near_ties"] >= tol.min_agreement and g["min_logit_cosine"] >= tol.min_cosine
    # The report is derived from the per-sample checks, not made up: recount the greedy share.
    greedy = [c for c in m.validation.checks if c["output"] == "tokens" and "greedy" in c["shape"]]
    assert g["greedy_token_agreement"] == pytest.approx(np.mean([c["kind"] == "ok" for c in greedy]))
    assert "accuracy vs eager fp32 (int8-weight): passed" in printed and "logit cosine" in printed
    if task == "caption":  # re-checked from the directory alone
        report = validate_directory(out)
        assert report.passed and report.accuracy is not None and report.accuracy.generation["greedy_samples"] > 0
    # Smaller on disk than the parent (tiny graphs are mostly node metadata, so only a little).
    assert sum(c.size_bytes for c in m.components.values()) < sum(
        c.size_bytes for c in Manifest.read(parent).components.values())


def _calibration_dir(root: Path, *, images: int = 3, texts: bool = True) -> Path:
    rng = np.random.default_rng(0)
    root.mkdir()
    for i in range(images):
        Image.fromarray(rng.integers(0, 255, (40 + 7 * i, 48, 3), dtype=np.uint8)).save(root / f"img{i}.png")
    if texts:
        (root / "captions.txt").write_text("a dog on a beach\n\ntwo cats sleeping on a sofa\na red bus\n")
    return root


def test_int8_static_synthetic_and_directory_calibration(exported, tmp_path: Path, capsys) -> None:
    parent = exported("bridgetower-tiny", "itm")
    synth = tmp_path / "s8"
    assert main(["quantize", str(parent), "-o", str(synth), "--precision", "int8-static"]) == 0
    m = Manifest.read(synth)
    assert {"QuantizeLinear", "DequantizeLinear"} <= _ops(synth, "model.onnx")
    cal = m.derived_from["calibration"]
    assert cal["source"] == "synthetic" and cal["method"] == "minmax" and cal["samples"] > 0
    acc = m.validation.accuracy
    tol = get_precision("int8-static").tolerance
    assert acc.passed and acc.calibration == cal
    assert acc.outputs["logits"]["cosine"] >= tol.min_cosine
    assert acc.tasks["logits"]["kind"] == "ITM argmax" and acc.tasks["logits"]["agreement"] >= tol.min_agreement
    capsys.readouterr()
    directory = tmp_path / "d8"
    cal_dir = _calibration_dir(tmp_path / "cal")
    assert main(["quantize", str(parent), "-o", str(directory), "--precision", "int8-static",
                 "--calibration", str(cal_dir), "--method", "entropy"]) == 0
    assert "calibration: directory (3 samples, entropy)" in capsys.readouterr().out
    cal = Manifest.read(directory).derived_from["calibration"]
    assert cal["source"] == "directory" and cal["images"] == 3 and cal["texts"] == 3
    assert cal["path"] == str(cal_dir.resolve())


def test_int8_static_refusals_write_nothing(exported, tmp_path: Path, capsys) -> None:
    parent = exported("bridgetower-tiny", "itm")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.png").write_bytes(b"not a png")
    (bad / "captions.txt").write_text("a caption\n")
    cases = [(["--precision", "int8-static", "--calibration", str(bad)], "no usable image"),
             (["--precision", "fp16", "--method", "entropy"], "applies to --precision int8-static"),
             (["--precision", "int8-weight", "--smooth", "0.7"], "--smooth applies to --precision int8-dynamic"),
             (["--precision", "int8-dynamic", "--smooth", "1.5"], "--smooth must be in (0, 1)")]
    for extra, message in cases:
        out = tmp_path / "out"
        assert main(["quantize", str(parent), "-o", str(out), *extra]) == 2
        err = " ".join(capsys.readouterr().err.split())
        assert message in err and "Traceback" not in err and not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    out = tmp_path / "gen"
    assert main(["quantize", str(exported("blip-tiny", "caption")), "-o", str(out), "--precision", "int8-static"]) == 2
    assert "int8-weight" in " ".join(capsys.readouterr().err.split()) and not out.exists()


def test_below_threshold_exits_1_unless_accepted(exported, tmp_path: Path, capsys, monkeypatch) -> None:
    parent = exported("bridgetower-tiny", "itm")
    # A threshold no int8 graph meets: the same variant is now "degraded".
    monkeypatch.setattr(type(get_precision("int8-weight")), "tolerance", Tolerance(min_cosine=0.9999999,
                                                                                    min_agreement=0.9))
    out = tmp_path / "w8"
    assert main(["quantize", str(parent), "-o", str(out), "--precision", "int8-weight"]) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert "cosine" in err and not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert main(["quantize", str(parent), "-o", str(out), "--precision", "int8-weight", "--accept-degraded"]) == 0
    assert "kept with --accept-degraded" in capsys.readouterr().out
    doc = json.loads((out / "manifest.json").read_text())["validation"]
    assert doc["passed"] is False and doc["accuracy"]["degraded"] is True and doc["accuracy"]["misses"]
    assert main(["validate", str(out)]) == 1  # the re-check still says it is below its thresholds


def test_int8_bnb_is_eager_on_cuda_only(monkeypatch) -> None:
    import torch

    from vlexport.errors import UsageError
    from vlexport.quantize.bnb import check_available
    from vlexport.quantize.precision import precisions_for_backend

    assert "int8-bnb" in precisions_for_backend("eager") and "int8-bnb" not in precisions_for_backend("onnx")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UsageError, match="CUDA") as e:
        check_available()
    assert e.value.exit_code == 2 and "int8-weight" in str(e.value)


def test_int8_dynamic_smoothing_keeps_gelu_fed_matmuls_fp32(exported, tmp_path: Path) -> None:
    parent = exported("bridgetower-tiny", "itm")
    out = tmp_path / "smooth"
    assert main(["quantize", str(parent), "-o", str(out), "--precision", "int8-dynamic", "--smooth", "0.7"]) == 0
    m = Manifest.read(out)
    sm = m.derived_from["smooth"]
    assert sm["alpha"] == 0.7 and sm["activations_smoothed"] > 0 and sm["kept_fp32"]
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    kept = {n.name for n in graph.node if n.op_type == "MatMul"}
    assert set(sm["kept_fp32"]) <= kept  # still float MatMuls; the others were quantized
    assert any(n.op_type in ("MatMulInteger", "DynamicQuantizeMatMul") for n in graph.node)
    assert sum(n.op_type == "Mul" and n.name.endswith("_smooth") for n in graph.node) == sm["activations_smoothed"]
    assert m.validation.accuracy.passed

