"""Precision passes: an fp32 artifact of a backend rewritten at another precision, as a derived artifact.

A pass is registered under (backend, precision). The orchestrator (pipeline.run_export) runs it like a
derived backend whose parent is the same backend at fp32: ``vlexport quantize DIR --precision P`` derives
from the artifact in DIR, ``vlexport onnx MODEL --precision P`` exports the fp32 parent first. The result
is a new artifact whose manifest references its parent (``derived_from``) and is validated against eager
fp32 with the precision's tolerance (quantize/precision.py).
"""

from __future__ import annotations

import importlib
from typing import Protocol

from vlexport.export.backend import DeriveContext, Derived


class PrecisionPass(Protocol):
    backend: str  # the backend whose artifacts it rewrites
    precision: str  # what it produces (a name in quantize/precision.py PRECISIONS)

    def derive(self, ctx: DeriveContext) -> Derived:
        """Rewrite every component of ``ctx.parent`` (fp32) into ``ctx.out_dir``."""


# (backend, precision) -> the module whose import registers the pass (named here so lookups stay cheap).
BUILTIN: dict[tuple[str, str], str] = {
    ("onnx", "fp16"): "vlexport.quantize.onnx_passes",
    ("onnx", "int8-dynamic"): "vlexport.quantize.onnx_passes",
    ("onnx", "int8-weight"): "vlexport.quantize.onnx_weight_only",
    ("onnx", "int8-static"): "vlexport.quantize.onnx_static",
}
_PASSES: dict[tuple[str, str], PrecisionPass] = {}


def register_pass(p: PrecisionPass) -> PrecisionPass:
    _PASSES[(p.backend, p.precision)] = p
    return p


def precision_pass(backend: str, precision: str) -> PrecisionPass | None:
    """The pass that makes ``precision`` artifacts of ``backend``, or None (the backend builds it natively)."""
    key = (backend, precision)
    if key not in _PASSES and key in BUILTIN:
        importlib.import_module(BUILTIN[key])
    return _PASSES.get(key)
