"""vlexport_kernels.bench: the GPU micro-benchmark refuses cleanly without CUDA and covers the shapes it
promises."""

from __future__ import annotations

import pytest
import torch
from vlexport_kernels import bench


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA exit")
def test_exits_2_without_cuda(capsys, tmp_path) -> None:
    assert bench.main(["--json", str(tmp_path / "out.json")]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
    assert not (tmp_path / "out.json").exists()


def test_cases_cover_the_model_shapes() -> None:
    attention = {(c.name, c.batch, c.heads, c.q_len, c.kv_len, c.head_dim) for c in bench.attention_cases()}
    assert {("bridgetower-base", b, 12, s, s, 64) for b in (1, 32) for s in (40, 325)} <= attention
    assert {("blip2-vit-g", b, 16, 257, 257, 88) for b in (1, 2, 4, 8)} <= attention
    assert {("opt-2.7b-decode", 1, 32, 1, kv, 80) for kv in (128, 512)} <= attention
    assert {c.hidden for c in bench.layer_norm_cases()} == {768, 1408, 2560}


def test_eager_baseline_is_hf_eager_math() -> None:
    """The baseline the kernel is timed against computes the same thing (checked here on CPU, fp32)."""
    from vlexport_kernels import reference_attention

    q, k, v = (torch.randn(2, 3, 5, 16) for _ in range(3))
    bias = torch.zeros(2, 1, 1, 5)
    bias[0, ..., 3:] = torch.finfo(torch.float32).min
    torch.testing.assert_close(
        bench.eager_attention(q, k, v, bias, 0.25),
        reference_attention(q, k, v, attn_bias=bias, scale=0.25),
        atol=1e-6,
        rtol=1e-5,
    )
