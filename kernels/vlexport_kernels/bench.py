"""GPU micro-benchmark of the fused kernels at the shapes of the models vlexport ships.

    python -m vlexport_kernels.bench --json out.json [--only attention|add_layer_norm] [--dtype fp16]
    [--dry-run]

Attention, ours vs HF eager math (matmul + softmax + matmul, as BridgeTower / BLIP run it) and torch SDPA's
flash / memory-efficient backends where they accept the case; add + LayerNorm, ours vs eager ``layer_norm(x +
r)``. Timed with ``triton.testing.do_bench`` (CUDA events, after warm-up and, for our kernels, after
autotuning). Each row also records the max abs difference from the eager output. Needs CUDA and triton: exits
2 with a message otherwise. ``--dry-run`` runs every step on the CPU instead (TRITON_INTERPRET=1, each case
shrunk to a few rows, wall-clock timing): it proves the script and its JSON, not the kernels' speed
(benchmarks/gpu_suite.sh --dry-run, run in CI).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
QUANTILES = [0.5, 0.2, 0.8]  # do_bench returns them in this order: p50, p20, p80


@dataclass
class BenchRow:
    name: str  # the model the shape comes from
    shape: dict[str, int]
    impl: str  # vlexport | eager | sdpa_flash | sdpa_efficient
    ms_p50: float
    ms_p20: float
    ms_p80: float
    max_abs_err: float  # vs the eager output on the same inputs
    dtype: str
    device: str
    torch: str
    triton: str
    timestamp: float = field(default_factory=time.time)


@dataclass(frozen=True)
class AttentionCase:
    name: str
    batch: int
    heads: int
    q_len: int
    kv_len: int
    head_dim: int
    padded: bool  # an HF additive padding mask (B, 1, 1, Sk) with the last 10% of keys masked


@dataclass(frozen=True)
class LayerNormCase:
    name: str
    rows: int  # batch * sequence
    hidden: int


def attention_cases() -> Iterator[AttentionCase]:
    for batch in (1, 32):
        for seq in (40, 325):  # text tokens / 2 + 1 + 324 image patches
            yield AttentionCase("bridgetower-base", batch, 12, seq, seq, 64, padded=True)
    for batch in (1, 2, 4, 8):
        yield AttentionCase("blip2-vit-g", batch, 16, 257, 257, 88, padded=False)
    for batch in (1, 8):
        for kv in (128, 512):
            yield AttentionCase("opt-2.7b-decode", batch, 32, 1, kv, 80, padded=False)


def layer_norm_cases() -> Iterator[LayerNormCase]:
    for rows in (32 * 40, 32 * 325):
        yield LayerNormCase("bridgetower-base", rows, 768)
    for rows in (257, 8 * 257):
        yield LayerNormCase("blip2-vit-g", rows, 1408)
    for rows in (8, 8 * 128):  # decode step / prefill
        yield LayerNormCase("opt-2.7b", rows, 2560)


def eager_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """HF eager attention (BridgeTower / BLIP): scores, additive mask, fp32 softmax, probs @ v."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if bias is not None:
        scores = scores + bias
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v)


def sdpa(backend: Any) -> Callable[..., torch.Tensor]:
    from torch.nn.attention import sdpa_kernel

    def run(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, scale: float
    ) -> torch.Tensor:
        with sdpa_kernel([backend]):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)

    return run


def attention_impls() -> dict[str, Callable[..., torch.Tensor]]:
    from torch.nn.attention import SDPBackend

    from vlexport_kernels.fused_attention import attention_triton

    def ours(q, k, v, bias, scale):  # the launcher, not the op: no dispatcher overhead in the timing
        return attention_triton(q, k, v, attn_bias=bias, scale=scale)

    return {
        "vlexport": ours,
        "eager": eager_attention,
        "sdpa_flash": sdpa(SDPBackend.FLASH_ATTENTION),
        "sdpa_efficient": sdpa(SDPBackend.EFFICIENT_ATTENTION),
    }


def _time(fn: Callable[[], Any], warmup_ms: int, rep_ms: int) -> list[float]:
    if not torch.cuda.is_available():  # --dry-run: CUDA events do not exist; a few wall-clock calls will do
        times = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        quantiles = torch.tensor(QUANTILES, dtype=torch.float64)
        return [float(q) for q in torch.tensor(times, dtype=torch.float64).quantile(quantiles)]
    import triton.testing

    return triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=QUANTILES)


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def bench_attention(
    case: AttentionCase, dtype: torch.dtype, common: dict[str, Any], warmup_ms: int, rep_ms: int
) -> list[BenchRow]:
    device = _device()
    gen = torch.Generator(device=device).manual_seed(0)
    b, h, sq, sk, d = case.batch, case.heads, case.q_len, case.kv_len, case.head_dim
    q = torch.randn(b, h, sq, d, device=device, dtype=dtype, generator=gen)
    k = torch.randn(b, h, sk, d, device=device, dtype=dtype, generator=gen)
    v = torch.randn(b, h, sk, d, device=device, dtype=dtype, generator=gen)
    bias = None
    if case.padded:
        bias = torch.zeros(b, 1, 1, sk, device=device, dtype=dtype)
        bias[..., sk - max(1, sk // 10) :] = torch.finfo(dtype).min
    scale = d**-0.5
    expected = eager_attention(q, k, v, bias, scale)
    shape = {"batch": b, "heads": h, "q_len": sq, "kv_len": sk, "head_dim": d, "padded": int(case.padded)}
    rows = []
    for impl, fn in attention_impls().items():
        try:
            out = fn(q, k, v, bias, scale)  # warm-up, autotuning, and "does this backend take the case?"
        except RuntimeError as exc:  # e.g. flash attention with an arbitrary mask
            print(f"  skip {case.name} {shape} {impl}: {str(exc).splitlines()[0][:100]}", file=sys.stderr)
            continue
        err = (out.float() - expected.float()).abs().max().item()
        p50, p20, p80 = _time(lambda fn=fn: fn(q, k, v, bias, scale), warmup_ms, rep_ms)
        rows.append(BenchRow(case.name, shape, impl, p50, p20, p80, err, **common))
    return rows


def bench_layer_norm(
    case: LayerNormCase, dtype: torch.dtype, common: dict[str, Any], warmup_ms: int, rep_ms: int
) -> list[BenchRow]:
    from vlexport_kernels.fused_add_layer_norm import add_layer_norm_triton

    device = _device()
    gen = torch.Generator(device=device).manual_seed(0)
    x, r = (torch.randn(case.rows, case.hidden, device=device, dtype=dtype, generator=gen) for _ in range(2))
    weight = torch.randn(case.hidden, device=device, dtype=dtype, generator=gen)
    bias = torch.randn(case.hidden, device=device, dtype=dtype, generator=gen)
    eps = 1e-12  # BridgeTower / BERT's layer_norm_eps

    impls = {
        "vlexport": lambda: add_layer_norm_triton(x, r, weight, bias, eps),
        "eager": lambda: torch.nn.functional.layer_norm(x + r, (case.hidden,), weight, bias, eps),
    }
    expected = impls["eager"]()
    shape = {"rows": case.rows, "hidden": case.hidden}
    rows = []
    for impl, fn in impls.items():
        err = (fn().float() - expected.float()).abs().max().item()
        p50, p20, p80 = _time(fn, warmup_ms, rep_ms)
        rows.append(BenchRow(case.name, shape, impl, p50, p20, p80, err, **common))
    return rows


def _shrunk_attention(case: AttentionCase) -> AttentionCase:
    """The case at interpreter size: same head_dim (88 stays a non-power of two) and masking, few rows."""
    return dataclasses.replace(
        case, batch=1, heads=min(case.heads, 2), q_len=min(case.q_len, 8), kv_len=min(case.kv_len, 8)
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vlexport_kernels.bench", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--json", metavar="FILE", help="write the rows as a JSON list")
    parser.add_argument("--only", choices=("attention", "add_layer_norm"), help="one kernel only")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp16")
    parser.add_argument("--warmup-ms", type=int, default=25)
    parser.add_argument("--rep-ms", type=int, default=100)
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="every step on the CPU with shrunk cases (TRITON_INTERPRET=1): checks the script, not the speed",
    )
    args = parser.parse_args(argv)

    if args.dry_run:
        if os.environ.get("TRITON_INTERPRET") != "1":
            print(
                "vlexport_kernels.bench --dry-run: set TRITON_INTERPRET=1 (before Python starts) so the "
                "Triton "
                "kernels run on the CPU.",
                file=sys.stderr,
            )
            return 2
    elif not torch.cuda.is_available():
        print(
            "vlexport_kernels.bench: needs a CUDA GPU (torch.cuda.is_available() is False); "
            "the kernels' CPU tests are in tests/kernels.",
            file=sys.stderr,
        )
        return 2
    try:
        import triton
    except ImportError:
        print("vlexport_kernels.bench: needs triton (pip install 'vlexport[kernels]').", file=sys.stderr)
        return 2

    # The interpreter runs fp16 on the CPU too, but slowly: a dry run checks the code path in fp32.
    dtype = torch.float32 if args.dry_run else DTYPES[args.dtype]
    device = "cpu (dry run)" if args.dry_run else torch.cuda.get_device_name()
    common = {
        "dtype": "fp32" if args.dry_run else args.dtype,
        "device": device,
        "torch": torch.__version__,
        "triton": triton.__version__,
    }
    rows: list[BenchRow] = []
    if args.only in (None, "attention"):
        cases = attention_cases()
        for case in dict.fromkeys(map(_shrunk_attention, cases)) if args.dry_run else cases:
            rows += bench_attention(case, dtype, common, args.warmup_ms, args.rep_ms)
    if args.only in (None, "add_layer_norm"):
        cases = layer_norm_cases()
        for case in dict.fromkeys(dataclasses.replace(c, rows=8) for c in cases) if args.dry_run else cases:
            rows += bench_layer_norm(case, dtype, common, args.warmup_ms, args.rep_ms)

    for row in rows:
        dims = " ".join(f"{k}={v}" for k, v in row.shape.items())
        print(
            f"{row.name:18} {dims:58} {row.impl:15} p50 {row.ms_p50:8.4f} ms  "
            f"[p20 {row.ms_p20:.4f}, p80 {row.ms_p80:.4f}]  err {row.max_abs_err:.2e}"
        )
    if args.json:
        meta = {"python": platform.python_version()}
        with open(args.json, "w") as f:
            json.dump([{**asdict(row), **meta} for row in rows], f, indent=1)
        print(f"wrote {len(rows)} rows to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
