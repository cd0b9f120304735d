"""vlexport_kernels.fused_attention: the Triton kernel (interpreter) against the reference, the reference
against independent math (torch SDPA, HF eager attention), masks, fully masked rows, strides, shape errors."""

from __future__ import annotations

import pytest
import torch
from vlexport_kernels import attention, reference_attention, use_backend
from vlexport_kernels.fused_attention import MAX_HEAD_DIM, attention_triton

SHAPES = [  # (B, H, Sq, Sk, D)
    (1, 1, 1, 1, 64),  # one token
    (2, 3, 37, 37, 64),  # prime length, self-attention (BridgeTower text: D = 64)
    (1, 2, 1, 77, 80),  # decode step over a KV cache (OPT-2.7b: D = 80)
    (2, 2, 77, 37, 88),  # cross-attention, more queries than keys (BLIP-2 ViT-g: D = 88)
    (1, 2, 37, 77, 88),  # cross-attention, more keys than queries
    (1, 1, 16, 16, 128),
]
MASKINGS = ["none", "key_padding", "bias_b1qk", "bias_b11k", "bias_1hqk", "causal", "all"]

# (dtype, atol, rtol) of the kernel against the fp32 reference on the same inputs.
TOLERANCES = [
    # fp32 all the way; only the summation order differs (online softmax over key blocks). Measured <= 7e-7.
    (torch.float32, 2e-6, 1e-5),
    # p is rounded to fp16 before p @ v (as on GPU) and the output cast to fp16: outputs are weighted means
    # of v (|out| < ~3), one fp16 ulp there is 2e-3. Measured <= 1e-3.
    (torch.float16, 2e-3, 2e-3),
]
# bf16 is not tested here: triton's interpreter computes tl.dot on bf16 operands wrongly (errors ~1e10 on a
# plain 16x16 dot), a limitation of the interpreter, not of the kernel; add_layer_norm's bf16 path is tested.


def make_qkv(b: int, h: int, sq: int, sk: int, d: int, dtype: torch.dtype = torch.float32):
    """q, k, v as HF hands them over: (B, S, H, D) projections viewed as (B, H, S, D), i.e. non-contiguous."""
    q = torch.randn(b, sq, h, d).to(dtype).transpose(1, 2)
    k = torch.randn(b, sk, h, d).to(dtype).transpose(1, 2)
    v = torch.randn(b, sk, h, d).to(dtype).transpose(1, 2)
    return q, k, v


def make_masking(kind: str, b: int, h: int, sq: int, sk: int) -> dict:
    keep = torch.rand(b, sk) > 0.3
    keep[:, 0] = True  # every query row keeps a key, even under causal with Sq <= Sk
    kwargs = {
        "none": {},
        "key_padding": {"key_padding_mask": keep},
        "bias_b1qk": {"attn_bias": torch.randn(b, 1, sq, sk)},  # HF eager mask layout (here random values)
        "bias_b11k": {"attn_bias": torch.randn(b, 1, 1, sk)},  # HF padding mask layout
        "bias_1hqk": {"attn_bias": torch.randn(1, h, sq, sk)},  # T5 relative position bias
        "causal": {"causal": True},
        "all": {
            "key_padding_mask": keep.to(torch.int64),
            "attn_bias": torch.randn(1, h, sq, sk),
            "causal": True,
        },
    }
    return kwargs[kind]


@pytest.mark.parametrize("masking", MASKINGS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_kernel_matches_reference_fp32(interpreter, shape, masking) -> None:
    q, k, v = make_qkv(*shape)
    kwargs = make_masking(masking, shape[0], shape[1], shape[2], shape[3])
    with use_backend("triton"):
        got = attention(q, k, v, **kwargs)
    ref = reference_attention(q, k, v, **kwargs)
    dtype, atol, rtol = TOLERANCES[0]
    assert got.dtype == dtype and got.shape == q.shape and got.is_contiguous()
    torch.testing.assert_close(got, ref, atol=atol, rtol=rtol)


@pytest.mark.parametrize(("dtype", "atol", "rtol"), TOLERANCES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("masking", ["none", "all"])
@pytest.mark.parametrize(
    "shape", [(2, 3, 37, 37, 64), (1, 2, 1, 77, 80), (1, 2, 37, 77, 88)], ids=lambda s: "x".join(map(str, s))
)
def test_kernel_dtypes(interpreter, shape, masking, dtype, atol, rtol) -> None:
    q, k, v = make_qkv(*shape, dtype=dtype)
    kwargs = make_masking(masking, shape[0], shape[1], shape[2], shape[3])
    got = attention_triton(q, k, v, **kwargs)
    ref = reference_attention(q.float(), k.float(), v.float(), **kwargs)  # fp32 math on the same inputs
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), ref, atol=atol, rtol=rtol)


# ------------------------------------------------------------------------------------------------------------
# The reference against independent implementations


@pytest.mark.parametrize("masking", MASKINGS)
def test_reference_matches_sdpa(masking) -> None:
    b, h, sq, sk, d = 2, 3, 5, 9, 16
    q, k, v = make_qkv(b, h, sq, sk, d)
    kwargs = make_masking(masking, b, h, sq, sk)
    mask = torch.zeros(b, h, sq, sk)
    if "attn_bias" in kwargs:
        mask = mask + kwargs["attn_bias"]
    if "key_padding_mask" in kwargs:
        mask = mask.masked_fill(~kwargs["key_padding_mask"].bool()[:, None, None, :], float("-inf"))
    if kwargs.get("causal"):  # end-aligned: query i sees keys j <= i + Sk - Sq
        mask = mask.masked_fill(~torch.ones(sq, sk, dtype=torch.bool).tril(sk - sq), float("-inf"))
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3)
    torch.testing.assert_close(
        reference_attention(q, k, v, scale=0.3, **kwargs), expected, atol=1e-6, rtol=1e-5
    )


def test_causal_decode_step_sees_the_whole_cache() -> None:
    """Sq = 1 against a cache of Sk keys: the query is the last position and attends to every key."""
    q, k, v = make_qkv(1, 2, 1, 9, 16)
    torch.testing.assert_close(reference_attention(q, k, v, causal=True), reference_attention(q, k, v))
    # Sq = 3 new tokens after 6 cached ones: row i sees keys 0..6+i.
    q3 = torch.randn(1, 2, 3, 16)
    full = reference_attention(q3, k, v, causal=True)
    for i in range(3):
        row = reference_attention(q3[:, :, i : i + 1], k[:, :, : 7 + i], v[:, :, : 7 + i])
        torch.testing.assert_close(full[:, :, i : i + 1], row, atol=1e-6, rtol=1e-5)


def hf_eager(q, k, v, additive_mask):
    """transformers' eager_attention_forward (BLIP, BridgeTower): softmax(q k^T * s + mask) v."""
    scores = torch.matmul(q, k.transpose(2, 3)) * q.shape[-1] ** -0.5 + additive_mask
    return torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32), v)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_hf_finite_masks_match_eager_even_on_fully_masked_rows(request, backend) -> None:
    """HF masks with finfo.min, never -inf: a row masked everywhere is softmax of equal scores in eager (the
    mean of v). The kernel does the same arithmetic, so it agrees with eager there too."""
    if backend == "triton":
        request.getfixturevalue("interpreter")
    q, k, v = make_qkv(2, 2, 5, 7, 64)
    mask = torch.zeros(2, 1, 5, 7)
    mask[0, :, :, 3:] = torch.finfo(torch.float32).min  # padding
    mask[1, :, 2, :] = torch.finfo(torch.float32).min  # one row with no key
    with use_backend(backend):
        got = attention(q, k, v, attn_bias=mask)
    torch.testing.assert_close(got, hf_eager(q, k, v, mask), atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(got[1, :, 2], v[1].mean(dim=-2), atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_fully_masked_rows_are_zero_not_nan(request, backend) -> None:
    if backend == "triton":
        request.getfixturevalue("interpreter")
    q, k, v = make_qkv(2, 2, 6, 4, 64)
    keep = torch.ones(2, 4, dtype=torch.bool)
    keep[1] = False  # batch 1 has no key at all
    bias = torch.zeros(2, 2, 6, 4)
    bias[0, 1, 3] = float("-inf")  # one row masked by a hard -inf bias
    with use_backend(backend):
        padded = attention(q, k, v, key_padding_mask=keep, attn_bias=bias)
        causal = attention(q, k, v, causal=True)  # Sq = 6 > Sk = 4: rows 0, 1 see no key
    assert not padded.isnan().any() and not causal.isnan().any()
    assert padded[1].abs().max() == 0 and padded[0, 1, 3].abs().max() == 0
    assert padded[0, 0].abs().min() > 0  # the other rows are untouched
    assert causal[:, :, :2].abs().max() == 0 and causal[:, :, 2:].abs().min() > 0


def test_broadcast_and_strided_inputs(interpreter) -> None:
    """Stride-0 batch (BLIP-2's Q-Former expands its queries), (1, Sk) masks and 2-D biases: no copies
    needed."""
    b, h, sq, sk, d = 3, 2, 7, 11, 80
    q = torch.randn(1, h, sq, d).expand(b, h, sq, d)
    k, v = (torch.randn(b, h, d, sk).transpose(2, 3) for _ in range(2))  # D-major keys
    kwargs = {"key_padding_mask": torch.tensor([[True] * 8 + [False] * 3]), "attn_bias": torch.randn(sq, sk)}
    torch.testing.assert_close(
        attention_triton(q, k, v, **kwargs), reference_attention(q, k, v, **kwargs), atol=2e-6, rtol=1e-5
    )


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_scale_defaults_to_inverse_sqrt_head_dim(request, backend) -> None:
    if backend == "triton":
        request.getfixturevalue("interpreter")
    q, k, v = make_qkv(1, 2, 5, 5, 64)
    with use_backend(backend):
        default, explicit, other = (
            attention(q, k, v),
            attention(q, k, v, scale=0.125),
            attention(q, k, v, scale=0.5),
        )
    torch.testing.assert_close(default, explicit)
    assert (default - other).abs().max() > 1e-2


def test_empty_query(interpreter) -> None:
    q, k, v = make_qkv(2, 2, 0, 5, 64)
    assert attention_triton(q, k, v).shape == (2, 2, 0, 64)
    assert reference_attention(q, k, v).shape == (2, 2, 0, 64)


# ------------------------------------------------------------------------------------------------------------
# Shape checks: ValueError naming the shapes, from every path


BAD_ARGS = {
    "3-D q": ((torch.randn(2, 5, 64), torch.randn(2, 2, 5, 64), torch.randn(2, 2, 5, 64)), {}, "must be 4-D"),
    "head dims differ": (
        (torch.randn(2, 2, 5, 64), torch.randn(2, 2, 5, 80), torch.randn(2, 2, 5, 80)),
        {},
        "head dim",
    ),
    "k and v differ": (
        (torch.randn(2, 2, 5, 64), torch.randn(2, 2, 5, 64), torch.randn(2, 2, 6, 64)),
        {},
        "same shape",
    ),
    "batch differs": (
        (torch.randn(2, 2, 5, 64), torch.randn(3, 2, 5, 64), torch.randn(3, 2, 5, 64)),
        {},
        "batch",
    ),
    "mask length": (
        (torch.randn(2, 2, 5, 64), torch.randn(2, 2, 7, 64), torch.randn(2, 2, 7, 64)),
        {"key_padding_mask": torch.ones(2, 5, dtype=torch.bool)},
        "key_padding_mask",
    ),
    "bias shape": (
        (torch.randn(2, 2, 5, 64), torch.randn(2, 2, 7, 64), torch.randn(2, 2, 7, 64)),
        {"attn_bias": torch.zeros(2, 1, 5, 5)},
        "attn_bias",
    ),
    "bool bias": (
        (torch.randn(2, 2, 5, 64), torch.randn(2, 2, 7, 64), torch.randn(2, 2, 7, 64)),
        {"attn_bias": torch.ones(2, 1, 5, 7, dtype=torch.bool)},
        "floating",
    ),
}


@pytest.mark.parametrize("case", list(BAD_ARGS))
def test_shape_errors_name_the_shapes(interpreter, case) -> None:
    (q, k, v), kwargs, words = BAD_ARGS[case]
    for run in (attention_triton, reference_attention, attention):
        with pytest.raises(ValueError, match=words) as err:
            run(q, k, v, **kwargs)
        assert f"q {tuple(q.shape)}" in str(err.value)


def test_head_dim_limit(interpreter) -> None:
    q, k, v = make_qkv(1, 1, 2, 2, MAX_HEAD_DIM + 8)
    with pytest.raises(ValueError, match=r"head dim 264 > 256 \(q \(1, 1, 2, 264\)\)"):
        attention_triton(q, k, v)
    assert reference_attention(q, k, v).shape == q.shape  # the reference has no limit
