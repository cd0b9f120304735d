"""Kernel tests: the Triton kernels run on CPU in triton's interpreter, on small shapes (it is slow).

triton reads TRITON_INTERPRET (``knobs.runtime.interpret``) at two moments, both checked in
``test_kernel_backend.py``:

* decoration: ``@triton.jit`` builds an interpreted or a compiled function then (our kernels when
  vlexport_kernels is imported, triton's own ``tl`` helpers when triton is);
* launch: the first launch imports ``triton.experimental.gluon``, which asserts that the interpreter is
  on when it finds interpreted ``tl`` helpers.

So tests/conftest.py imports vlexport_kernels under the variable before any test module is collected,
and it is set again around every test here (autouse fixture), but not left set for the rest of the
session: tests/test_inject.py and others keep "auto" dispatch on the reference path for CPU tensors.
"""

from __future__ import annotations

import pytest

# Already decorated for the interpreter by tests/conftest.py.
from vlexport_kernels import fused_attention as _attention_module
from vlexport_kernels._backend import is_interpreted


@pytest.fixture(autouse=True)
def _interpret_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture
def interpreter() -> None:
    """The Triton kernels, runnable on CPU tensors (skip without triton; fail if built for the compiler)."""
    pytest.importorskip("triton")
    if not is_interpreted(_attention_module._attention_fwd_kernel):
        pytest.fail(
            "vlexport_kernels was imported before tests/kernels/conftest.py set TRITON_INTERPRET=1: "
            "its kernels were built for the GPU compiler. Run tests/kernels in a fresh process."
        )
