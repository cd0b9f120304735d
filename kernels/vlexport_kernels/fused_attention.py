"""Fused attention: softmax(q k^T * scale + bias, masked) v in one kernel, flash-attention style.

q (B, H, Sq, D), k / v (B, H, Sk, D) -> (B, H, Sq, D), self or cross attention.

* ``key_padding_mask`` (B, Sk) or (1, Sk), bool / int, 1 = keep (the HF ``attention_mask`` convention).
* ``attn_bias``: additive float, broadcastable to (B, H, Sq, Sk): HF eager masks (B, 1, Sq, Sk) or
  (B, 1, 1, Sk) filled with finfo.min, T5's relative position bias (1, H, Sq, Sk).
* ``causal``: end-aligned, query i sees keys j <= i + Sk - Sq (a decode step over a KV cache, Sq <= Sk).

Fully masked rows: a row whose every key is masked out (key_padding_mask, causal, or a bias of -inf)
has no softmax; its output is 0, never NaN. A *finite* bias is only a number: a row masked by HF's
finfo.min everywhere gets the mean of v over its keys, exactly as HF eager attention (which adds the
mask and softmaxes) gives it. The ONNX translation follows the same rules except for rows masked
only by -inf biases (ONNX Runtime gives the mean of v there; HF never builds such masks).

Three layers: the private ``@triton.jit`` body, the launcher ``attention_triton`` (checks, block sizes,
grid), and the ``vlexport::attention`` torch op that dispatches between it and ``reference_attention``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._backend import tl, triton, use_triton
from ._shapes import broadcast_mismatch, known_ne

# ------------------------------------------------------------------------------------------------------------
# Kernel

if triton is not None:

    @triton.jit
    def _attention_fwd_kernel(
        q_ptr,  # (B, H, Sq, D), any strides
        k_ptr,  # (B, H, Sk, D), any strides (stride 0 on broadcast batch / heads is fine)
        v_ptr,  # (B, H, Sk, D), any strides
        bias_ptr,  # (B, H, Sq, Sk) additive float, stride 0 on broadcast dims; read only if HAS_BIAS
        mask_ptr,  # (B, Sk) uint8, 1 = keep, stride 0 on a broadcast batch; read only if HAS_MASK
        out_ptr,  # (B, H, Sq, D), written once
        stride_qb,
        stride_qh,
        stride_qm,
        stride_qd,
        stride_kb,
        stride_kh,
        stride_kn,
        stride_kd,
        stride_vb,
        stride_vh,
        stride_vn,
        stride_vd,
        stride_bb,
        stride_bh,
        stride_bm,
        stride_bn,
        stride_mb,
        stride_mn,
        stride_ob,
        stride_oh,
        stride_om,
        stride_od,
        H,
        Sq,
        Sk,
        D,
        scale,  # softmax scale, applied to q k^T before the bias (as HF eager does)
        SQ_BUCKET,
        SK_BUCKET,  # next powers of two of Sq, Sk: autotuning key only (a config per bucket, not per length)
        HAS_BIAS: tl.constexpr,
        HAS_MASK: tl.constexpr,
        CAUSAL: tl.constexpr,
        DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs (tf32 would miss fp32 tolerances), else None
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        pid_bh = tl.program_id(0)
        pid_m = tl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        row_ok = offs_m < Sq
        d_ok = offs_d < D  # head dims 80 / 88 are padded to BLOCK_D = 128 with zeros

        q_ptrs = (
            q_ptr + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd
        )
        q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        k_base = k_ptr + b * stride_kb + h * stride_kh
        v_base = v_ptr + b * stride_vb + h * stride_vh

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running row max
        l_i = tl.zeros([BLOCK_M], tl.float32)  # running softmax denominator
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

        hi = Sk
        if CAUSAL:
            # Key blocks past the last query row's limit are all masked: skip them.
            hi = tl.minimum(Sk, (pid_m + 1) * BLOCK_M + Sk - Sq)
        for start_n in range(0, hi, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            col_ok = offs_n < Sk
            # (BLOCK_D, BLOCK_N): k^T
            k = tl.load(
                k_base + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                mask=d_ok[:, None] & col_ok[None, :],
                other=0.0,
            )
            s = tl.dot(q, k, input_precision=DOT_PRECISION) * scale
            if HAS_BIAS:
                bias = tl.load(
                    bias_ptr
                    + b * stride_bb
                    + h * stride_bh
                    + offs_m[:, None] * stride_bm
                    + offs_n[None, :] * stride_bn,
                    mask=row_ok[:, None] & col_ok[None, :],
                    other=0.0,
                )
                # Natural-log domain (exp, not exp2): finfo.min * log2(e) would overflow to -inf and
                # turn HF's finite "masked" value into a hard mask.
                s += bias.to(tl.float32)
            keep = col_ok[None, :]
            if HAS_MASK:
                pad = tl.load(mask_ptr + b * stride_mb + offs_n * stride_mn, mask=col_ok, other=0)
                keep = keep & (pad != 0)[None, :]
            if CAUSAL:
                keep = keep & (offs_n[None, :] <= offs_m[:, None] + (Sk - Sq))
            s = tl.where(keep, s, float("-inf"))

            m_new = tl.maximum(m_i, tl.max(s, 1))
            # A row with nothing kept so far has max -inf: shift by 0 instead, so exp gives 0, not NaN.
            m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            correction = tl.exp(m_i - m_shift)
            p = tl.exp(s - m_shift[:, None])
            l_i = l_i * correction + tl.sum(p, 1)
            v = tl.load(
                v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                mask=col_ok[:, None] & d_ok[None, :],
                other=0.0,
            )
            acc = acc * correction[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
            m_i = m_new

        # Fully masked rows: l = 0 and acc = 0 -> output 0.
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        out_ptrs = (
            out_ptr
            + b * stride_ob
            + h * stride_oh
            + offs_m[:, None] * stride_om
            + offs_d[None, :] * stride_od
        )
        tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])

    # CUDA: tuned per (length buckets, head dim, masking, dtype). Shared memory holds a q block and a
    # k and v block per stage; configs that do not fit are skipped by the autotuner.
    ATTENTION_CONFIGS = [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bm in (16, 64, 128)
        for bn in (32, 64, 128)
        for w in (4, 8)
        for s in (2, 3)
    ]

    def _prune_configs(configs: list, named_args: dict, **kwargs) -> list:
        """Query blocks larger than the (bucketed) query length only waste lanes: a decode step (Sq = 1) needs
        16."""
        rows = max(16, named_args["SQ_BUCKET"])
        keys = max(32, named_args["SK_BUCKET"])
        kept = [c for c in configs if c.kwargs["BLOCK_M"] <= rows and c.kwargs["BLOCK_N"] <= keys]
        return kept or configs[:1]

    _attention_fwd_tuned = triton.autotune(
        configs=ATTENTION_CONFIGS,
        key=["SQ_BUCKET", "SK_BUCKET", "BLOCK_D", "HAS_BIAS", "HAS_MASK", "CAUSAL"],
        prune_configs_by={"early_config_prune": _prune_configs},
    )(_attention_fwd_kernel)
else:
    _attention_fwd_kernel = None
    ATTENTION_CONFIGS = []

# The interpreter runs one program at a time in Python: one fixed config, and large blocks (fewer programs
# and loop trips) are what make it fast; autotuning there would only multiply the run time.
INTERPRETER_BLOCK_M = 64
INTERPRETER_BLOCK_N = 128
MAX_HEAD_DIM = 256  # q, k and v blocks of BLOCK_D columns live in registers / shared memory


# ------------------------------------------------------------------------------------------------------------
# Checks shared by every path


def _check_attention_args(
    q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, attn_bias: Tensor | None
) -> None:
    """ValueError naming the shapes when the arguments cannot describe one attention (never guards symbolic
    dims)."""
    shapes = (
        f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        + (f", key_padding_mask {tuple(key_padding_mask.shape)}" if key_padding_mask is not None else "")
        + (f", attn_bias {tuple(attn_bias.shape)}" if attn_bias is not None else "")
    )
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"attention: q, k, v must be 4-D (B, H, S, D); got {shapes}")
    if k.shape != v.shape and any(known_ne(a, b) for a, b in zip(k.shape, v.shape)):
        raise ValueError(f"attention: k and v must have the same shape (B, H, Sk, D); got {shapes}")
    if any(known_ne(q.shape[i], k.shape[i]) for i in (0, 1, 3)):
        raise ValueError(f"attention: q and k must agree on batch, heads and head dim; got {shapes}")
    if not (q.dtype == k.dtype == v.dtype) or not q.is_floating_point():
        raise ValueError(
            f"attention: q, k, v must share one floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}; {shapes}"
        )
    if any(t is not None and t.device != q.device for t in (k, v, key_padding_mask, attn_bias)):
        raise ValueError(f"attention: every tensor must be on q's device {q.device}; got {shapes}")
    if key_padding_mask is not None and (
        key_padding_mask.dim() != 2
        or broadcast_mismatch(tuple(key_padding_mask.shape[:1]), (q.shape[0],))
        or known_ne(key_padding_mask.shape[1], k.shape[2])
    ):
        raise ValueError(f"attention: key_padding_mask must be (B, Sk) or (1, Sk); got {shapes}")
    if attn_bias is not None:
        if not attn_bias.is_floating_point():
            raise ValueError(
                f"attention: attn_bias is additive and must be floating, got {attn_bias.dtype} "
                f"(pass boolean keep-masks as key_padding_mask); {shapes}"
            )
        target = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        if attn_bias.dim() < 2 or broadcast_mismatch(tuple(attn_bias.shape), target):
            raise ValueError(
                f"attention: attn_bias must broadcast to (B, H, Sq, Sk) = {tuple(target)}; got {shapes}"
            )


# ------------------------------------------------------------------------------------------------------------
# Reference


def reference_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    key_padding_mask: Tensor | None = None,
    attn_bias: Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
) -> Tensor:
    """Plain PyTorch, the same math as the kernel (fp32 throughout, 0 for fully masked rows)."""
    _check_attention_args(q, k, v, key_padding_mask, attn_bias)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if attn_bias is not None:
        scores = scores + attn_bias.float()
    keep = None
    if key_padding_mask is not None:
        keep = key_padding_mask.bool()[:, None, None, :]
    if causal:
        sq, sk = q.shape[-2], k.shape[-2]
        rows = torch.arange(sq, device=q.device)[:, None]
        cols = torch.arange(sk, device=q.device)[None, :]
        tril = cols <= rows + (sk - sq)  # end-aligned: the last query row sees every key
        keep = tril if keep is None else keep & tril
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True)
    # no NaN on empty rows
    row_max = torch.where(row_max == float("-inf"), torch.zeros_like(row_max), row_max)
    p = torch.exp(scores - row_max)
    denom = p.sum(dim=-1, keepdim=True)
    out = torch.matmul(p, v.float()) / torch.where(denom == 0, torch.ones_like(denom), denom)
    return out.to(q.dtype)


# ------------------------------------------------------------------------------------------------------------
# Launcher


def attention_triton(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    key_padding_mask: Tensor | None = None,
    attn_bias: Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
) -> Tensor:
    """Launch the Triton kernel (CUDA, or CPU under TRITON_INTERPRET=1). No copies of q, k, v: strides go
    in."""
    if _attention_fwd_kernel is None:
        raise RuntimeError("attention_triton: triton is not installed")
    _check_attention_args(q, k, v, key_padding_mask, attn_bias)
    batch, heads, sq, head_dim = q.shape
    sk = k.shape[2]
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(
            f"attention_triton: head dim {head_dim} > {MAX_HEAD_DIM} (q {tuple(q.shape)}); "
            "use the reference backend"
        )
    scale = head_dim**-0.5 if scale is None else float(scale)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out

    # Broadcast dims become stride-0 views: nothing is materialised at (B, H, Sq, Sk).
    bias = mask = None
    if attn_bias is not None:
        bias = attn_bias.reshape((1,) * (4 - attn_bias.dim()) + tuple(attn_bias.shape)).expand(
            batch, heads, sq, sk
        )
    if key_padding_mask is not None:
        keep = key_padding_mask if key_padding_mask.dtype == torch.bool else key_padding_mask != 0
        mask = keep.view(torch.uint8).expand(batch, sk)
    bias_strides = bias.stride() if bias is not None else (0, 0, 0, 0)
    mask_strides = mask.stride() if mask is not None else (0, 0)

    block_d = max(16, triton.next_power_of_2(head_dim))
    args = (
        q,
        k,
        v,
        bias if bias is not None else q,
        mask if mask is not None else q,
        out,
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *bias_strides,
        *mask_strides,
        *out.stride(),
        heads,
        sq,
        sk,
        head_dim,
        scale,
        triton.next_power_of_2(sq),
        triton.next_power_of_2(sk),
    )
    flags = {
        "HAS_BIAS": bias is not None,
        "HAS_MASK": mask is not None,
        "CAUSAL": bool(causal),
        "DOT_PRECISION": "ieee" if q.dtype == torch.float32 else None,
        "BLOCK_D": block_d,
    }

    if q.device.type == "cpu":  # the interpreter
        block_m = min(INTERPRETER_BLOCK_M, max(16, triton.next_power_of_2(sq)))
        block_n = min(INTERPRETER_BLOCK_N, max(16, triton.next_power_of_2(sk)))
        grid = (batch * heads, triton.cdiv(sq, block_m))
        _attention_fwd_kernel[grid](*args, **flags, BLOCK_M=block_m, BLOCK_N=block_n)
        return out

    def grid(meta: dict) -> tuple[int, int]:
        # Batch x heads on axis 0 (2^31 - 1 programs); query blocks on axis 1 (65535 * BLOCK_M rows).
        return (batch * heads, triton.cdiv(sq, meta["BLOCK_M"]))

    with torch.cuda.device(q.device):
        _attention_fwd_tuned[grid](*args, **flags)
    return out


# ------------------------------------------------------------------------------------------------------------
# Torch op: traceable by torch.export / torch.compile (no graph break), translated to ONNX by
# onnx_translation.py


@torch.library.custom_op("vlexport::attention", mutates_args=())
def _attention_op(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_padding_mask: Tensor | None = None,
    attn_bias: Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
) -> Tensor:
    impl = attention_triton if use_triton(q.device, _attention_fwd_kernel) else reference_attention
    return impl(q, k, v, key_padding_mask=key_padding_mask, attn_bias=attn_bias, causal=causal, scale=scale)


@_attention_op.register_fake
def _attention_fake(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_padding_mask: Tensor | None = None,
    attn_bias: Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
) -> Tensor:
    _check_attention_args(q, k, v, key_padding_mask, attn_bias)
    return torch.empty_like(q, memory_format=torch.contiguous_format)


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    key_padding_mask: Tensor | None = None,
    attn_bias: Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
) -> Tensor:
    """softmax(q k^T * scale + attn_bias, masked) v: (B,H,Sq,D) x (B,H,Sk,D) -> (B,H,Sq,D).

    ``scale`` defaults to D ** -0.5. See the module docstring for masks, causality and fully masked rows.
    Runs as ``torch.ops.vlexport.attention``; ``use_backend`` picks the implementation.
    """
    return _attention_op(
        q, k, v, key_padding_mask, attn_bias, bool(causal), None if scale is None else float(scale)
    )
