"""int4-weight: 4-bit MatMulNBits through the streaming weight-only writer, judged against eager fp32.

The variant is validated by the orchestrator with the config's tolerance (contracts/precision.py); these tests
check that the graph really holds 4-bit weights everywhere the int8 pass puts 8-bit ones, that its outputs are
recomputed independently against eager PyTorch, and that the config round-trips through the manifest.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from vlexport.cli import main
from vlexport.contracts.precision import Int4WeightConfig, Int8WeightConfig, get_precision
from vlexport.manifest import Manifest
from vlexport.quantize.onnx_weight_only import linear_weight


def _nbits(directory: Path) -> list[dict[str, int]]:
    """The attributes of every MatMulNBits in every component."""
    found = []
    for comp in Manifest.read(directory).components.values():
        graph = onnx.load(str(directory / comp.file), load_external_data=False).graph
        for n in graph.node:
            if n.op_type == "MatMulNBits":
                found.append({a.name: a.i for a in n.attribute})
    return found


def _left_fp32(directory: Path) -> list[str]:
    """Constant-weight MatMul / Gemm / tied-head forms the pass should have rewritten and did not."""
    left = []
    for comp in Manifest.read(directory).components.values():
        graph = onnx.load(str(directory / comp.file), load_external_data=False).graph
        inits = {t.name: t for t in graph.initializer}
        producer = {o: n for n in graph.node for o in n.output}
        left += [n.name for n in graph.node if linear_weight(n, inits, producer) is not None]
    return left


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_int4_weight_encoder_matches_eager_within_its_tolerance(exported, tmp_path: Path, capsys) -> None:
    import onnxruntime as ort

    from vlexport.validate.outputs import output_references
    from vlexport.weights import load_model, source_from_manifest

    parent = exported("bridgetower-tiny", "itm")
    out = tmp_path / "w4"
    assert main(["quantize", str(parent), "-o", str(out), "--precision", "int4-weight"]) == 0
    assert "accuracy vs eager fp32 (int4-weight): passed" in capsys.readouterr().out
    m = Manifest.read(out)
    config = Int4WeightConfig()
    # manifest round trip: the name and every knob, read back as the same config
    assert m.precision == "int4-weight" and m.precision_knobs == config.knobs()
    assert m.precision_config == config and m.precision_knobs["accuracy_level"] == config.accuracy_level
    assert m.derived_from["bits"] == 4 and m.derived_from["block_size"] == 32
    nbits = _nbits(out)
    assert nbits and all(a["bits"] == 4 and a["block_size"] == 32 for a in nbits)
    assert all(a["accuracy_level"] == config.accuracy_level for a in nbits)
    assert m.derived_from["matmul_nbits"]["model"] == len(nbits) and not _left_fp32(out)

    # Recomputed here, not read from the report: eager fp32 on other inputs than validation's vs the artifact
    # in ONNX Runtime.
    source = source_from_manifest(Manifest.read(parent), parent)
    task = source.family.task("itm")
    refs = output_references(load_model(source, "itm"), task, seed=99)
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    declared = {i.name for i in session.get_inputs()}
    tol = get_precision("int4-weight").tolerance
    for x, want in zip(refs.inputs, refs.outputs):
        got = session.run(["logits"], {k: v for k, v in x.items() if k in declared})[0]
        assert tol.min_cosine <= _cosine(got, want["logits"]) < 0.99999  # close, and really quantized
    assert m.validation.accuracy.outputs["logits"]["cosine"] >= tol.min_cosine
    # half the bytes of int8-weight's blocks: smaller than the int8 variant of the same parent
    w8 = tmp_path / "w8"
    assert main(["quantize", str(parent), "-o", str(w8), "--precision", "int8-weight"]) == 0
    assert m.components["model"].size_bytes < Manifest.read(w8).components["model"].size_bytes
    capsys.readouterr()
    assert main(["validate", str(out)]) == 0  # re-judged from the directory with the recorded config


def test_int4_weight_generation_validates_against_hf_generate(exported, tmp_path: Path, capsys) -> None:
    parent = exported("blip2-opt-tiny", "generate")
    out = tmp_path / "w4"
    assert (
        main(["quantize", str(parent), "-o", str(out), "--precision", "int4-weight", "--block-size", "16"])
        == 0
    )
    assert "accuracy vs eager fp32 (int4-weight): passed" in capsys.readouterr().out
    m = Manifest.read(out)
    assert m.precision_config == Int4WeightConfig(block_size=16)
    nbits = _nbits(out)
    assert nbits and all(a["bits"] == 4 and a["block_size"] == 16 for a in nbits)
    # every linear of the vision tower, the Q-Former and the OPT decoder (FFN Gemms, tied lm_head) is 4-bit
    assert not _left_fp32(out)
    g, tol = m.validation.accuracy.generation, get_precision("int4-weight").tolerance
    assert g["greedy_samples"] > 0 and g["min_logit_cosine"] >= tol.min_cosine
    assert g["agreement_with_near_ties"] >= tol.min_agreement
    # the report is derived from the per-sample checks: recount the greedy share
    greedy = [c for c in m.validation.checks if c["output"] == "tokens" and "greedy" in c["shape"]]
    assert g["greedy_token_agreement"] == pytest.approx(np.mean([c["kind"] == "ok" for c in greedy]))
    assert sum(c.size_bytes for c in m.components.values()) < sum(
        c.size_bytes for c in Manifest.read(parent).components.values()
    )


def test_int4_weight_is_listed_and_its_knobs_are_checked(exported, tmp_path: Path, capsys) -> None:
    assert main(["list", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    entry = data["precisions"]["int4-weight"]
    assert entry["weight_bits"] == 4 and "onnx" in entry["backends"]
    assert "int4-weight" in {b["name"]: b for b in data["backends"]}["onnx"]["precisions"]
    parent = exported("bridgetower-tiny", "itm")
    for bad in ("48", "512", "8"):
        out = tmp_path / f"b{bad}"
        argv = ["quantize", str(parent), "-o", str(out), "--precision", "int4-weight", "--block-size", bad]
        assert main(argv) == 2
        err = " ".join(capsys.readouterr().err.split())
        assert "block_size must be a power of two from 16 to 256" in err and "Traceback" not in err
        assert not out.exists()


def test_compile_int4_weight_needs_torchao(tmp_path: Path, capsys) -> None:
    if importlib.util.find_spec("torchao") is not None:
        pytest.skip("torchao is installed: the compile path is exercised by the compile tests")
    out = tmp_path / "c"
    argv = ["compile", "bridgetower-tiny", "--task", "itm", "--random-weights", "-o", str(out)]
    assert main([*argv, "--precision", "int4-weight"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "--precision int4-weight" in err and "pip install torchao" in err and not out.exists()


def test_weight_only_configs_share_knobs_not_widths() -> None:
    assert Int4WeightConfig.weight_bits == 4 and Int8WeightConfig.weight_bits == 8
    assert Int4WeightConfig().weight_bytes == 0.5 and Int4WeightConfig().quantizes_weights
    assert get_precision("int4-weight") == Int4WeightConfig() != Int8WeightConfig()
