"""The headline job, full size, once per CI run: `vlexport onnx bridgetower-base --random-weights`."""

from __future__ import annotations

import json
from pathlib import Path

from vlexport.cli import main


def test_bridgetower_base_exports_and_validates(tmp_path: Path) -> None:
    out = tmp_path / "bt"
    assert main(["onnx", "bridgetower-base", "--random-weights", "-o", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    v = manifest["validation"]
    assert v["passed"] is True and len(v["shapes"]) >= 3
    assert set(v["max_abs_error"]) == {"text_features", "image_features", "pooler_output"}
    assert max(v["max_abs_error"].values()) <= 1e-4, v["max_abs_error"]
    # 326M fp32 parameters: the weights live in external data next to the graph.
    comp = manifest["components"]["model"]
    assert comp["external_data"] == "model.onnx.data"
    assert 1.2e9 < comp["size_bytes"] < 1.4e9
    assert manifest["image_size"] == 288
