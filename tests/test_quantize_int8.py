"""int8-weight (MatMulNBits) and int8-static (calibrated QDQ) ONNX variants, and the accuracy report.

Each variant is validated against eager fp32 (HF generate() for generation) with its precision's
thresholds; the report lands in the manifest, is printed, and decides the exit code.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image

from vlexport.cli import main
from vlexport.contracts.manifest import Manifest
from vlexport.contracts.precision import (
    Int4WeightConfig,
    Int8WeightConfig,
    Tolerance,
    WeightOnlyConfig,
    get_precision,
)
from vlexport.quantize.matmul_nbits import linear_weight
from vlexport.quantize.smoothing import constant_weight_matmuls
from vlexport.validate import validate_directory


def _ops(directory: Path, file: str) -> set[str]:
    return {n.op_type for n in onnx.load(str(directory / file), load_external_data=False).graph.node}


@pytest.mark.parametrize(
    ("preset", "task"),
    [
        ("blip2-opt-tiny", "generate"),
        ("blip2-flan-t5-tiny", "generate"),
        ("blip-tiny", "caption"),
        ("blip-tiny", "vqa"),
    ],
)
def test_int8_weight_generation_keeps_fp32_tokens(
    exported, tmp_path: Path, capsys, preset: str, task: str
) -> None:
    parent = exported(preset, task)
    out = tmp_path / "w8"
    block = ["--block-size", "64"] if task == "caption" else []  # a non-default size reaches the graph
    assert main(["quantize", str(parent), "-o", str(out), "--precision", "int8-weight", *block]) == 0
    printed = capsys.readouterr().out
    m = Manifest.read(out)
    want = 64 if block else Int8WeightConfig().block_size
    assert m.precision == "int8-weight" and m.derived_from["block_size"] == want
    sizes = {
        a.i
        for comp in m.components.values()
        for n in onnx.load(str(out / comp.file), load_external_data=False).graph.node
        if n.op_type == "MatMulNBits"
        for a in n.attribute
        if a.name == "block_size"
    }
    assert sizes == {want}
    # Every constant-weight MatMul / Gemm of every component (decoder steps included) now runs MatMulNBits.
    for name, comp in m.components.items():
        graph = onnx.load(str(out / comp.file), load_external_data=False).graph
        assert m.derived_from["matmul_nbits"][Path(comp.file).stem] == sum(
            n.op_type == "MatMulNBits" for n in graph.node
        )
        inits = {t.name: t for t in graph.initializer}
        producer = {o: n for n in graph.node for o in n.output}
        left = [n.name for n in graph.node if linear_weight(n, inits, producer) is not None]
        assert not left, (name, left)
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
        assert (
            report.passed and report.accuracy is not None and report.accuracy.generation["greedy_samples"] > 0
        )
    # Smaller on disk than the parent (tiny graphs are mostly node metadata, so only a little).
    assert sum(c.size_bytes for c in m.components.values()) < sum(
        c.size_bytes for c in Manifest.read(parent).components.values()
    )


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
    assert (
        acc.tasks["logits"]["kind"] == "ITM argmax"
        and acc.tasks["logits"]["agreement_with_near_ties"] >= tol.min_agreement
    )
    capsys.readouterr()
    directory = tmp_path / "d8"
    cal_dir = _calibration_dir(tmp_path / "cal")
    assert (
        main(
            [
                "quantize",
                str(parent),
                "-o",
                str(directory),
                "--precision",
                "int8-static",
                "--calibration",
                str(cal_dir),
                "--method",
                "entropy",
            ]
        )
        == 0
    )
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
    cases = [
        (["--precision", "int8-static", "--calibration", str(bad)], "no usable image"),
        (["--precision", "fp16", "--method", "entropy"], "applies to --precision int8-static"),
        (["--precision", "int8-weight", "--smooth", "0.7"], "--smooth applies to --precision int8-dynamic"),
        (["--precision", "int8-dynamic", "--smooth", "1.5"], "--smooth must be in (0, 1)"),
    ]
    for extra, message in cases:
        out = tmp_path / "out"
        assert main(["quantize", str(parent), "-o", str(out), *extra]) == 2
        err = " ".join(capsys.readouterr().err.split())
        assert message in err and "Traceback" not in err and not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    out = tmp_path / "gen"
    assert (
        main(
            ["quantize", str(exported("blip-tiny", "caption")), "-o", str(out), "--precision", "int8-static"]
        )
        == 2
    )
    assert "int8-weight" in " ".join(capsys.readouterr().err.split()) and not out.exists()


def test_below_threshold_exits_1_unless_accepted(exported, tmp_path: Path, capsys, monkeypatch) -> None:
    parent = exported("bridgetower-tiny", "itm")
    # A threshold no int8 graph meets: the same variant is now "degraded".
    monkeypatch.setattr(
        type(get_precision("int8-weight")), "tolerance", Tolerance(min_cosine=0.9999999, min_agreement=0.9)
    )
    out = tmp_path / "w8"
    assert main(["quantize", str(parent), "-o", str(out), "--precision", "int8-weight"]) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert (
        "cosine" in err and not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    )
    assert (
        main(["quantize", str(parent), "-o", str(out), "--precision", "int8-weight", "--accept-degraded"])
        == 0
    )
    assert "kept with --accept-degraded" in capsys.readouterr().out
    doc = json.loads((out / "manifest.json").read_text())["validation"]
    assert doc["passed"] is False and doc["accuracy"]["degraded"] is True and doc["accuracy"]["misses"]
    assert main(["validate", str(out)]) == 1  # the re-check still says it is below its thresholds


def test_int8_dynamic_smoothing_keeps_gelu_fed_matmuls_fp32(exported, tmp_path: Path) -> None:
    parent = exported("bridgetower-tiny", "itm")
    out = tmp_path / "smooth"
    assert (
        main(["quantize", str(parent), "-o", str(out), "--precision", "int8-dynamic", "--smooth", "0.7"]) == 0
    )
    m = Manifest.read(out)
    sm = m.derived_from["smooth"]
    assert sm["alpha"] == 0.7 and sm["activations_smoothed"] > 0 and sm["kept_fp32"]
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    kept = {n.name for n in graph.node if n.op_type == "MatMul"}
    assert set(sm["kept_fp32"]) <= kept  # still float MatMuls; the others were quantized
    # ... reading their GELU output unsmoothed: it has no other reader, so no Mul either
    assert all(not n.input[0].endswith("_smoothed") for n in graph.node if n.name in sm["kept_fp32"])
    (comp,) = Manifest.read(parent).components.values()
    assert sm["activations_smoothed"] == len(
        constant_weight_matmuls(onnx.load(str(parent / comp.file)))
    ) - len(sm["kept_fp32"])
    assert any(n.op_type in ("MatMulInteger", "DynamicQuantizeMatMul") for n in graph.node)
    assert (
        sum(n.op_type == "Mul" and n.name.endswith("_smooth") for n in graph.node)
        == sm["activations_smoothed"]
    )
    assert m.validation.accuracy.passed


def _linear_graph(path: Path, *, canonical: bool) -> dict[str, np.ndarray]:
    """The three ways the exporter writes ``nn.Linear`` (MatMul on a [K, N] initializer; Gemm(transB=1) + bias
    on an [N, K] one, as OPT's FFN; MatMul on a Transpose of a tied embedding table, as OPT's lm_head), with
    a scalar and a Gather on the tied table, saved with external data. ``canonical``: the same function with
    every weight a pre-transposed MatMul initializer (+ Add), the only form ORT's own quantizer handles."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = {
        "W1": rng.standard_normal((64, 96)).astype(np.float32),
        "W2": (rng.standard_normal((40, 104)) * 0.1).astype(np.float32),  # [N, K]; K not a block multiple
        "b2": rng.standard_normal(40).astype(np.float32),
        "E": rng.standard_normal((50, 40)).astype(np.float32),
        "half": np.array(0.5, dtype=np.float32),
        "ids": np.array([1, 3], dtype=np.int64),
        "pads": np.array([0, 0, 0, 8], dtype=np.int64),
    }
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h"], name="mm1"),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("Pad", ["r", "pads"], ["p"]),
    ]
    inits = dict(w)
    if canonical:
        inits.update(W2t=w["W2"].T.copy(), Et=w["E"].T.copy())
        del inits["W2"]
        nodes += [
            helper.make_node("MatMul", ["p", "W2t"], ["m2"], name="mm2"),
            helper.make_node("Add", ["m2", "b2"], ["y2"]),
            helper.make_node("MatMul", ["y2", "Et"], ["logits"], name="head"),
        ]
    else:
        nodes += [
            helper.make_node("Gemm", ["p", "W2", "b2"], ["y2"], name="mm2", transB=1),
            helper.make_node("Transpose", ["E"], ["Et"], perm=[1, 0]),
            helper.make_node("MatMul", ["y2", "Et"], ["logits"], name="head"),
        ]
    nodes += [
        helper.make_node("Mul", ["logits", "half"], ["y"]),
        helper.make_node("Gather", ["E", "ids"], ["g"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 64])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 50]),
            helper.make_tensor_value_info("g", TensorProto.FLOAT, [2, 40]),
        ],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.save(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=f"{path.name}.data",
        size_threshold=0,
    )
    return w


@pytest.mark.parametrize(
    ("external", "config"),
    [(True, Int8WeightConfig()), (False, Int8WeightConfig()), (True, Int4WeightConfig())],
    ids=["int8-external", "int8-inline", "int4-external"],
)
def test_streaming_weight_only_equals_onnxruntime_quantizer(
    tmp_path: Path, external: bool, config: WeightOnlyConfig
) -> None:
    """One weight at a time from the parent's data file, Gemm and tied-Transpose forms included, gives ORT's
    MatMulNBitsQuantizer's result on the canonical graph, bit for bit, at 8 and 4 bits."""
    import onnxruntime as ort
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    from vlexport.quantize.matmul_nbits import weight_only_nbits

    for d in ("src", "canon", "mine"):
        (tmp_path / d).mkdir()
    src, canon, mine = (
        tmp_path / "src" / "m.onnx",
        tmp_path / "canon" / "m.onnx",
        tmp_path / "mine" / "m.onnx",
    )
    w = _linear_graph(src, canonical=False)
    _linear_graph(canon, canonical=True)
    assert weight_only_nbits(src, mine, config, external=external) == {"MatMulNBits": 3}
    ref = MatMulNBitsQuantizer(
        onnx.load(str(canon)),
        bits=config.weight_bits,
        block_size=config.block_size,
        is_symmetric=config.symmetric,
        accuracy_level=config.accuracy_level,
    )
    ref.process()
    x = np.random.default_rng(1).standard_normal((3, 64)).astype(np.float32)

    def run(model: Path | bytes) -> list[np.ndarray]:
        source = str(model) if isinstance(model, Path) else model
        return ort.InferenceSession(source, providers=["CPUExecutionProvider"]).run(None, {"x": x})

    got, want = run(mine), run(ref.model.model.SerializeToString())
    # the tied table is kept
    assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], w["E"][[1, 3]])
    h = np.pad(np.maximum(x @ w["W1"], 0), ((0, 0), (0, 8))) @ w["W2"].T + w["b2"]
    y = h @ w["E"].T * 0.5
    # quantized, and close: 16 levels per block instead of 256
    assert 0 < np.abs(got[0] - y).max() < (0.02 if config.weight_bits == 8 else 0.2) * np.abs(y).max()
    graph = onnx.load(str(mine), load_external_data=False).graph
    ops = [n.op_type for n in graph.node]
    assert (
        ops.count("MatMulNBits") == 3 and "Gemm" not in ops and "Transpose" not in ops and "MatMul" not in ops
    )
    bits = {a.i for n in graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "bits"}
    assert bits == {config.weight_bits}
    names = {t.name for t in graph.initializer}
    assert {"W1", "W2"}.isdisjoint(names) and {"E", "b2", "half"} <= names
    assert [t.dims for t in graph.initializer if t.name == "half"] == [[]]  # scalars stay scalars
    data = mine.parent / "m.onnx.data"
    assert data.is_file() == external
    if external:  # W1 and W2 are gone, only their ~1/4-size blocks are stored
        assert data.stat().st_size < (src.parent / "m.onnx.data").stat().st_size


def test_block_size_applies_to_int8_weight_only(exported, tmp_path: Path, capsys) -> None:
    parent = exported("blip-tiny", "caption")
    assert (
        main(
            [
                "quantize",
                str(parent),
                "-o",
                str(tmp_path / "a"),
                "--precision",
                "int8-dynamic",
                "--block-size",
                "64",
            ]
        )
        == 2
    )
    assert (
        main(
            [
                "quantize",
                str(parent),
                "-o",
                str(tmp_path / "b"),
                "--precision",
                "int8-weight",
                "--block-size",
                "48",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "--block-size applies to --precision int8-weight" in err and "power of two" in err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.parametrize("precision", ["int8-dynamic", "int8-static"])
def test_int8_from_a_parent_with_external_data(tmp_path: Path, monkeypatch, capsys, precision: str) -> None:
    """Full-size graphs keep their weights in external data (bridgetower-base: 1.3 GB). ONNX Runtime's
    quantizers read the parent through a scratch view of it (quantize/onnx_rewrite.py source_view); onnx
    >= 1.20 refuses external data behind a symlink, so the view must not be one. Forced on the tiny twin."""
    from vlexport.export import onnx as onnx_export
    from vlexport.pipeline import ExportJob, run_export

    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_THRESHOLD", 0)
    parent = tmp_path / "fp32"
    m = run_export(ExportJob("bridgetower-tiny", parent, task="itm", random_weights=True))
    data = parent / m.components["model"].external_data
    before = (data.read_bytes(), data.stat().st_nlink)
    out = tmp_path / precision
    assert main(["quantize", str(parent), "-o", str(out), "--precision", precision]) == 0, capsys.readouterr()
    assert Manifest.read(out).validation.passed and (data.read_bytes(), data.stat().st_nlink) == before
    # onnx 1.23 writes external data 0600: the artifact's files get the usual read bits (a server user reads)
    umask = os.umask(0)
    os.umask(umask)
    bits = 0o444 & ~umask
    assert list(out.glob("*.data")) and all(f.stat().st_mode & bits == bits for f in out.iterdir())
