"""vlexport_kernels.add_layer_norm: the Triton kernel (interpreter) against the reference, the reference
against nn.LayerNorm and BridgeTower's link tower, ranks, strides, shape errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from vlexport_kernels import add_layer_norm, reference_add_layer_norm, use_backend
from vlexport_kernels.fused_add_layer_norm import MAX_HIDDEN, add_layer_norm_triton

# BridgeTower / BERT 768, BLIP-2 ViT-g 1408, OPT-2.7b 2560; powers of two and awkward sizes around them.
HIDDEN = [32, 88, 100, 768, 1408, 2560, 4096]
# (alpha, residual_scale)
SCALINGS = {
    "add": (1.0, 1.0),
    "scaled_add": (0.7, 1.0),
    "interpolate": (0.25, 0.75),
}

# (dtype, atol, rtol) of the kernel against the reference (fp32 math, then one cast) on the same inputs.
TOLERANCES = [
    # fp32 statistics in both; the sums run in another order. Outputs ~N(0, 1) x weight: measured <= 1e-6.
    (torch.float32, 1e-5, 1e-5),
    # Both round an fp32 result to fp16 once: at most one ulp apart (2^-10 relative) where the fp32 values
    # straddle a rounding boundary. Measured <= 2.5e-4 at |y| < 4.
    (torch.float16, 1e-3, 1e-3),
    # The interpreter casts fp32 -> bf16 by truncation where torch rounds to nearest: one bf16 ulp (2^-7
    # relative); two ulps of headroom.
    (torch.bfloat16, 1e-5, 1.6e-2),
]


def make_inputs(shape: tuple[int, ...], dtype: torch.dtype = torch.float32):
    hidden = shape[-1]
    x, residual = torch.randn(shape).to(dtype), torch.randn(shape).to(dtype)
    weight, bias = (1 + 0.5 * torch.randn(hidden)).to(dtype), (0.5 * torch.randn(hidden)).to(dtype)
    return x, residual, weight, bias


@pytest.mark.parametrize(("dtype", "atol", "rtol"), TOLERANCES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("hidden", HIDDEN)
def test_kernel_matches_reference(interpreter, hidden, dtype, atol, rtol) -> None:
    x, residual, weight, bias = make_inputs((2, 5, hidden), dtype)
    with use_backend("triton"):
        got = add_layer_norm(x, residual, weight, bias, 1e-12)
    ref = reference_add_layer_norm(x, residual, weight, bias, 1e-12)
    assert got.dtype == dtype and got.shape == x.shape
    torch.testing.assert_close(got, ref, atol=atol, rtol=rtol)


@pytest.mark.parametrize("scaling", list(SCALINGS))
@pytest.mark.parametrize("hidden", [88, 768])
def test_kernel_scaled(interpreter, hidden, scaling) -> None:
    alpha, residual_scale = SCALINGS[scaling]
    x, residual, weight, bias = make_inputs((3, 7, hidden))
    got = add_layer_norm_triton(x, residual, weight, bias, 1e-5, alpha=alpha, residual_scale=residual_scale)
    ref = reference_add_layer_norm(
        x, residual, weight, bias, 1e-5, alpha=alpha, residual_scale=residual_scale
    )
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", [(100,), (7, 100), (2, 3, 4, 100)], ids=["1d", "2d", "4d"])
def test_ranks_and_no_bias(interpreter, shape) -> None:
    x, residual, weight, _ = make_inputs(shape)
    got = add_layer_norm_triton(x, residual, weight, None, 1e-5)
    torch.testing.assert_close(
        got, reference_add_layer_norm(x, residual, weight, None, 1e-5), atol=1e-5, rtol=1e-5
    )
    assert got.shape == shape


def test_non_contiguous_inputs(interpreter) -> None:
    x = torch.randn(64, 6).t()  # (6, 64), column stride 6: the launcher copies it to unit stride
    residual = torch.randn(3, 6, 64)[1]  # a row-strided view: used as it is
    weight, bias = torch.randn(64), torch.randn(64)
    torch.testing.assert_close(
        add_layer_norm_triton(x, residual, weight, bias, 1e-5),
        reference_add_layer_norm(x, residual, weight, bias, 1e-5),
        atol=1e-5,
        rtol=1e-5,
    )


def test_empty(interpreter) -> None:
    x, residual, weight, bias = make_inputs((0, 32))
    assert add_layer_norm_triton(x, residual, weight, bias).shape == (0, 32)


# ------------------------------------------------------------------------------------------------------------
# The reference against the modules it replaces


def test_reference_is_layer_norm_of_the_sum() -> None:
    x, residual, weight, bias = make_inputs((4, 9, 768))
    ln = nn.LayerNorm(768, eps=1e-12)
    with torch.no_grad():
        ln.weight.copy_(weight)
        ln.bias.copy_(bias)
        expected = ln(x + residual)
    # the same ops on the same values: bit-identical
    torch.testing.assert_close(
        reference_add_layer_norm(x, residual, weight, bias, 1e-12), expected, atol=0, rtol=0
    )


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("link_tower_type", list(SCALINGS))
def test_bridgetower_link_tower(request, backend, link_tower_type) -> None:
    """transformers' BridgeTowerLinkTower: add / scaled_add / interpolate map onto alpha and
    residual_scale."""
    if backend == "triton":
        request.getfixturevalue("interpreter")
    from transformers import BridgeTowerConfig
    from transformers.models.bridgetower.modeling_bridgetower import BridgeTowerLinkTower

    tower = BridgeTowerLinkTower(BridgeTowerConfig(hidden_size=88, link_tower_type=link_tower_type)).eval()
    with torch.no_grad():
        if link_tower_type == "scaled_add":
            tower.scaled_factor.fill_(0.7)
        if link_tower_type == "interpolate":
            tower.beta.fill_(0.3)
        nn.init.normal_(tower.LayerNorm.weight, 1.0, 0.5)
        nn.init.normal_(tower.LayerNorm.bias, 0.0, 0.5)
    hidden, cross = torch.randn(2, 5, 88), torch.randn(2, 5, 88)
    if link_tower_type == "add":
        alpha, residual_scale = 1.0, 1.0
    elif link_tower_type == "scaled_add":  # hidden * scaled_factor + cross
        alpha, residual_scale = tower.scaled_factor.item(), 1.0
    else:  # hidden * (1 - beta) + cross * beta
        alpha, residual_scale = 1 - tower.beta.item(), tower.beta.item()
    ln = tower.LayerNorm
    with torch.no_grad(), use_backend(backend):
        got = add_layer_norm(
            hidden, cross, ln.weight, ln.bias, ln.eps, alpha=alpha, residual_scale=residual_scale
        )
        expected = tower(hidden, cross, None)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------------------
# Shape checks


BAD_ARGS = {
    "residual shape": (
        (torch.randn(2, 5, 32), torch.randn(2, 6, 32), torch.ones(32), torch.zeros(32)),
        "same shape",
    ),
    "weight size": (
        (torch.randn(2, 5, 32), torch.randn(2, 5, 32), torch.ones(30), torch.zeros(32)),
        "weight",
    ),
    "bias size": ((torch.randn(2, 5, 32), torch.randn(2, 5, 32), torch.ones(32), torch.zeros(31)), "bias"),
    "int input": (
        (torch.ones(2, 32, dtype=torch.int64), torch.ones(2, 32, dtype=torch.int64), torch.ones(32), None),
        "floating",
    ),
}


@pytest.mark.parametrize("case", list(BAD_ARGS))
def test_shape_errors_name_the_shapes(interpreter, case) -> None:
    (x, residual, weight, bias), words = BAD_ARGS[case]
    for run in (add_layer_norm_triton, reference_add_layer_norm, add_layer_norm):
        with pytest.raises(ValueError, match=words) as err:
            run(x, residual, weight, bias, 1e-5)
        assert f"x {tuple(x.shape)}" in str(err.value)


def test_hidden_size_limit(interpreter) -> None:
    x, residual, weight, bias = make_inputs((1, MAX_HIDDEN + 1))
    with pytest.raises(ValueError, match=rf"hidden size {MAX_HIDDEN + 1} > {MAX_HIDDEN}"):
        add_layer_norm_triton(x, residual, weight, bias)
