"""Fused add + LayerNorm: LayerNorm(alpha * x + residual_scale * residual) over the last dim, one pass.

Post-norm residual blocks (BERT-style ``LayerNorm(dropout(dense(h)) + input)``) and BridgeTower's link
tower (transformers' ``BridgeTowerLinkTower``):

* ``add``:         LayerNorm(hidden + cross)                       -> alpha=1, residual_scale=1
* ``scaled_add``:  LayerNorm(hidden * scaled_factor + cross)       -> alpha=scaled_factor
* ``interpolate``: LayerNorm(hidden * (1 - beta) + cross * beta)   -> alpha=1 - beta, residual_scale=beta

alpha and residual_scale are Python floats (baked into the graph when exported). BridgeTower keeps
scaled_factor / beta as nn.Parameters: multiply by the tensor outside the op to keep them as weights.

Statistics in fp32 whatever the input dtype; the output is cast once, to x's dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._backend import tl, triton, use_triton
from ._shapes import known_ne

# ------------------------------------------------------------------------------------------------------------
# Kernel

if triton is not None:

    @triton.jit
    def _add_layer_norm_fwd_kernel(
        x_ptr,  # (N, C), row stride stride_x, unit column stride
        r_ptr,  # (N, C) residual, row stride stride_r, unit column stride
        w_ptr,  # (C,) LayerNorm weight
        b_ptr,  # (C,) LayerNorm bias; read only if HAS_BIAS
        out_ptr,  # (N, C), row stride stride_out
        stride_x,
        stride_r,
        stride_out,
        N,
        C,
        eps,
        alpha,
        residual_scale,
        HAS_BIAS: tl.constexpr,
        SCALED: tl.constexpr,  # alpha != 1 or residual_scale != 1: skip two multiplies in the common case
        ROWS: tl.constexpr,  # rows per program: short rows (C = 32..256) would leave most lanes idle
        BLOCK_C: tl.constexpr,  # next power of two >= C; columns past C are masked
    ):
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK_C)
        row_ok = rows < N
        col_ok = cols < C
        ok = row_ok[:, None] & col_ok[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        r = tl.load(r_ptr + rows[:, None] * stride_r + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        if SCALED:
            z = x * alpha + r * residual_scale
        else:
            z = x + r
        mean = tl.sum(z, axis=1) / C
        centered = tl.where(ok, z - mean[:, None], 0.0)  # padded columns must not count in the variance
        var = tl.sum(centered * centered, axis=1) / C
        rstd = 1.0 / tl.sqrt(var + eps)
        w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        y = centered * rstd[:, None] * w[None, :]
        if HAS_BIAS:
            y += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(
            out_ptr + rows[:, None] * stride_out + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=ok
        )

    # CUDA: a row of up to 4096 columns fits one program; short rows (C = 32..256) share a program.
    ADD_LAYER_NORM_CONFIGS = [
        triton.Config({"ROWS": rows}, num_warps=warps)
        for rows in (1, 2, 4, 8, 16, 32, 64)
        for warps in (1, 2, 4, 8, 16)
    ]

    def _prune_configs(configs: list, named_args: dict, **kwargs) -> list:
        """Keep blocks of 512..32768 elements: smaller waste the launch, larger spill registers."""
        block_c = kwargs["BLOCK_C"]
        kept = [
            c
            for c in configs
            if 512 <= c.kwargs["ROWS"] * block_c <= 32768
            and 32 * c.num_warps <= max(32, c.kwargs["ROWS"] * block_c // 4)
        ]
        return kept or [min(configs, key=lambda c: (c.kwargs["ROWS"], c.num_warps))]

    _add_layer_norm_fwd_tuned = triton.autotune(
        configs=ADD_LAYER_NORM_CONFIGS,
        key=["BLOCK_C", "HAS_BIAS", "SCALED"],
        prune_configs_by={"early_config_prune": _prune_configs},
    )(_add_layer_norm_fwd_kernel)
else:
    _add_layer_norm_fwd_kernel = None
    ADD_LAYER_NORM_CONFIGS = []

INTERPRETER_BLOCK_ELEMENTS = 1 << 14  # rows per program in the interpreter: fewer, larger programs are faster
MAX_HIDDEN = 1 << 16  # one row must fit one program's block


# ------------------------------------------------------------------------------------------------------------
# Checks shared by every path


def _check_add_layer_norm_args(x: Tensor, residual: Tensor, weight: Tensor, bias: Tensor | None) -> None:
    """ValueError naming the shapes when they do not describe one LayerNorm over x's last dim."""
    shapes = f"x {tuple(x.shape)}, residual {tuple(residual.shape)}, weight {tuple(weight.shape)}" + (
        f", bias {tuple(bias.shape)}" if bias is not None else ""
    )
    if (
        x.dim() < 1
        or x.dim() != residual.dim()
        or any(known_ne(a, b) for a, b in zip(x.shape, residual.shape))
    ):
        raise ValueError(f"add_layer_norm: x and residual must have the same shape; got {shapes}")
    hidden = x.shape[-1]
    if weight.dim() != 1 or known_ne(weight.shape[0], hidden):
        raise ValueError(f"add_layer_norm: weight must be (C,) with C = x.shape[-1]; got {shapes}")
    if bias is not None and (bias.dim() != 1 or known_ne(bias.shape[0], hidden)):
        raise ValueError(f"add_layer_norm: bias must be (C,) with C = x.shape[-1]; got {shapes}")
    if any(t is not None and t.device != x.device for t in (residual, weight, bias)):
        raise ValueError(f"add_layer_norm: every tensor must be on x's device {x.device}; got {shapes}")
    if not x.is_floating_point() or not residual.is_floating_point():
        raise ValueError(
            f"add_layer_norm: x and residual must be floating, got {x.dtype}, {residual.dtype}; {shapes}"
        )


# ------------------------------------------------------------------------------------------------------------
# Reference


def reference_add_layer_norm(
    x: Tensor,
    residual: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    *,
    alpha: float = 1.0,
    residual_scale: float = 1.0,
) -> Tensor:
    """Plain PyTorch: fp32 sum and statistics, output in x's dtype."""
    _check_add_layer_norm_args(x, residual, weight, bias)
    xf, rf = x.float(), residual.float()
    # Multiply only when scaled, so the common case is bit-identical to eager LayerNorm(x + residual).
    z = (xf if alpha == 1.0 else xf * alpha) + (rf if residual_scale == 1.0 else rf * residual_scale)
    out = torch.nn.functional.layer_norm(
        z, (x.shape[-1],), weight.float(), None if bias is None else bias.float(), eps
    )
    return out.to(x.dtype)


# ------------------------------------------------------------------------------------------------------------
# Launcher


def add_layer_norm_triton(
    x: Tensor,
    residual: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    *,
    alpha: float = 1.0,
    residual_scale: float = 1.0,
) -> Tensor:
    """Launch the Triton kernel (CUDA, or CPU under TRITON_INTERPRET=1) on x viewed as (N, C)."""
    if _add_layer_norm_fwd_kernel is None:
        raise RuntimeError("add_layer_norm_triton: triton is not installed")
    _check_add_layer_norm_args(x, residual, weight, bias)
    hidden = x.shape[-1]
    if hidden > MAX_HIDDEN:
        raise ValueError(
            f"add_layer_norm_triton: hidden size {hidden} > {MAX_HIDDEN} (x {tuple(x.shape)}); "
            "use the reference backend"
        )
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    # (N, C) views with unit column stride; reshape copies only when the last dim is not contiguous.
    x2, r2 = (t.reshape(-1, hidden) for t in (x, residual))
    x2, r2 = (t if t.stride(-1) == 1 else t.contiguous() for t in (x2, r2))
    w, b = weight.contiguous(), None if bias is None else bias.contiguous()
    out2 = out.view(-1, hidden)
    rows = x2.shape[0]
    block_c = triton.next_power_of_2(hidden)
    scaled = alpha != 1.0 or residual_scale != 1.0
    args = (
        x2,
        r2,
        w,
        b if b is not None else w,
        out2,
        x2.stride(0),
        r2.stride(0),
        out2.stride(0),
        rows,
        hidden,
        float(eps),
        float(alpha),
        float(residual_scale),
    )
    flags = {"HAS_BIAS": b is not None, "SCALED": scaled, "BLOCK_C": block_c}

    if x.device.type == "cpu":  # the interpreter
        rows_per_program = max(1, min(triton.next_power_of_2(rows), INTERPRETER_BLOCK_ELEMENTS // block_c))
        _add_layer_norm_fwd_kernel[(triton.cdiv(rows, rows_per_program),)](
            *args, **flags, ROWS=rows_per_program
        )
        return out

    with torch.cuda.device(x.device):
        _add_layer_norm_fwd_tuned[lambda meta: (triton.cdiv(rows, meta["ROWS"]),)](*args, **flags)
    return out


# ------------------------------------------------------------------------------------------------------------
# Torch op: traceable by torch.export / torch.compile (no graph break), translated to ONNX by
# onnx_translation.py


@torch.library.custom_op("vlexport::add_layer_norm", mutates_args=())
def _add_layer_norm_op(
    x: Tensor,
    residual: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    eps: float,
    alpha: float = 1.0,
    residual_scale: float = 1.0,
) -> Tensor:
    impl = (
        add_layer_norm_triton
        if use_triton(x.device, _add_layer_norm_fwd_kernel)
        else reference_add_layer_norm
    )
    return impl(x, residual, weight, bias, eps, alpha=alpha, residual_scale=residual_scale)


@_add_layer_norm_op.register_fake
def _add_layer_norm_fake(
    x: Tensor,
    residual: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    eps: float,
    alpha: float = 1.0,
    residual_scale: float = 1.0,
) -> Tensor:
    _check_add_layer_norm_args(x, residual, weight, bias)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def add_layer_norm(
    x: Tensor,
    residual: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    *,
    alpha: float = 1.0,
    residual_scale: float = 1.0,
) -> Tensor:
    """LayerNorm(alpha * x + residual_scale * residual) over the last dim, with ``weight`` and ``bias``.

    Runs as ``torch.ops.vlexport.add_layer_norm``; ``use_backend`` picks the implementation.
    """
    return _add_layer_norm_op(x, residual, weight, bias, float(eps), float(alpha), float(residual_scale))
