"""ONNX Runtime's fused ops in exported graphs (export/ort_fusions.py): the fused decoder step computes what
the exported one does, its cross-attention reads the cached keys/values without a transpose, and the
weight-only variants carry the fusions (their manifest says which)."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest

from vlexport.cli import main
from vlexport.contracts.manifest import Manifest
from vlexport.export.ort_fusions import fuse_for_ort

DIMS = {"batch": 2, "sequence": 1, "past_sequence": 5, "encoder_sequence": 7}


def _feeds(component, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Seeded inputs of a decoder step at DIMS; row 0 of every mask left-padded by two positions."""
    feeds = {}
    for t in component.inputs:
        shape = [d if isinstance(d, int) else DIMS.get(d, DIMS["past_sequence"] + 1) for d in t.shape]
        if t.dtype == "float32":
            feeds[t.name] = rng.standard_normal(shape).astype(np.float32)
        elif t.name == "image_mask":  # BLIP-2 OPT: which positions take the image's query embeddings
            feeds[t.name] = np.zeros(shape, bool)
        elif "mask" in t.name:
            mask = np.ones(shape, np.int64)
            mask[0, :2] = 0
            feeds[t.name] = mask
        elif t.name == "position_ids":
            feeds[t.name] = np.full(shape, DIMS["past_sequence"], np.int64)
        else:
            feeds[t.name] = rng.integers(3, 50, shape).astype(np.int64)
    return feeds


@pytest.mark.parametrize(
    ("preset", "task", "cross"),
    [
        ("blip2-flan-t5-tiny", "generate", True),
        ("blip-tiny", "caption", True),
        ("blip2-opt-tiny", "generate", False),
    ],
)
def test_fused_decoder_step_matches_the_exported_one(exported, tmp_path: Path, preset, task, cross) -> None:
    import onnxruntime as ort

    parent = exported(preset, task)
    comp = Manifest.read(parent).components["decoder"]
    fused = tmp_path / comp.file
    shutil.copy2(parent / comp.file, fused)
    counts = fuse_for_ort(fused, external=False, decode_step=True)

    layers = sum(1 for t in comp.inputs if t.name.endswith(".key") and ".encoder." not in t.name)
    assert counts["MultiHeadAttention"] == layers * (2 if cross else 1)
    graph = onnx.load(str(fused)).graph
    before = onnx.load(str(parent / comp.file)).graph
    assert len(graph.node) < 0.7 * len(before.node)
    # the cross-attention takes the cached keys/values as they are fed: no Transpose reads them
    cached = {t.name for t in comp.inputs if ".encoder." in t.name}
    readers = Counter(n.op_type for n in graph.node for i in n.input if i in cached)
    assert readers["MultiHeadAttention"] == len(cached) and not readers.keys() & {"Transpose", "Reshape"}
    # a decode step's attention runs q.K^T at alpha 1: the scale is a Mul on the query, where there is one
    attention = [n for n in graph.node if n.op_type == "MultiHeadAttention"]
    assert all(a.f == 1.0 for n in attention for a in n.attribute if a.name == "scale")
    assert all(any(a.name == "scale" for a in n.attribute) for n in attention)

    feeds = _feeds(comp, np.random.default_rng(0))
    run = lambda p: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, feeds)
    names = [
        o.name for o in ort.InferenceSession(str(fused), providers=["CPUExecutionProvider"]).get_outputs()
    ]
    assert names == [t.name for t in comp.outputs]
    for name, want, got in zip(names, run(parent / comp.file), run(fused), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=name)


def test_weight_only_variants_carry_the_fusions(exported, tmp_path: Path, capsys) -> None:
    parent = exported("blip2-flan-t5-tiny", "generate")
    out = tmp_path / "mixed"
    mix = "decoder=int4-weight,encoder=int8-weight"  # the image encoder stays the parent's fp32
    argv = ["quantize", str(parent), "-o", str(out), "--components", mix]
    assert main(argv) == 0
    assert "accuracy vs eager fp32 (int4-weight): passed" in capsys.readouterr().out
    m = Manifest.read(out)
    # the fp32 component is the parent's (TensorRT still parses it); the quantized ones are fused
    assert set(m.fused_ops) == {"encoder", "decoder"}
    for name, counts in m.fused_ops.items():
        graph = onnx.load(str(out / m.components[name].file), load_external_data=False).graph
        ops = Counter(n.op_type for n in graph.node)
        assert counts == {op: ops[op] for op in counts} and counts["MultiHeadAttention"] > 0
    image = onnx.load(str(out / m.components["image_encoder"].file), load_external_data=False).graph
    assert not {n.domain for n in image.node} & {"com.microsoft"}


def test_optimized_generative_export_validates_with_fused_attention(tmp_path: Path, capsys) -> None:
    out = tmp_path / "opt"
    argv = ["onnx", "blip-tiny", "--task", "caption", "--random-weights", "--optimize", "-o", str(out)]
    assert main(argv) == 0
    assert "tokens equal HF generate()" in " ".join(capsys.readouterr().out.split())
    m = Manifest.read(out)
    assert m.backend == "onnx-opt" and m.validation.passed
    decoder = onnx.load(str(out / m.components["decoder"].file), load_external_data=False).graph
    attention = [n for n in decoder.node if n.op_type == "MultiHeadAttention"]
    assert m.fused_ops["decoder"]["MultiHeadAttention"] == len(attention) > 0
    # the decoder's query carries the scale; the vision encoder's many query rows keep it inside
    assert all(a.f == 1.0 for n in attention for a in n.attribute if a.name == "scale")
    vision = onnx.load(str(out / m.components["vision_encoder"].file), load_external_data=False).graph
    assert m.fused_ops["vision_encoder"]["MultiHeadAttention"] > 0
    assert not [
        a for n in vision.node if n.op_type == "MultiHeadAttention" for a in n.attribute if a.name == "scale"
    ]


def test_fusing_an_external_data_graph_keeps_its_weights_file(exported, tmp_path: Path) -> None:
    """A multi-GB decoder is not written twice: the fused graph refers to the weights where they lie."""
    import onnxruntime as ort

    parent = exported("blip2-flan-t5-tiny", "generate")
    comp = Manifest.read(parent).components["decoder"]
    graph = tmp_path / "decoder.onnx"
    onnx.save_model(
        onnx.load(str(parent / comp.file)), graph, save_as_external_data=True, location="decoder.onnx.data"
    )
    data = tmp_path / "decoder.onnx.data"
    weights, inode, mode = data.read_bytes(), data.stat().st_ino, graph.stat().st_mode
    counts = fuse_for_ort(graph, external=True, decode_step=True)
    assert counts["MultiHeadAttention"] > 0 and graph.stat().st_mode == mode
    # the same file, appended to at most, never rewritten
    assert data.stat().st_ino == inode and data.read_bytes().startswith(weights)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["decoder.onnx", "decoder.onnx.data"]

    feeds = _feeds(comp, np.random.default_rng(1))
    want = ort.InferenceSession(str(parent / comp.file), providers=["CPUExecutionProvider"]).run(None, feeds)
    got = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"]).run(None, feeds)
    for w, g in zip(want, got, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)
