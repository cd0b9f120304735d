"""vlexport: verified deployment artifacts for Hugging Face vision-language models.

``vlexport.load`` / ``hf`` / ``export`` / ``quantize`` / ``bench`` (docs/api.md) are imported on first use, so
that ``import vlexport`` stays light (no torch, no ONNX Runtime).
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {"load": "vlexport.runtime.tasks"}
# vlexport.export / quantize / bench are the subpackages of those names, made callable (vlexport/callables.py)
_PACKAGES = ("export", "quantize", "bench", "hf")
__all__ = ["__version__", "bench", "export", "hf", "load", "quantize"]


def __getattr__(name: str) -> Any:
    import importlib

    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in _PACKAGES:  # ``import vlexport.hf`` etc. work as well
        return importlib.import_module(f"vlexport.{name}")
    raise AttributeError(f"module 'vlexport' has no attribute {name!r}")
