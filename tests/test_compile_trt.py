"""`vlexport tensorrt`: shape profiles everywhere; a clean failure without TensorRT; real builds only where it
exists."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from vlexport.cli import main
from vlexport.contracts.manifest import Component, TensorSpec
from vlexport.contracts.precision import get_precision
from vlexport.errors import UsageError
from vlexport.export.tensorrt import AxisRange, parse_shapes, profile_shapes
from vlexport.pipeline import ExportJob, run_export
from vlexport.runtime.components import import_tensorrt


def test_parse_shapes() -> None:
    assert parse_shapes("batch=1:8:32, sequence=4") == {
        "batch": AxisRange(1, 8, 32),
        "sequence": AxisRange(4, 4, 4),
    }
    for bad in ("batch=8:1:32", "batch=1:x:3", "=1:2:3", "batch=0:1:2"):
        with pytest.raises(UsageError, match="--shapes"):
            parse_shapes(bad)
    with pytest.raises(UsageError, match="precision"):
        get_precision("int4")
    with pytest.raises(UsageError, match="tensorrt backend builds fp32, fp16, int8-static, not bf16"):
        run_export(ExportJob("bridgetower-tiny", None, backend="tensorrt", precision=get_precision("bf16")))


def test_profile_shapes_fill_dynamic_axes_by_name() -> None:
    comp = Component(
        "model",
        "model.onnx",
        inputs=[
            TensorSpec("input_ids", "int64", ["batch", "sequence"]),
            TensorSpec("pixel_values", "float32", ["batch", 3, 64, 64]),
            TensorSpec("past", "float32", ["batch", 4, "past_sequence", 8]),
        ],
        outputs=[],
    )
    shapes = profile_shapes(comp, parse_shapes("batch=1:8:32,sequence=1:16:64"))
    assert shapes["input_ids"] == ((1, 1), (8, 16), (32, 64))
    assert shapes["pixel_values"] == ((1, 3, 64, 64), (8, 3, 64, 64), (32, 3, 64, 64))
    assert shapes["past"] == ((1, 4, 1, 8), (8, 4, 32, 8), (32, 4, 256, 8))  # unnamed axis: default range


@pytest.fixture
def no_tensorrt(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` raises ImportError


def test_trt_without_tensorrt_fails_cleanly(no_tensorrt, tmp_path: Path, capsys) -> None:
    with pytest.raises(UsageError, match=r"vlexport\[trt\]"):
        import_tensorrt()
    out = tmp_path / "engine"
    for verb in ("tensorrt", "trt"):  # `trt`: the verb's earlier name, kept as an alias
        assert main([verb, "bridgetower-tiny", "--random-weights", "-o", str(out)]) == 2
        err = " ".join(capsys.readouterr().err.split())
        assert "TensorRT 10 is not installed" in err and "vlexport[trt]" in err and "Traceback" not in err
        assert not out.exists()
    assert main(["bench", "bridgetower-tiny", "--random-weights", "--backends", "eager,tensorrt"]) == 2
    assert "TensorRT" in capsys.readouterr().err


def test_tensorrt_stub_package_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tensorrt-cu* wheels reachable here are download stubs: an importable module without Builder."""
    monkeypatch.setitem(sys.modules, "tensorrt", type(sys)("tensorrt"))
    with pytest.raises(UsageError, match="stub"):
        import_tensorrt()


def _have_tensorrt() -> bool:
    try:
        import_tensorrt()
    except UsageError:
        return False
    return torch.cuda.is_available()


needs_trt = pytest.mark.skipif(not _have_tensorrt(), reason="needs TensorRT 10 and a CUDA GPU")


@pytest.mark.gpu
@needs_trt
def test_trt_engine_validates(tmp_path: Path) -> None:
    out = tmp_path / "trt"
    assert (
        main(
            [
                "tensorrt",
                "bridgetower-tiny",
                "--random-weights",
                "--task",
                "itm",
                "-o",
                str(out),
                "--shapes",
                "batch=1:4:8,sequence=1:16:32",
            ]
        )
        == 0
    )
    import json

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["backend"] == "tensorrt" and manifest["validation"]["passed"] is True
    assert (out / "model.plan").stat().st_size > 0 and manifest["derived_from"]["backend"] == "onnx"
