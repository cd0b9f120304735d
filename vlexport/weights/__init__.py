"""A model's weights: where they come from (``resolve``), that they are what they claim (``integrity``), and
loading them into the task's class (``load``). Docs: docs/ARCHITECTURE.md, "Pitfalls", weights order."""

from vlexport.weights.integrity import check_safetensors, check_unchanged, weights_sha256
from vlexport.weights.load import load_model
from vlexport.weights.resolve import SANE_INITIALIZER_RANGE, ModelSource, resolve, source_from_manifest

__all__ = [
    "SANE_INITIALIZER_RANGE",
    "ModelSource",
    "check_safetensors",
    "check_unchanged",
    "load_model",
    "resolve",
    "source_from_manifest",
    "weights_sha256",
]
