"""Generation benchmarks: prefill time, per-token decode time and tokens/s at a fixed new-token count.

Every generation is forced to decode exactly ``new_tokens`` tokens (min = max new tokens, greedy), so
backends are compared on equal work. Token stamps come from a logits processor, called once per
generated token after that step's forward: the first stamp ends the prefill (vision encoder + prompt),
the gaps between stamps are the decode steps.

Backends plug in through GENERATION_BACKENDS: ``(ctx, precision) -> GenVariant``. ``eager`` is HF
``generate()`` on the eager model; ``onnx`` exports the task's components (encoders, decoder with KV
cache) and runs vlexport.runtime.generate's loop, whose ``on_step`` callback gives the stamps.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import LogitsProcessor, LogitsProcessorList, PreTrainedModel

from vlexport.bench.backends import DTYPES, BenchContext, eager_model
from vlexport.bench.rows import ERROR, FAILED_PARITY, OK, BenchRow, now
from vlexport.bench.timing import MemoryProbe, device_name, latency_stats
from vlexport.errors import UsageError
from vlexport.manifest import library_versions
from vlexport.models.inputs import InputShape, image_size
from vlexport.validate import TOLERANCES


@dataclass
class GenerationTiming:
    total_s: float
    prefill_s: float
    decode_s: list[float]  # one per token after the first
    tokens: np.ndarray  # [batch, new_tokens]: the generated tokens only


@dataclass
class GenVariant:
    backend: str
    precision: str
    prepare: Callable[[dict[str, torch.Tensor]], Any]
    generate: Callable[[Any, int], GenerationTiming]  # (prepared inputs, new tokens) -> timing
    memory: MemoryProbe
    kernels: tuple[str, ...] = ()
    build_s: float = 0.0
    note: str = ""
    close: Callable[[], None] = lambda: None


GenBuilder = Callable[[BenchContext, str], GenVariant]
GENERATION_BACKENDS: dict[str, GenBuilder] = {}


class TokenClock(LogitsProcessor):
    """Stamps the time each token's logits are ready (after a device sync, so the stamp is real)."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"
        self.stamps: list[int] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.cuda:
            torch.cuda.synchronize()
        self.stamps.append(time.perf_counter_ns())
        return scores


def timing_from_stamps(start_ns: int, stamps: list[int], end_ns: int, tokens: np.ndarray) -> GenerationTiming:
    if not stamps:
        raise RuntimeError("generate() produced no token (no logits-processor call)")
    decode = [(b - a) / 1e9 for a, b in zip(stamps, stamps[1:])]
    return GenerationTiming((end_ns - start_ns) / 1e9, (stamps[0] - start_ns) / 1e9, decode, tokens)


def hf_generate_timed(model: PreTrainedModel, inputs: dict[str, torch.Tensor], new_tokens: int, device: str
                      ) -> GenerationTiming:
    """HF ``generate()``, greedy, exactly ``new_tokens`` new tokens, with per-token stamps."""
    clock = TokenClock(device)
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter_ns()
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             num_beams=1, logits_processor=LogitsProcessorList([clock]))
    if device == "cuda":
        torch.cuda.synchronize()
    end = time.perf_counter_ns()
    # Decoder-only models return prompt + new tokens, encoder-decoders only new ones: the tail is common.
    return timing_from_stamps(start, clock.stamps, end, out[:, -new_tokens:].cpu().numpy())


def build_eager_generator(ctx: BenchContext, precision: str) -> GenVariant:
    probe = MemoryProbe(ctx.device)
    before = probe.begin()
    start = time.perf_counter()
    model, close = eager_model(ctx, precision, ctx.kernels)
    probe.add_build(probe.end(before))
    dtype = DTYPES[precision]

    def prepare(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: (v.to(ctx.device, dtype) if v.is_floating_point() else v.to(ctx.device)) for k, v in inputs.items()}

    return GenVariant("eager", precision, prepare, lambda x, n: hf_generate_timed(model, x, n, ctx.device), probe,
                      ctx.kernels, round(time.perf_counter() - start, 3), close=close)


def build_onnx_generator(ctx: BenchContext, precision: str) -> GenVariant:
    """An exported artifact (encoders + decoder with KV cache) through vlexport.runtime.generate.Generator."""
    from vlexport.bench.backends import _export_job, _fp32_only, build_artifact
    from vlexport.pipeline import run_export
    from vlexport.runtime import load_artifact
    from vlexport.runtime.generate import Generator

    _fp32_only("onnx", precision)
    directory, build_s, note = build_artifact(
        ctx, "onnx", lambda out: run_export(_export_job(ctx, out), model=ctx.model), "onnx")
    probe = MemoryProbe(ctx.device, torch_allocator=False)
    before = probe.begin()
    generator = Generator(load_artifact(directory, device=ctx.device, threads=ctx.threads), config=ctx.model.config)
    probe.add_build(probe.end(before))

    def prepare(inputs: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
        return {k: v.numpy() for k, v in inputs.items()}

    def generate(x: dict[str, np.ndarray], n: int) -> GenerationTiming:
        stamps: list[int] = []
        start = time.perf_counter_ns()
        out = generator.generate(**x, max_new_tokens=n, min_new_tokens=n,
                                 on_step=lambda step: stamps.append(time.perf_counter_ns()))
        return timing_from_stamps(start, stamps, time.perf_counter_ns(), out.sequences[:, -n:])

    return GenVariant("onnx", precision, prepare, generate, probe, ctx.kernels, build_s, note=note)


GENERATION_BACKENDS["eager"] = build_eager_generator
GENERATION_BACKENDS["onnx"] = build_onnx_generator


def run_generation_group(plan: Any, group: Any, model: PreTrainedModel, device: str, threads: int, work: Path,
                         progress: Any) -> list[BenchRow]:
    """Generation counterpart of the encoder loop: same interleaving, rows with prefill/decode/tokens/s."""
    task_spec = group.source.family.task(group.task)
    unknown = [b for b in plan.backends if b not in GENERATION_BACKENDS]
    if unknown:
        raise UsageError(f"Backend(s) {unknown} have no generation benchmark; generation backends: "
                         f"{', '.join(GENERATION_BACKENDS)}.")
    components = task_spec.components(model.config)
    ctx = BenchContext(model_name=group.model_arg or group.name, source=group.source, task=group.task,
                       task_spec=task_spec, model=model, component=components[0] if components else None,
                       device=device, threads=threads, work_dir=work, seed=plan.seed, kernels=tuple(plan.kernels),
                       random_weights=group.source.origin.get("kind") == "random", compile_mode=plan.compile_mode,
                       batch_sizes=plan.batch_sizes, seq_len=plan.seq_len, progress=progress.message)
    variants = [GENERATION_BACKENDS["eager"](replace(ctx, kernels=()), "fp32")]
    for backend in plan.backends:
        for precision in plan.precisions:
            if not (backend == "eager" and precision == "fp32" and not plan.kernels):
                variants.append(GENERATION_BACKENDS[backend](ctx, precision))
    vision = getattr(model.config, "vision_config", None)
    common = dict(model=group.name, task=group.task, seq_len=plan.seq_len, new_tokens=plan.new_tokens,
                  image_size=image_size(vision) if vision is not None else None, device=device_name(device),
                  device_kind=device, threads=threads, warmup=plan.warmup, iters=plan.iters,
                  throughput_unit="tokens/s", versions=library_versions(), timestamp=now())
    rows: list[BenchRow] = []
    try:
        for batch in plan.batch_sizes:
            rows += measure_generation(plan, ctx, batch, variants, common, progress)
    finally:
        for v in variants:
            v.close()
    return rows


@dataclass
class _GenLive:
    variant: GenVariant
    row: BenchRow
    prepared: Any = None
    timings: list[GenerationTiming] = field(default_factory=list)


def measure_generation(plan: Any, ctx: BenchContext, batch: int, variants: list[GenVariant], common: dict,
                       progress: Any) -> list[BenchRow]:
    inputs = ctx.task_spec.make_inputs(ctx.model.config, InputShape(batch, plan.seq_len), plan.seed + 1000 + batch)
    n = plan.new_tokens
    live: list[_GenLive] = []
    reference: np.ndarray | None = None
    for i, v in enumerate(variants):
        row = BenchRow(**common, backend=v.backend, precision=v.precision, kernels=",".join(v.kernels), batch=batch,
                       memory_kind=v.memory.kind, build_s=v.build_s, detail=v.note)
        try:
            prepared = v.prepare(inputs)
            before = v.memory.begin()
            first = v.generate(prepared, n)
            v.memory.add_call(v.memory.end(before))
        except Exception as e:
            row.status, row.detail = ERROR, f"run failed: {type(e).__name__}: {str(e)[:200]}"
            live.append(_GenLive(v, row))
            continue
        row.first_call_s = round(first.total_s, 4)
        if i == 0:
            reference = first.tokens
        row.status, row.parity, row.detail = token_parity(first.tokens, reference, v.precision)
        live.append(_GenLive(v, row, prepared))
        progress.advance(1)
    active = [lv for lv in live if lv.row.status == OK]
    for _ in range(plan.warmup):
        for lv in active:
            lv.variant.generate(lv.prepared, n)
            progress.advance(1)
    for i in range(plan.iters):
        k = i % max(1, len(active))
        for lv in active[k:] + active[:k]:
            lv.timings.append(lv.variant.generate(lv.prepared, n))
            progress.advance(1)
    for lv in active:
        row = lv.row
        for key, value in latency_stats([t.total_s for t in lv.timings]).items():
            setattr(row, key, value)
        row.prefill_ms = round(float(np.median([t.prefill_s for t in lv.timings])) * 1e3, 4)
        decode = [d for t in lv.timings for d in t.decode_s]
        row.decode_ms_per_token = round(float(np.median(decode)) * 1e3, 4) if decode else None
        row.throughput = round(batch * n / (row.latency_p50_ms / 1e3), 3)
        row.peak_memory_mb = lv.variant.memory.total_mb
    return [lv.row for lv in live]


def token_parity(tokens: np.ndarray, reference: np.ndarray | None, precision: str) -> tuple[str, dict, str]:
    """fp32 must match eager token for token; reduced precisions need the table's agreement share."""
    if reference is None:
        return ERROR, {}, "the eager fp32 reference failed: no parity baseline"
    if tokens.shape != reference.shape:
        return FAILED_PARITY, {}, f"tokens shape {list(tokens.shape)} != eager {list(reference.shape)}"
    agreement = float((tokens == reference).mean())
    tol = TOLERANCES[precision]
    need = 1.0 if tol.atol is not None else (tol.min_agreement or 1.0)
    report = {"tokens": {"kind": "agreement", "agreement": round(agreement, 4)}}
    if agreement < need:
        return FAILED_PARITY, report, f"tokens agree with eager fp32 on {agreement:.1%} (need {need:.0%})"
    return OK, report, ""
