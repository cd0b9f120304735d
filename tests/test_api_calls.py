"""``vlexport.export`` / ``quantize`` / ``bench``: the orchestrator's results returned to Python (the manifest
on disk, rows that passed parity), and the CLI's up-front checks raised as vlexport.errors exceptions."""

from __future__ import annotations

from pathlib import Path

import pytest

import vlexport
from vlexport.contracts.manifest import Manifest
from vlexport.errors import UsageError


def test_export_returns_the_manifest_it_wrote_and_quantize_its_variant(tmp_path: Path) -> None:
    out = tmp_path / "bt"
    manifest = vlexport.export("bridgetower-tiny", task="itm", out=out, random_weights=True)
    on_disk = Manifest.read(out)
    assert (manifest.family, manifest.task, manifest.backend, manifest.precision) == (
        "bridgetower",
        "itm",
        "onnx",
        "fp32",
    )
    assert manifest.files == on_disk.files and manifest.validation is not None and manifest.validation.passed
    variant = vlexport.quantize(out, "int8-dynamic", out=tmp_path / "bt-int8")
    assert (
        variant.precision == "int8-dynamic"
        and Manifest.read(tmp_path / "bt-int8").precision == "int8-dynamic"
    )
    assert Manifest.read(out).files == on_disk.files  # the parent is untouched
    rows = vlexport.bench([out], batch_sizes=(2,), seq_len=8, warmup=1, iters=2, device="cpu")
    assert rows and all(r.ok for r in rows) and {r.batch for r in rows} == {2}


def test_bad_calls_fail_before_any_work(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="--smooth applies to --precision int8-dynamic"):
        vlexport.quantize(tmp_path, "fp16", smooth=0.5)
    with pytest.raises(UsageError, match="Unknown kernel"):
        vlexport.export("bridgetower-tiny", kernels=["nope"], out=tmp_path / "x")
    with pytest.raises(UsageError, match="suite= alone"):
        vlexport.bench(["bridgetower-tiny"], suite="ci-cpu")
    with pytest.raises(UsageError, match="No suite"):
        vlexport.bench(suite="no-such-suite")
    assert not (tmp_path / "x").exists()
