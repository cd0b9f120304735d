"""Precision passes and the one derive mechanism: how a build that starts from another artifact finds its
parent.

A pass is registered under (backend, precision). It is a derived build whose parent is the same backend at
fp32: ``vlexport quantize DIR --precision P`` derives from the artifact in DIR, ``vlexport onnx MODEL
--precision P`` (and the benchmark) export or reuse the fp32 parent first. A derived backend
(``Backend.parent``: onnx-opt, tensorrt) is the same mechanism with another parent backend. :func:`derivation`
says which applies; the orchestrator (pipeline.run_export) and the bench (bench/variants.py) follow it, and
nothing else decides. The result is a new artifact whose manifest references its parent (``derived_from``) and
is validated against eager fp32 with the precision's tolerance (contracts/precision.py).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from vlexport.contracts.backends import Backend, DeriveContext, Derived
from vlexport.contracts.precision import PrecisionConfig


class PrecisionPass(Protocol):
    backend: str  # the backend whose artifacts it rewrites
    precision: str  # what it produces (a name in contracts/precision.py PRECISIONS)

    def derive(self, ctx: DeriveContext) -> Derived:
        """Rewrite every component of ``ctx.parent`` (fp32) into ``ctx.out_dir``; the config is
        ``ctx.job.precision``."""


# (backend, precision) -> the module whose import registers the pass (named here so lookups stay cheap).
BUILTIN: dict[tuple[str, str], str] = {
    ("onnx", "fp16"): "vlexport.quantize.onnx_fp16",
    ("onnx", "int8-dynamic"): "vlexport.quantize.onnx_dynamic",
    ("onnx", "int8-weight"): "vlexport.quantize.onnx_weight_only",
    ("onnx", "int4-weight"): "vlexport.quantize.onnx_weight_only",
    ("onnx", "int8-static"): "vlexport.quantize.onnx_static",
}
_PASSES: dict[tuple[str, str], PrecisionPass] = {}


def register_pass(p: PrecisionPass) -> PrecisionPass:
    _PASSES[(p.backend, p.precision)] = p
    return p


def unregister_pass(backend: str, precision: str) -> None:
    _PASSES.pop((backend, precision), None)


def pass_modules() -> tuple[str, ...]:
    return tuple(dict.fromkeys(BUILTIN.values()))


def precision_pass(backend: str, precision: str) -> PrecisionPass | None:
    """The pass that makes ``precision`` artifacts of ``backend``, or None (the backend builds it
    natively)."""
    key = (backend, precision)
    if key not in _PASSES and key in BUILTIN:
        importlib.import_module(BUILTIN[key])
    return _PASSES.get(key)


@dataclass(frozen=True)
class Derivation:
    """A build from a parent artifact: which parent, which precisions it may have, and what builds from it."""

    parent_backend: str
    parent_precisions: tuple[
        str, ...
    ]  # what the parent's manifest may say; the first is what is built when absent
    build: Callable[[DeriveContext], Derived]
    stage: str  # the manifest's timings key


def derivation(backend: Backend, precision: PrecisionConfig) -> Derivation | None:
    """How (backend, precision) is built from a parent artifact, or None: exported from torch."""
    rewrite = precision_pass(backend.name, precision.name)
    if rewrite is not None:  # the same backend at fp32, rewritten
        return Derivation(backend.name, ("fp32",), rewrite.derive, precision.name)
    if backend.parent is not None:  # e.g. TensorRT builds int8 from an fp32 graph or from a QDQ one
        accepts = ("fp32",) if precision.name == "fp32" else ("fp32", precision.name)
        return Derivation(backend.parent, accepts, backend.derive, backend.name)
    return None
