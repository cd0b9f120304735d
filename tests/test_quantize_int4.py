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
from vlexport.contracts.manifest import Manifest
from vlexport.contracts.precision import Int4WeightConfig, Int8WeightConfig, get_precision
from vlexport.errors import UsageError
from vlexport.quantize.matmul_nbits import linear_weight


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


@pytest.mark.parametrize(("preset", "block"), [("blip2-opt-tiny", None), ("blip-tiny", "64")])
def test_int4_weight_generation_validates_against_hf_generate(
    exported, tmp_path: Path, capsys, preset: str, block: str | None
) -> None:
    parent = exported(preset, "generate" if preset.startswith("blip2") else "caption")
    out = tmp_path / "w4"
    extra = ["--block-size", block] if block else []
    assert main(["quantize", str(parent), "-o", str(out), "--precision", "int4-weight", *extra]) == 0
    assert "accuracy vs eager fp32 (int4-weight): passed" in capsys.readouterr().out
    m = Manifest.read(out)
    want = int(block) if block else 32
    assert m.precision_config == Int4WeightConfig(block_size=want)
    nbits = _nbits(out)
    assert nbits and all(a["bits"] == 4 and a["block_size"] == want for a in nbits)
    # every linear of every component (vision tower, Q-Former, decoder steps: OPT's FFN Gemms, the tied
    # lm_head) is 4-bit
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


def _tied_graph(path: Path, hidden: int = 64, vocab: int = 96) -> dict[str, np.ndarray]:
    """A token table used twice (embedding Gather and the lm_head's MatMul on its Transpose, as OPT), a
    position table, one linear between them; saved with external data."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = {
        "E": rng.standard_normal((vocab, hidden)).astype(np.float32),
        "P": rng.standard_normal((16, hidden)).astype(np.float32) * 0.1,
        "W": rng.standard_normal((hidden, hidden)).astype(np.float32) * hidden**-0.5,
    }
    nodes = [
        helper.make_node("Gather", ["E", "ids"], ["tok"], name="embed"),
        helper.make_node("Gather", ["P", "pos"], ["at"], name="positions"),
        helper.make_node("Add", ["tok", "at"], ["h0"]),
        helper.make_node("MatMul", ["h0", "W"], ["h1"], name="linear"),
        helper.make_node("Transpose", ["E"], ["Et"], perm=[1, 0]),
        helper.make_node("MatMul", ["h1", "Et"], ["logits"], name="head"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [
            helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", "s"]),
            helper.make_tensor_value_info("pos", TensorProto.INT64, ["b", "s"]),
        ],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", "s", vocab]),
            helper.make_tensor_value_info("h0", TensorProto.FLOAT, ["b", "s", hidden]),
        ],
        [numpy_helper.from_array(v, k) for k, v in w.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.save(model, str(path), save_as_external_data=True, location=f"{path.name}.data", size_threshold=0)
    return w


@pytest.mark.parametrize("config", [Int8WeightConfig(), Int4WeightConfig()], ids=["int8", "int4"])
def test_quantized_embeddings_share_the_tied_table(tmp_path: Path, config) -> None:
    import dataclasses

    import onnxruntime as ort

    from vlexport.quantize.matmul_nbits import weight_only_nbits

    for d in ("src", "plain", "emb"):
        (tmp_path / d).mkdir()
    src, plain, emb = (tmp_path / d / "m.onnx" for d in ("src", "plain", "emb"))
    w = _tied_graph(src)
    assert weight_only_nbits(src, plain, config, external=True) == {"MatMulNBits": 2}
    with_tables = dataclasses.replace(config, quantize_embeddings=True)
    assert weight_only_nbits(src, emb, with_tables, external=True) == {
        "MatMulNBits": 2,
        "GatherBlockQuantized": 2,
    }
    graph = onnx.load(str(emb), load_external_data=False).graph
    names = {t.name for t in graph.initializer}
    assert names.isdisjoint({"E", "P", "W"})  # no fp32 table is left
    by_op = {n.op_type: n for n in graph.node}
    head = next(
        n for n in graph.node if n.op_type == "MatMulNBits" and n.name == "head_Q" + str(config.weight_bits)
    )
    gathers = [n for n in graph.node if n.op_type == "GatherBlockQuantized"]
    producer = {o: n for n in graph.node for o in n.output}
    tok = next(n for n in gathers if n.input[1] == "ids")
    # one quantized table: the embedding reads the lm_head's bytes (through a Reshape), scales and zero points
    assert producer[tok.input[0]].op_type == "Reshape" and producer[tok.input[0]].input[0] == head.input[1]
    assert list(tok.input[2:]) == list(head.input[2:])
    assert "Transpose" not in by_op and "Gather" not in by_op

    rng = np.random.default_rng(1)
    feeds = {"ids": rng.integers(0, 96, (2, 5)), "pos": np.tile(np.arange(5), (2, 1))}
    run = lambda p: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, feeds)
    (lo, h0), (plain_lo, plain_h0), (ref_lo, ref_h0) = run(emb), run(plain), run(src)
    assert np.array_equal(plain_h0, ref_h0) and not np.array_equal(h0, ref_h0)  # only the variant's tables
    want = w["E"][feeds["ids"]] + w["P"][feeds["pos"]]
    assert np.array_equal(ref_h0, want)
    tol = config.tolerance.min_cosine
    assert _cosine(h0, want) >= tol and _cosine(lo, ref_lo) >= tol and _cosine(plain_lo, ref_lo) >= tol
    # the data file lost the fp32 token table (24 KiB) and stores its quantized bytes once, for both users
    plain_bytes, emb_bytes = ((p.parent / "m.onnx.data").stat().st_size for p in (plain, emb))
    assert emb_bytes < plain_bytes - 96 * 64 * 4 * 0.5


def test_quantized_embeddings_on_a_tiny_generative_preset(exported, tmp_path: Path, capsys) -> None:
    parent = exported("blip2-opt-tiny", "generate")
    plain, emb = tmp_path / "plain", tmp_path / "emb"
    assert main(["quantize", str(parent), "-o", str(plain), "--precision", "int8-weight"]) == 0
    argv = ["quantize", str(parent), "-o", str(emb), "--precision", "int8-weight", "--quantize-embeddings"]
    assert main(argv) == 0  # validated against HF generate() on eager fp32 with int8-weight's thresholds
    assert "accuracy vs eager fp32 (int8-weight): passed" in capsys.readouterr().out
    m = Manifest.read(emb)
    assert m.precision_knobs["quantize_embeddings"] is True and m.precision_config.quantize_embeddings
    assert m.derived_from["gather_block_quantized"] == {"image_encoder": 0, "decoder": 2}  # tokens, positions
    g, tol = m.validation.accuracy.generation, get_precision("int8-weight").tolerance
    assert g["min_logit_cosine"] >= tol.min_cosine and g["agreement_with_near_ties"] >= tol.min_agreement
    graph = onnx.load(str(emb / m.components["decoder"].file), load_external_data=False).graph
    assert not [n for n in graph.node if n.op_type == "Gather" and n.input[0] == "module.lm_head.weight"]
    size = {d: Manifest.read(d).components["decoder"].size_bytes for d in (parent, plain, emb)}
    assert size[emb] < size[plain] < size[parent]
    # the token table (1024 x 64 fp32, 256 KiB) is stored once, quantized, shared with the tied lm_head
    assert size[plain] - size[emb] > 0.7 * 1024 * 64 * 4
    # refused for precisions without the knob, before any work
    out = tmp_path / "fp16"
    assert (
        main(["quantize", str(parent), "-o", str(out), "--precision", "fp16", "--quantize-embeddings"]) == 2
    )
    err = " ".join(capsys.readouterr().err.split())
    assert (
        "--quantize-embeddings applies to --precision int8-weight or int4-weight" in err and not out.exists()
    )


def test_per_component_precision(exported, tmp_path: Path, capsys) -> None:
    import hashlib

    parent = exported("blip2-opt-tiny", "generate")
    out = tmp_path / "mixed"
    argv = ["quantize", str(parent), "-o", str(out), "--components", "decoder=int4-weight,image_encoder=fp32"]
    assert main(argv) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert "onnx int4-weight (image_encoder fp32, decoder int4-weight)" in printed
    m = Manifest.read(out)
    assert m.component_precisions == {"image_encoder": "fp32", "decoder": "int4-weight"}
    assert m.precision == "int4-weight" and m.precision_config == Int4WeightConfig()  # the loosest judges
    assert m.derived_from["int4-weight"]["components"] == ["decoder"]
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()
    image = m.components["image_encoder"].file
    assert digest(out / image) == digest(parent / image)  # the fp32 component is the parent's, unchanged
    assert not [a for a in _nbits(out) if a["bits"] != 4] and _nbits(out)
    graph = onnx.load(str(out / image), load_external_data=False).graph
    assert "MatMulNBits" not in {n.op_type for n in graph.node}
    g, tol = m.validation.accuracy.generation, get_precision("int4-weight").tolerance
    assert m.validation.passed and g["min_logit_cosine"] >= tol.min_cosine
    assert main(["validate", str(out)]) == 0  # from the directory: the recorded mapping and thresholds
    capsys.readouterr()

    # a second reduced precision on another component, a knob reaching only the precision that takes it
    both = tmp_path / "both"
    argv = ["quantize", str(parent), "-o", str(both), "--components", "image_encoder=int8-weight"]
    assert main([*argv, "--precision", "int4-weight", "--block-size", "64"]) == 0
    m = Manifest.read(both)
    assert m.component_precisions == {"image_encoder": "int8-weight", "decoder": "int4-weight"}
    assert {a["bits"] for a in _nbits(both)} == {8, 4} and {a["block_size"] for a in _nbits(both)} == {64}
    capsys.readouterr()

    for extra, message in [
        (["--components", "text_decoder=int4-weight"], "which this artifact does not have"),
        (["--components", "decoder=fp32"], "leaves every component fp32"),
        (["--components", "decoder"], "COMPONENT=PRECISION pairs"),
        (["--components", "decoder=int4-weight", "--method", "entropy"], "--method applies to"),
        ([], "Name the variant"),
    ]:
        bad = tmp_path / "bad"
        assert main(["quantize", str(parent), "-o", str(bad), *extra]) == 2
        err = " ".join(capsys.readouterr().err.split())
        assert message in err and "Traceback" not in err and not bad.exists(), (extra, err)


def test_per_component_precision_from_python(exported, tmp_path: Path) -> None:
    import vlexport

    parent = exported("blip-tiny", "caption")
    m = vlexport.quantize(
        parent, out=tmp_path / "mixed", components={"decoder": "int4-weight"}, quantize_embeddings=True
    )
    assert m.component_precisions == {"vision_encoder": "fp32", "decoder": "int4-weight"}
    assert m.precision_knobs["quantize_embeddings"] is True and m.validation.passed
    assert m.derived_from["int4-weight"]["gather_block_quantized"]["decoder"] > 0
    with pytest.raises(UsageError, match="--smooth applies to --precision int8-dynamic"):
        vlexport.quantize(parent, out=tmp_path / "bad", components={"decoder": "int4-weight"}, smooth=0.7)
    with pytest.raises(UsageError, match="Name the variant"):
        vlexport.quantize(parent, out=tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
