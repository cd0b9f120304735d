"""Validation runs the eager side first and drops the model before the artifact loads.

For a model that fills half the machine (BLIP-2 OPT-2.7b: 3.7B parameters, 14 GiB in fp32) the peak is
then one copy of the weights, not two. The tests hold a weak reference to the eager model the pipeline
loaded and look at it when the artifact is being loaded.
"""

from __future__ import annotations

import weakref
from pathlib import Path

import pytest

from vlexport import pipeline, validate
from vlexport.contracts.manifest import Manifest
from vlexport.pipeline import ExportJob, run_export


def _watch(monkeypatch: pytest.MonkeyPatch, models, artifacts) -> dict:
    """Patch ``models.load_model`` and ``artifacts.load_artifact``; record which models live at each load."""
    seen: dict = {"refs": [], "alive_at_load": []}
    load_model, load_artifact = models.load_model, artifacts.load_artifact

    def tracked_load_model(*args, **kwargs):
        model = load_model(*args, **kwargs)
        # The model object and its weights: the ONNX exporter's in-memory graph wraps parameters without
        # copying, and onnxscript's rewrite rules keep the last graph they matched (export/onnx.py).
        seen["refs"] += [weakref.ref(model), weakref.ref(next(model.parameters()))]
        return model

    def tracked_load_artifact(*args, **kwargs):
        seen["alive_at_load"].append([r() is not None for r in seen["refs"]])
        return load_artifact(*args, **kwargs)

    monkeypatch.setattr(models, "load_model", tracked_load_model)
    monkeypatch.setattr(artifacts, "load_artifact", tracked_load_artifact)
    return seen


# altclip-tiny: the fastest export (the pipeline's order is what is checked, not a family).
@pytest.mark.parametrize(
    ("preset", "task", "backend"),
    [
        ("altclip-tiny", "features", "onnx"),
        ("blip-tiny", "caption", "onnx"),
        ("altclip-tiny", "features", "onnx-opt"),
    ],
)
def test_export_drops_the_eager_model_before_loading_the_artifact(
    monkeypatch, tmp_path: Path, preset: str, task: str, backend: str
) -> None:
    # onnx-opt is derived: its parent ONNX export reuses the loaded model, and the same drop applies.
    seen = _watch(monkeypatch, pipeline, pipeline)
    manifest = run_export(
        ExportJob(preset, tmp_path / "out", backend=backend, task=task, random_weights=True)
    )
    assert manifest.validation.passed is True and manifest.backend == backend
    assert seen["alive_at_load"] == [[False, False]]


def test_validate_directory_drops_the_eager_model_first(monkeypatch, exported) -> None:
    from vlexport import runtime, weights

    out = exported("bridgetower-tiny", "itm")
    seen = _watch(monkeypatch, weights, runtime)
    result = validate.validate_directory(out)
    assert result.passed is True
    assert result.max_abs_error == pytest.approx(Manifest.read(out).validation.max_abs_error)
    assert seen["alive_at_load"] == [[False, False]]
