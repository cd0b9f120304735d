"""Fault injection: every file a user hands us, damaged or of the wrong shape, through the public entry
points.

Each case must end in one paragraph that names the file and what is wrong, with exit 1 (a damaged artifact or
bench file: CheckError) or 2 (a bad input of the user's: UsageError), and never a traceback or a model load.
Artifacts come from the shared ``exported`` fixture and are copied before they are damaged.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cli_helpers import cli

from vlexport.bench.rows import BenchRow, fill_speedups, read_rows, write_rows

EXPORT_AGAIN = re.compile(r"export (it|the artifact) again", re.IGNORECASE)


def no_model_loads(monkeypatch) -> None:
    """From here on, loading a model fails the test: every check must come before any minutes of work."""

    def boom(*a: Any, **k: Any) -> None:
        raise AssertionError("a model was loaded before the bad input was refused")

    import vlexport.pipeline

    monkeypatch.setattr("vlexport.weights.load_model", boom)
    monkeypatch.setattr(vlexport.pipeline, "load_model", boom)


def copy_artifact(exported, tmp_path: Path, preset: str, task: str) -> Path:
    out = tmp_path / "artifact"
    shutil.copytree(exported(preset, task), out)  # never damage the shared one
    return out


def image(path: Path, size: int = 64, fmt: str = "PNG") -> Path:
    from PIL import Image

    noise = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(noise).save(path, format=fmt)
    return path


def png_header(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width x height`` pixels (no pixel data: a decompression bomb's
    shape)."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        + chunk(b"IEND", b"")
    )


# ---------------------------------------------------------------- manifest.json
def _set(path: str, value: Any) -> Callable[[dict], Any]:
    """A damage: set ``path`` (dot-separated keys / list indices) of the manifest to ``value``."""

    def damage(m: dict) -> dict:
        *parents, last = path.split(".")
        node = m
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        node[int(last) if isinstance(node, list) else last] = value
        return m

    return damage


def _drop(path: str) -> Callable[[dict], Any]:
    def damage(m: dict) -> dict:
        *parents, last = path.split(".")
        node = m
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        del node[last]
        return m

    return damage


MANIFEST_CASES = {
    "manifest-a-list": (lambda m: [m], "holds a list, not a manifest object"),
    "manifest-a-string": (lambda m: "manifest", "holds a string"),
    "components-a-list": (_set("components", [1, 2]), "manifest.components must be an object, got a list"),
    "component-a-string": (_set("components.model", "model.onnx"), "components['model'] must be an object"),
    "component-missing-inputs": (_drop("components.model.inputs"), "components['model'] has no 'inputs'"),
    "inputs-not-a-list": (
        _set("components.model.inputs", {"a": 1}),
        "components['model'].inputs must be a list",
    ),
    "tensor-spec-missing-dtype": (
        _drop("components.model.inputs.0.dtype"),
        "components['model'].inputs[0] has no 'dtype'",
    ),
    "shape-holds-a-float": (
        _set("components.model.inputs.0.shape.0", 1.5),
        "components['model'].inputs[0].shape[0] must be an integer or a string",
    ),
    "validation-a-number": (
        _set("validation", 5),
        "manifest.validation must be an object or null, got a number",
    ),
    "validation-failures-not-objects": (
        _set("validation.failures", [5]),
        "validation.failures[0] must be an object",
    ),
    "missing-family": (_drop("family"), "manifest has no 'family'"),
    "size-a-string": (_set("components.model.size_bytes", "3 MB"), "size_bytes must be an integer"),
    "files-a-string": (_set("files", "config.json"), "manifest.files must be a list of strings"),
}


@pytest.mark.parametrize("case", sorted(MANIFEST_CASES))
def test_malformed_manifest(case: str, exported, tmp_path: Path, capsys, monkeypatch) -> None:
    damage, message = MANIFEST_CASES[case]
    art = copy_artifact(exported, tmp_path, "bridgetower-tiny", "itm")
    path = art / "manifest.json"
    path.write_text(json.dumps(damage(json.loads(path.read_text()))))
    no_model_loads(monkeypatch)
    code, err = cli(capsys, "validate", art)
    assert code == 1 and str(path) in err and message in err and "export it again" in err, err


def test_manifest_not_utf8(exported, tmp_path: Path, capsys, monkeypatch) -> None:
    art = copy_artifact(exported, tmp_path, "bridgetower-tiny", "itm")
    (art / "manifest.json").write_bytes(b"\xff\xfe\x00garbage")
    no_model_loads(monkeypatch)
    code, err = cli(capsys, "validate", art)
    assert code == 1 and str(art / "manifest.json") in err and "not UTF-8" in err and "export it again" in err


def test_manifest_naming_a_file_outside_the_artifact(exported, tmp_path: Path, capsys, monkeypatch) -> None:
    art = copy_artifact(exported, tmp_path, "bridgetower-tiny", "itm")
    shutil.copy(art / "model.onnx", tmp_path / "elsewhere.onnx")  # a real file of the right size, elsewhere
    path = art / "manifest.json"
    path.write_text(
        json.dumps(_set("components.model.file", "../elsewhere.onnx")(json.loads(path.read_text())))
    )
    no_model_loads(monkeypatch)
    code, err = cli(capsys, "validate", art)
    assert code == 1 and "outside the artifact directory" in err and "../elsewhere.onnx" in err


# ---------------------------------------------------------------- bench JSON (vlexport regress)
def _rows() -> list[dict]:
    rows = [
        BenchRow(
            model="m",
            task="itm",
            backend=b,
            precision="fp32",
            batch=1,
            seq_len=16,
            image_size=64,
            device="cpu",
            latency_p50_ms=p,
        )
        for b, p in (("eager", 10.0), ("onnx", 5.0))
    ]
    fill_speedups(rows)
    return [r.__dict__.copy() for r in rows]


def _doc(rows: Any) -> dict:
    return {"schema": "vlexport-bench/1", "rows": rows}


BENCH_CASES = {
    "file-a-list": ([_rows()], "holds a list, not a vlexport bench file"),
    "file-a-number": (5, "holds a number (5)"),
    "rows-not-a-list": (_doc(5), "rows must be a list of row objects, got a number (5)"),
    "rows-an-object": (_doc({"0": _rows()[0]}), "rows must be a list of row objects, got an object"),
    "row-a-string": (_doc(["eager"]), "rows[0] must be an object, got a string"),
    "row-missing-model": (
        _doc([{k: v for k, v in _rows()[0].items() if k != "model"}]),
        "rows[0] has no 'model'",
    ),
    "row-string-latency": (
        _doc([_rows()[0], {**_rows()[1], "latency_p50_ms": "5.0"}]),
        "rows[1].latency_p50_ms must be a number or null, got a string ('5.0')",
    ),
    "row-float-batch": (_doc([{**_rows()[0], "batch": 1.5}]), "rows[0].batch must be an integer"),
    "row-parity-a-list": (_doc([{**_rows()[0], "parity": []}]), "rows[0].parity must be an object"),
    "row-speedup-a-bool": (
        _doc([_rows()[0], {**_rows()[1], "speedup_vs_eager": True}]),
        "rows[1].speedup_vs_eager must be a number or null, got a boolean",
    ),
}


@pytest.mark.parametrize("case", sorted(BENCH_CASES))
def test_malformed_bench_file(case: str, tmp_path: Path, capsys) -> None:
    doc, message = BENCH_CASES[case]
    base, cur = tmp_path / "base.json", tmp_path / "cur.json"
    base.write_text(json.dumps(_doc(_rows())))
    cur.write_text(json.dumps(doc))
    code, err = cli(capsys, "regress", base, cur)
    assert code == 1 and str(cur) in err and message in err, err


@pytest.mark.parametrize(
    ("case", "code", "message"),
    [
        ("directory", 2, "is a directory, not a bench JSON file"),
        ("not-utf8", 1, "is not a text file (not UTF-8)"),
    ],
)
def test_unreadable_bench_file(case: str, code: int, message: str, tmp_path: Path, capsys) -> None:
    base, cur = tmp_path / "base.json", tmp_path / "cur.json"
    base.write_text(json.dumps(_doc(_rows())))
    cur.mkdir() if case == "directory" else cur.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xff")
    rc, err = cli(capsys, "regress", base, cur)
    assert rc == code and str(cur) in err and message in err, err


def test_write_rows_is_whole_or_nothing(tmp_path: Path, monkeypatch) -> None:
    import os

    path = tmp_path / "rows.json"
    write_rows(path, [BenchRow(model="m", task="t", backend="eager", precision="fp32")])
    before = path.read_text()

    def crash(*a: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(Exception):  # noqa: B017  whichever error: the point is what is left on disk
        write_rows(path, [])
    assert path.read_text() == before and read_rows(path)[0][0].model == "m"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.json"]  # no partial file left behind


# ---------------------------------------------------------------- suites TOML (vlexport bench --suite)
CASE = '[[x]]\nmodels = ["bridgetower-tiny"]\nrandom_weights = true\nbatch_sizes = [1]\n'  # valid so far
SUITE_CASES = {
    "suite-a-table": ('[x]\nmodels = ["bridgetower-tiny"]\n', "must be a non-empty array of tables"),
    "suite-a-number": (
        "x = 5\n",
        "must be a non-empty array of tables, one [[x]] header per case; got a number",
    ),
    "suite-empty": ("x = []\n", "got an empty list"),
    "case-a-string": ('x = ["bridgetower-tiny"]\n', "case 1 is a string ('bridgetower-tiny'), not a table"),
    "models-a-string": ('[[x]]\nmodels = "bridgetower-tiny"\n', "case 1: models must be a list of strings"),
    "missing-models": ("[[x]]\niters = 2\n", "case 1 has no 'models'"),
    "iters-a-string": (CASE + 'iters = "20"\n', "case 1: iters must be an integer, got a string"),
    "iters-a-float": (CASE + "iters = 2.5\n", "case 1: iters must be an integer, got a number"),
    "random-weights-a-string": (
        '[[x]]\nmodels = ["bridgetower-tiny"]\nrandom_weights = "yes"\n',
        "case 1: random_weights must be a boolean",
    ),
    "batch-size-zero": (CASE.replace("[1]", "[1, 0]"), "case 1: batch_sizes[1] is 0, out of range: 1..4096"),
    "seed-out-of-range": (CASE + "seed = 99999999999\n", "case 1: seed is 99999999999, out of range"),
    "backends-a-number": (CASE + "backends = 3\n", "x' case 1: backends must be a list of strings"),
    "second-case-bad": (CASE + CASE + "warmup = -1\n", "case 2: warmup is -1, out of range"),
}


@pytest.mark.parametrize("case", sorted(SUITE_CASES))
def test_malformed_suite(case: str, tmp_path: Path, capsys, monkeypatch) -> None:
    body, message = SUITE_CASES[case]
    suites = tmp_path / "suites.toml"
    suites.write_text(body)
    no_model_loads(monkeypatch)
    code, err = cli(capsys, "bench", "--suite", "x", "--suite-file", suites, "--json", tmp_path / "o.json")
    assert code == 2 and str(suites) in err and message in err, err
    assert not (tmp_path / "o.json").exists()


@pytest.mark.parametrize("case", ["directory", "not-utf8"])
def test_unreadable_suite_file(case: str, tmp_path: Path, capsys, monkeypatch) -> None:
    suites = tmp_path / "suites.toml"
    suites.mkdir() if case == "directory" else suites.write_bytes(b'[[x]]\nmodels = ["\xff\xfe"]\n')
    no_model_loads(monkeypatch)
    code, err = cli(capsys, "bench", "--suite", "x", "--suite-file", suites)
    assert code == 2 and str(suites) in err
    assert ("is a directory" if case == "directory" else "not a UTF-8 text file") in err


# ---------------------------------------------------------------- images (vlexport run --image)
@pytest.fixture
def scoring(exported, tmp_path: Path) -> Path:
    """A copy of the tiny BridgeTower ITM artifact (`run` scores --text against the image)."""
    return copy_artifact(exported, tmp_path, "bridgetower-tiny", "itm")


def _truncated(path: Path) -> bytes:
    image(path, fmt="JPEG" if path.suffix == ".jpg" else "PNG")
    return path.read_bytes()[: path.stat().st_size // 2]


IMAGE_CASES: dict[str, tuple[str, Callable[[Path], bytes | None], str]] = {
    # name: (file name, its bytes from the file's path (None: a directory), message)
    "directory": ("images", lambda p: None, "is a directory"),
    "empty": ("e.png", lambda p: b"", "is empty (0 bytes)"),
    "not-an-image": ("t.png", lambda p: b"hello", "not an image format"),
    "truncated-png": ("t.png", _truncated, "truncated or damaged"),
    "truncated-jpeg": ("t.jpg", _truncated, "truncated or damaged"),
    # Headers that claim more pixels than Pillow's limit (above 2x it raises, above 1x it only warns).
    "bomb-over-twice-the-limit": ("b.png", lambda p: png_header(40000, 40000), "possible decompression bomb"),
    "bomb-over-the-limit": ("w.png", lambda p: png_header(10000, 10000), "possible decompression bomb"),
}


@pytest.mark.parametrize("case", sorted(IMAGE_CASES))
def test_bad_image(case: str, scoring: Path, tmp_path: Path, capsys) -> None:
    name, content, message = IMAGE_CASES[case]
    path = tmp_path / name
    data = content(path)
    path.mkdir() if data is None else path.write_bytes(data)
    code, err = cli(capsys, "run", scoring, "--image", path, "--text", "a cat")
    assert code == 2 and str(path) in err and message in err, err


@pytest.mark.parametrize("pixels", [1000, 3000])  # 64x64 = 4096 pixels: over twice the limit, and over it
def test_image_over_a_lowered_pixel_limit(
    pixels: int, scoring: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    from PIL import Image

    path = image(tmp_path / "real.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", pixels)
    code, err = cli(capsys, "run", scoring, "--image", path, "--text", "a cat")
    assert code == 2 and "possible decompression bomb" in err and f"at most {pixels} pixels" in err


# ---------------------------------------------------------------- tokenizer, config.json,
# preprocessor_config.json
ARTIFACT_FILE_CASES = {
    # (preset, task, file, content, message)
    "tokenizer-json-garbage": ("blip-tiny", "caption", "tokenizer.json", "garbage{", "is not valid JSON"),
    "tokenizer-json-truncated": ("blip-tiny", "caption", "tokenizer.json", None, "is not valid JSON"),
    "tokenizer-json-wrong-object": (
        "blip-tiny",
        "caption",
        "tokenizer.json",
        '{"model": 5}',
        "is not a tokenizer the tokenizers library can load",
    ),
    "tokenizer-config-a-list": ("blip-tiny", "caption", "tokenizer_config.json", "[1, 2]", "holds a list"),
    "config-a-list": ("blip-tiny", "caption", "config.json", "[1]", "holds a list, not a model config"),
    "config-invalid-json": ("blip-tiny", "caption", "config.json", '{"model_type": ', "is not valid JSON"),
    "config-unknown-model-type": (
        "blip-tiny",
        "caption",
        "config.json",
        '{"model_type": "nope"}',
        "model_type 'nope' is not a model type",
    ),
    "config-wrong-value-type": (
        "blip-tiny",
        "caption",
        "config.json",
        '{"model_type": "blip", "text_config": 5}',
        "is not a valid blip config",
    ),
    "scoring-config-a-list": ("bridgetower-tiny", "itm", "config.json", "[1]", "holds a list"),
    "preprocessor-a-list": ("bridgetower-tiny", "itm", "preprocessor_config.json", "[]", "holds a list"),
    "preprocessor-short-mean": (
        "bridgetower-tiny",
        "itm",
        "preprocessor_config.json",
        '{"image_mean": [0.5]}',
        "image_mean must be 3 numbers",
    ),
    "preprocessor-zero-std": (
        "bridgetower-tiny",
        "itm",
        "preprocessor_config.json",
        '{"image_std": [1, 0, 1]}',
        "image_std holds a 0",
    ),
}


@pytest.mark.parametrize("case", sorted(ARTIFACT_FILE_CASES))
def test_damaged_artifact_file(case: str, exported, tmp_path: Path, capsys) -> None:
    preset, task, name, content, message = ARTIFACT_FILE_CASES[case]
    art = copy_artifact(exported, tmp_path, preset, task)
    path = art / name
    if content is None:  # cut the real file in half
        content = path.read_text()[: len(path.read_text()) // 2]
    path.write_text(content)
    text = ["--text", "a cat"] if task == "itm" else []  # scoring needs a text; captioning takes none
    code, err = cli(capsys, "run", art, "--image", image(tmp_path / "ok.png"), *text)
    assert code == 1 and str(path) in err and message in err and EXPORT_AGAIN.search(err), err


def test_a_graph_this_onnxruntime_cannot_run_is_not_called_damaged(tmp_path: Path) -> None:
    # An intact graph with an operator this onnxruntime lacks (an int4 artifact on an old onnxruntime, say)
    # names the runtime to upgrade; a graph cut short is the damaged file it is
    import onnx
    from onnx import helper

    from vlexport.errors import CheckError
    from vlexport.runtime.onnx_session import OnnxComponent

    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])
    node = helper.make_node("MatMulNBitsV9", ["x"], ["y"], domain="com.microsoft")
    graph = helper.make_graph(
        [node], "g", [x], [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])]
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )
    newer = tmp_path / "newer.onnx"
    onnx.save(model, newer)
    with pytest.raises(CheckError) as caught:
        OnnxComponent(newer)
    said = " ".join(str(caught.value).split())
    assert "MatMulNBitsV9" in said and "upgrade it (pip install -U onnxruntime" in said
    assert "damaged" not in said
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(newer.read_bytes()[:20])
    with pytest.raises(CheckError, match="damaged or incomplete; export the artifact again"):
        OnnxComponent(cut)
