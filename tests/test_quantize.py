"""Precision passes on ONNX artifacts: fp16 and int8-dynamic variants, derived from an fp32 artifact and
validated against eager fp32 with their precision's tolerance (cosine, task agreement)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from vlexport.cli import main
from vlexport.contracts.manifest import Manifest
from vlexport.contracts.precision import get_precision
from vlexport.cpu import exact_int8_dot
from vlexport.validate import validate_directory


def _weight_bytes(directory: Path) -> int:
    """Bytes of the graphs' initializers (the files also hold per-node metadata, which is most of a tiny
    one)."""
    graph = onnx.load(str(directory / "model.onnx")).graph
    return sum(len(i.raw_data) for i in graph.initializer)


@pytest.mark.parametrize("precision", ["int8-dynamic", "fp16"])
def test_quantize_an_onnx_artifact(exported, tmp_path: Path, capsys, precision: str) -> None:
    parent = exported("bridgetower-tiny", "itm")
    out = tmp_path / precision
    assert main(["quantize", str(parent), "-o", str(out), "--precision", precision]) == 0
    m = Manifest.read(out)
    assert m.backend == "onnx" and m.precision == precision
    # reduce_range: this CPU decides (cpu.py); the manifest records which
    reduce = not exact_int8_dot()
    bits = {"weight_bits": 7 if reduce else 8} if precision == "int8-dynamic" else {}
    assert m.derived_from == {"backend": "onnx", "precision": "fp32", "path": str(parent.resolve()), **bits}
    v = m.validation
    tol = get_precision(precision).tolerance
    cosines = [c["cosine"] for c in v.checks]
    assert v.passed and cosines and min(cosines) >= tol.min_cosine
    assert all(
        c["agreement_with_near_ties"] >= tol.min_agreement and c["agreement_with_near_ties"] >= c["agreement"]
        for c in v.checks
        if c["agreement"] is not None
    )
    # Not a copy of the parent: the graph really changed, and shrank.
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    ops = {n.op_type for n in graph.node}
    if precision == "int8-dynamic":
        assert {"DynamicQuantizeLinear", "MatMulInteger"} & ops or "DynamicQuantizeMatMul" in ops, ops
        assert _weight_bytes(out) <= 0.3 * _weight_bytes(parent)  # int8 MatMul weights; embeddings stay fp32
    else:
        assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in graph.initializer)
        assert graph.input[0].type.tensor_type.elem_type != onnx.TensorProto.FLOAT16  # fp32 I/O kept
        assert _weight_bytes(out) <= 0.51 * _weight_bytes(parent)
    assert validate_directory(out).passed  # re-checked from the directory alone
    assert main(["validate", str(out)]) == 0


def test_quantized_artifacts_are_not_quantized_again(exported, tmp_path: Path, capsys) -> None:
    parent = exported("bridgetower-tiny", "itm")
    first = tmp_path / "int8"
    assert main(["quantize", str(parent), "-o", str(first), "--precision", "int8-dynamic"]) == 0
    capsys.readouterr()
    again = tmp_path / "again"
    assert main(["quantize", str(first), "-o", str(again), "--precision", "fp16"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "int8-dynamic" in err and "fp32" in err and "Traceback" not in err
    assert not again.exists()


def test_unknown_precision_for_a_backend_writes_nothing(exported, tmp_path: Path, capsys) -> None:
    out = tmp_path / "x"
    assert (
        main(["quantize", str(exported("bridgetower-tiny", "itm")), "-o", str(out), "--precision", "bf16"])
        == 2
    )
    assert "onnx backend builds" in " ".join(capsys.readouterr().err.split()) and not out.exists()


def test_flan_t5_refuses_fp16_and_names_bf16(exported, tmp_path: Path, capsys) -> None:
    out = tmp_path / "t5-fp16"
    assert (
        main(
            [
                "quantize",
                str(exported("blip2-flan-t5-tiny", "generate")),
                "-o",
                str(out),
                "--precision",
                "fp16",
            ]
        )
        == 2
    )
    err = " ".join(capsys.readouterr().err.split())
    assert "bf16" in err and "Flan-T5" in err and not out.exists()


def test_int8_caption_generation_agrees_with_fp32(exported, tmp_path: Path) -> None:
    out = tmp_path / "cap-int8"
    assert (
        main(
            ["quantize", str(exported("blip-tiny", "caption")), "-o", str(out), "--precision", "int8-dynamic"]
        )
        == 0
    )
    g = Manifest.read(out).validation.generation
    tol = get_precision("int8-dynamic").tolerance
    assert g["new_tokens_compared"] > 0
    report = json.loads((out / "manifest.json").read_text())["validation"]
    greedy = [c for c in report["checks"] if c["output"] == "tokens" and "greedy" in c["shape"]]
    acc = report["accuracy"]["generation"]
    # The accuracy report's share counts a divergence at a near-tie as agreeing; recount it from the checks.
    share = np.mean([c["kind"] == "ok" or c["near_tie"] for c in greedy])
    assert acc["agreement_with_near_ties"] == pytest.approx(share) and share >= tol.min_agreement
    assert acc["min_logit_cosine"] >= tol.min_cosine


def test_fp16_decoder_whose_cache_outputs_are_read_inside_loads_and_generates(
    exported, tmp_path: Path
) -> None:
    # BLIP-2 OPT's decoder emits present.*.key and reads it again for attention: with keep_io_types the
    # converter cast that output back to fp32 under its name while typing its inner readers fp16, and the
    # graph failed to load ("Type (tensor(float16)) ... does not match expected type (tensor(float))")
    import onnxruntime as ort

    from vlexport.quantize.onnx_fp16 import outputs_read_inside

    parent = exported("blip2-opt-tiny", "generate")
    assert outputs_read_inside(onnx.load(str(parent / "decoder.onnx")))  # the shape that broke it
    out = tmp_path / "fp16"
    assert main(["quantize", str(parent), "-o", str(out), "--precision", "fp16"]) == 0
    m = Manifest.read(out)
    g = m.validation.accuracy.generation
    assert m.validation.passed and g["min_logit_cosine"] > 0.999 and g["greedy_token_agreement"] == 1.0
    half = onnx.load(str(out / "decoder.onnx"))
    assert not outputs_read_inside(half)  # every output is read by no node but its Identity
    assert {o.type.tensor_type.elem_type for o in half.graph.output} == {onnx.TensorProto.FLOAT}
    ort.InferenceSession(str(out / "decoder.onnx"), providers=["CPUExecutionProvider"])


def test_onnx_precision_flag_exports_then_quantizes(tmp_path: Path) -> None:
    out = tmp_path / "int8"  # altclip-tiny: the fastest export; the flag's path is what is checked
    assert (
        main(["onnx", "altclip-tiny", "--random-weights", "--precision", "int8-dynamic", "-o", str(out)]) == 0
    )
    m = Manifest.read(out)
    assert m.precision == "int8-dynamic" and m.derived_from["path"] is None  # the fp32 parent was scratch
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    shutil.rmtree(out)


def test_argmax_agreement_counts_near_tie_flips_only() -> None:
    """A flipped argmax where the reference's top-2 gap is within twice the variant's typical error counts as
    agreeing; a flip over a clear margin fails, though the flip itself makes that row's error large."""
    from vlexport.contracts.precision import Tolerance
    from vlexport.validate.outputs import compare_output, noise_level

    tol = Tolerance(min_cosine=-1.0, min_agreement=0.9)
    ref = np.array([[0.50, 0.51], [2.0, -1.0], [1.0, 0.0], [0.0, 1.0]], dtype=np.float32)  # row 0: gap 0.01
    noise = [[0.02, 0.0], [0.0, 0.01], [0.01, 0.0], [0.0, 0.02]]
    tie_flip = ref + np.array(noise, dtype=np.float32)  # row 0 flips by 0.02 of error, like the others have
    assert noise_level([(ref, tie_flip)]) == pytest.approx(0.015, abs=1e-6)
    c = compare_output("logits", "b4", tie_flip, ref, tol, "argmax", noise_level([(ref, tie_flip)]))
    assert c.passed and c.agreement == 0.75 and c.agreement_with_near_ties == 1.0
    clear_flip = tie_flip.copy()
    clear_flip[1] = [-1.0, 2.0]  # a 3.0 gap swapped: not noise
    c = compare_output("logits", "b4", clear_flip, ref, tol, "argmax", noise_level([(ref, clear_flip)]))
    assert (
        not c.passed and c.kind == "agreement" and c.agreement == 0.5 and c.agreement_with_near_ties == 0.75
    )
    c = compare_output("logits", "b4", tie_flip, ref, tol, "argmax")  # no noise level given: strict
    assert not c.passed and c.agreement_with_near_ties == 0.75
