"""Which implementation a ``vlexport::`` op runs: the Triton kernel or the plain-PyTorch reference.

``auto`` (the default): CUDA tensors -> Triton when it is installed; CPU tensors -> Triton in its
interpreter when ``TRITON_INTERPRET=1`` is set now *and* was set when vlexport_kernels was imported
(triton decides interpreter-or-compiler when ``@triton.jit`` runs, i.e. at our import); otherwise
the reference. ``use_backend("triton" | "reference")`` forces one path, e.g. in tests.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator
from typing import Any

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is the optional `kernels` extra: without it only the reference path exists
    triton = tl = None

if not __name__.startswith(
    "vlexport_kernels."
):  # a second copy (kernels.vlexport_kernels) would register the ops twice
    raise ImportError(f"{__name__}: import this package as vlexport_kernels, not through the kernels/ folder")

BACKENDS = ("auto", "triton", "reference")

# A ContextVar, not a global: a forced backend in one thread (or asyncio task) does not leak into others.
_backend: contextvars.ContextVar[str] = contextvars.ContextVar("vlexport_kernels_backend", default="auto")


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the ``vlexport::`` ops on ``name`` ("auto", "triton" or "reference") inside the block."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    token = _backend.set(name)
    try:
        yield
    finally:
        _backend.reset(token)


def current_backend() -> str:
    return _backend.get()


def is_interpreted(kernel: Any) -> bool:
    """True when ``kernel`` was decorated under TRITON_INTERPRET=1 (it then runs on CPU tensors only)."""
    return triton is not None and type(kernel).__name__ == "InterpretedFunction"


def use_triton(device: torch.device, kernel: Any) -> bool:
    """Whether an op on ``device`` runs ``kernel`` (a @triton.jit function, None without triton)."""
    choice = _backend.get()
    if choice == "reference":
        return False
    on_gpu = device.type == "cuda"
    # Compiled kernels run on CUDA tensors, interpreted ones on CPU tensors; other devices: reference only.
    interpreted = is_interpreted(kernel)
    runnable = kernel is not None and ((on_gpu and not interpreted) or (device.type == "cpu" and interpreted))
    if choice == "triton":
        if not runnable:
            raise RuntimeError(_why_not_runnable(device, kernel))
        return True
    if on_gpu:
        return runnable
    return runnable and os.environ.get("TRITON_INTERPRET") == "1"


def _why_not_runnable(device: torch.device, kernel: Any) -> str:
    if kernel is None:
        return "use_backend('triton'): triton is not installed (pip install 'vlexport[kernels]')."
    if device.type not in ("cpu", "cuda"):
        return (
            f"use_backend('triton'): no Triton path for {device.type} tensors "
            "(CUDA, or CPU in the interpreter)."
        )
    if device.type == "cuda":
        return (
            "use_backend('triton'): the kernels were built for the Triton interpreter (TRITON_INTERPRET=1 "
            "was "
            "set when vlexport_kernels was imported) and cannot run on CUDA tensors."
        )
    return (
        f"use_backend('triton'): {device.type} tensors need the Triton interpreter: set TRITON_INTERPRET=1 "
        "before vlexport_kernels is imported (triton reads it when the kernels are decorated)."
    )
