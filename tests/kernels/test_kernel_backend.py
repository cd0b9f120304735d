"""Dispatch between the Triton kernels and the references, TRITON_INTERPRET's timing, tracing through the ops
(torch.compile fullgraph, torch.export), and vlexport_kernels without triton."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import vlexport_kernels
from torch import nn
from vlexport_kernels import _backend, fused_add_layer_norm, fused_attention, use_backend


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Counts which implementation the ops run (the ops look their implementations up by module global)."""
    counts = {
        "attention_triton": 0,
        "reference_attention": 0,
        "add_layer_norm_triton": 0,
        "reference_add_layer_norm": 0,
    }
    for module in (fused_attention, fused_add_layer_norm):
        for name in counts:
            if hasattr(module, name):
                original = getattr(module, name)

                def counted(*args, _name=name, _original=original, **kwargs):
                    counts[_name] += 1
                    return _original(*args, **kwargs)

                monkeypatch.setattr(module, name, counted)
    return counts


def ran(triton: int = 0, reference: int = 0) -> dict[str, int]:
    """What ``calls`` must read after ``triton`` Triton and ``reference`` reference runs of both ops."""
    return {
        "attention_triton": triton,
        "reference_attention": reference,
        "add_layer_norm_triton": triton,
        "reference_add_layer_norm": reference,
    }


def run_both_ops() -> None:
    q = torch.randn(1, 2, 3, 64)
    vlexport_kernels.attention(q, q, q)
    x = torch.randn(3, 32)
    vlexport_kernels.add_layer_norm(x, x, torch.ones(32), torch.zeros(32), 1e-5)


def test_auto_on_cpu_follows_triton_interpret(interpreter, calls, monkeypatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET")
    run_both_ops()
    assert calls == ran(reference=1)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    run_both_ops()
    assert calls == ran(triton=1, reference=1)


def test_use_backend_forces_a_path_and_restores(interpreter, calls) -> None:
    assert vlexport_kernels.current_backend() == "auto"
    with use_backend("reference"):
        run_both_ops()
        with use_backend("triton"):  # nested: innermost wins
            run_both_ops()
        assert vlexport_kernels.current_backend() == "reference"
    assert vlexport_kernels.current_backend() == "auto"
    assert calls == ran(triton=1, reference=1)
    assert vlexport_kernels.backend is use_backend  # the alias vlexport.inject's tests use


def test_use_backend_rejects_unknown_names() -> None:
    with pytest.raises(ValueError, match="auto.*triton.*reference"), use_backend("cuda"):
        pass


def test_triton_refused_where_it_cannot_run(monkeypatch) -> None:
    """A compiled (non-interpreted) kernel cannot run on CPU tensors, an interpreted one not on CUDA
    tensors."""
    compiled = object()  # stands for a JITFunction: anything that is not an InterpretedFunction
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert _backend.use_triton(cpu, compiled) is False  # auto falls back to the reference
    with (
        use_backend("triton"),
        pytest.raises(RuntimeError, match="TRITON_INTERPRET=1 before vlexport_kernels"),
    ):
        _backend.use_triton(cpu, compiled)
    interpreted = fused_attention._attention_fwd_kernel
    if _backend.is_interpreted(interpreted):
        assert _backend.use_triton(cuda, interpreted) is False
        with use_backend("triton"), pytest.raises(RuntimeError, match="cannot run on CUDA tensors"):
            _backend.use_triton(cuda, interpreted)
    with use_backend("triton"), pytest.raises(RuntimeError, match="triton is not installed"):
        _backend.use_triton(cpu, None)


def test_triton_interpret_is_read_at_decoration_and_launch(interpreter, monkeypatch) -> None:
    """What conftest.py relies on: decoration fixes interpreter-or-compiler; launching needs the variable
    too."""
    import triton
    import triton.language as tl

    def body(x_ptr, n: tl.constexpr):
        tl.store(x_ptr + tl.arange(0, n), tl.arange(0, n).to(tl.float32))

    monkeypatch.delenv("TRITON_INTERPRET")
    assert not _backend.is_interpreted(triton.jit(body))  # a compiled kernel: the variable was unset
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    kernel = triton.jit(body)
    assert _backend.is_interpreted(kernel)
    monkeypatch.delenv("TRITON_INTERPRET")  # the decision stays with the function ...
    assert _backend.is_interpreted(kernel) and _backend.is_interpreted(fused_attention._attention_fwd_kernel)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # ... and a launch runs it in the interpreter on CPU tensors
    out = torch.zeros(16)
    kernel[(1,)](out, n=16)
    assert torch.equal(out, torch.arange(16.0))


# ------------------------------------------------------------------------------------------------------------
# Tracing: the ops are opaque nodes with fake implementations, so nothing breaks the graph


class TinyBlock(nn.Module):
    """Post-norm attention block wired as vlexport.inject wires the ops."""

    def __init__(self, hidden: int = 32, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.norm = nn.LayerNorm(hidden, eps=1e-12)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, s, hidden = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, hidden // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        out = vlexport_kernels.attention(q, k, v, key_padding_mask=mask, causal=True)
        out = out.transpose(1, 2).reshape(b, s, hidden)
        return vlexport_kernels.add_layer_norm(out, x, self.norm.weight, self.norm.bias, self.norm.eps)


def block_inputs(batch: int, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    mask = torch.ones(batch, seq, dtype=torch.bool)
    mask[0, seq // 2 :] = False
    return torch.randn(batch, seq, 32), mask


def test_torch_compile_fullgraph(interpreter, calls) -> None:
    block = TinyBlock().eval()
    x, mask = block_inputs(2, 7)
    torch._dynamo.reset()
    with torch.no_grad(), use_backend("reference"):
        expected = block(x, mask)
        compiled = torch.compile(block, fullgraph=True)  # fullgraph: a graph break raises
        torch.testing.assert_close(compiled(x, mask), expected, atol=1e-5, rtol=1e-5)
        assert calls == ran(reference=2)  # eager and compiled: tracing ran the fake implementations only
        with use_backend("triton"):  # the op reads the backend when it runs, not when it was traced
            torch.testing.assert_close(compiled(x, mask), expected, atol=1e-5, rtol=1e-5)
        # The same expected value on both paths: only the counts prove the switch was not ignored.
        assert calls == ran(triton=1, reference=2)


def test_torch_export_dynamic_shapes() -> None:
    block = TinyBlock().eval()
    batch, seq = torch.export.Dim("batch", min=1, max=64), torch.export.Dim("seq", min=1, max=512)
    program = torch.export.export(
        block, block_inputs(2, 7), dynamic_shapes=({0: batch, 1: seq}, {0: batch, 1: seq})
    )
    targets = [n.target for n in program.graph.nodes if n.op == "call_function"]
    assert torch.ops.vlexport.attention.default in targets
    assert torch.ops.vlexport.add_layer_norm.default in targets
    with torch.no_grad(), use_backend("reference"):
        for shape in [(3, 11), (1, 1)]:
            args = block_inputs(*shape)
            torch.testing.assert_close(program.module()(*args), block(*args), atol=1e-6, rtol=1e-6)


# ------------------------------------------------------------------------------------------------------------
# triton is optional


def test_import_and_run_without_triton() -> None:
    script = textwrap.dedent("""
        import sys
        sys.modules["triton"] = None  # `import triton` now raises ImportError
        import torch, vlexport_kernels
        q = torch.randn(1, 2, 3, 64)
        out = vlexport_kernels.attention(q, q, q, causal=True)
        assert out.shape == q.shape
        x = torch.randn(3, 32)
        vlexport_kernels.add_layer_norm(x, x, torch.ones(32), torch.zeros(32), 1e-5)
        try:
            with vlexport_kernels.use_backend("triton"):
                vlexport_kernels.attention(q, q, q)
        except RuntimeError as exc:
            assert "triton is not installed" in str(exc), exc
        else:
            raise AssertionError("use_backend('triton') ran without triton")
        print("ok")
    """)
    env = {**os.environ, "TRITON_INTERPRET": "1"}  # even asked for, the reference runs
    run = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-3000:]
