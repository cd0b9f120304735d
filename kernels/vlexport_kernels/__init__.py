"""vlexport's fused kernels as torch ops (``torch.ops.vlexport.*``), with plain-PyTorch references.

Importing registers the ops; triton is optional (the ``kernels`` extra): without it, or on CPU
without TRITON_INTERPRET=1, the ops run their reference implementations. onnxscript is imported
only by ``onnx_translation_table()``.
"""

from __future__ import annotations

from typing import Any

from ._backend import BACKENDS, current_backend, use_backend
from .fused_add_layer_norm import add_layer_norm, reference_add_layer_norm
from .fused_attention import attention, reference_attention

backend = use_backend  # short alias: `with vlexport_kernels.backend("triton"): ...`


def onnx_translation_table() -> dict[Any, Any]:
    """``{op overload: onnxscript function}`` for ``torch.onnx.export(..., custom_translation_table=...)``."""
    from .onnx_translation import onnx_translation_table as table

    return table()


__all__ = [
    "BACKENDS",
    "add_layer_norm",
    "attention",
    "backend",
    "current_backend",
    "onnx_translation_table",
    "reference_add_layer_norm",
    "reference_attention",
    "use_backend",
]
