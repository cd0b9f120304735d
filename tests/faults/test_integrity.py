"""Content integrity: every component and support file's sha256 is recorded at export; a file changed after
validation (same size, bytes flipped) is refused by `validate` and `triton` always, by `run` for native code
always (never loaded) and for every file with --verify."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.faults.cli_helpers import cli
from vlexport.contracts.manifest import Manifest, file_sha256
from vlexport.errors import CheckError

FEATURES = ("altclip-tiny", "features")


def _flip(path: Path, offset: int | None = None) -> None:
    """Zero 64 bytes in the middle of ``path``: same size, so the size check cannot see it."""
    data = bytearray(path.read_bytes())
    at = len(data) // 2 if offset is None else offset
    data[at : at + 64] = bytes(64) if any(data[at : at + 64]) else b"\x01" * 64
    path.write_bytes(bytes(data))


@pytest.fixture
def art(exported, tmp_path: Path) -> Path:
    art = tmp_path / "art"
    shutil.copytree(exported(*FEATURES), art)
    return art


def test_export_records_a_streamed_sha256_of_every_file(art: Path) -> None:
    m = Manifest.read(art)
    assert set(m.sha256) == {"model.onnx", *m.files} and "config.json" in m.sha256
    import hashlib

    assert m.sha256["model.onnx"] == hashlib.sha256((art / "model.onnx").read_bytes()).hexdigest()
    assert file_sha256(art / "config.json") == m.sha256["config.json"]


def test_validate_refuses_a_component_changed_after_export(art: Path, capsys) -> None:
    _flip(art / "model.onnx")
    rc, err = cli(capsys, "validate", art)
    assert rc == 1 and f"{art / 'model.onnx'} (a component file) changed after export" in err, err


def test_validate_names_an_edited_config_instead_of_a_shape_traceback(art: Path, capsys) -> None:
    cfg = json.loads((art / "config.json").read_text())
    cfg["projection_dim"] = cfg.get("projection_dim", 16) * 2
    (art / "config.json").write_text(json.dumps(cfg))
    rc, err = cli(capsys, "validate", art)
    assert rc == 1 and "(the config the graph was exported from) changed after export" in err, err


def test_triton_never_serves_a_file_swapped_after_validation(art: Path, tmp_path: Path, capsys) -> None:
    _flip(art / "model.onnx")
    rc, err = cli(capsys, "triton", art, "-o", tmp_path / "repo")
    assert rc == 1 and "changed after export" in err and not (tmp_path / "repo").exists(), err


def test_run_verify_checks_onnx_files_too(art: Path, tmp_path: Path, capsys) -> None:
    from PIL import Image

    Image.new("RGB", (32, 32), (120, 30, 200)).save(tmp_path / "x.png")
    _flip(art / "model.onnx")
    rc, err = cli(capsys, "run", art, "--image", tmp_path / "x.png", "--text", "a cat", "--verify")
    assert rc == 1 and "changed after export" in err, err


@pytest.mark.parametrize("suffix,backend", [(".pt2", "aoti"), (".plan", "tensorrt")])
def test_native_code_failing_its_hash_is_never_loaded(
    art: Path, monkeypatch, suffix: str, backend: str
) -> None:
    """A compiled package / engine whose bytes changed: the loader refuses before the backend sees the
    file."""
    from vlexport.contracts import backends as registry
    from vlexport.runtime import load_artifact

    m = json.loads((art / "manifest.json").read_text())
    comp = next(iter(m["components"].values()))
    native = f"model{suffix}"
    shutil.copy(art / comp["file"], art / native)
    comp["file"], m["backend"] = native, backend
    m["sha256"] = {native if k == "model.onnx" else k: v for k, v in m["sha256"].items()}
    (art / "manifest.json").write_text(json.dumps(m))
    loaded: list[Path] = []

    class Recorder:
        def load(self, path: Path, options: object = None):
            loaded.append(path)
            return lambda feeds: {}

    monkeypatch.setattr(registry, "get_backend", lambda name: Recorder())
    monkeypatch.setattr("vlexport.runtime.get_backend", lambda name: Recorder())
    load_artifact(art)  # intact: loads
    assert loaded == [art / native]
    _flip(art / native)
    with pytest.raises(CheckError, match=rf"model\{suffix} \(a component file\) changed after export"):
        load_artifact(art)
    assert loaded == [art / native]  # the changed file never reached the backend


@pytest.mark.parametrize("precision", ["int8-dynamic", "fp16"])
def test_quantize_checks_its_source_first(
    art: Path, tmp_path: Path, capsys, monkeypatch, precision: str
) -> None:
    """A damaged source is named as the cause, before any model loads, not blamed on the variant built from
    it."""
    import vlexport.pipeline

    monkeypatch.setattr(vlexport.pipeline, "load_model", lambda *a, **k: 1 / 0)
    _flip(art / "model.onnx")
    out = tmp_path / "q"
    rc, err = cli(capsys, "quantize", art, "-o", out, "--precision", precision)
    assert rc == 1 and f"{art / 'model.onnx'} (a component file) changed after export" in err, err
    assert not out.exists()
