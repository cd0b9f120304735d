"""Generation calls for the benchmark: prefill time, per-token decode time and tokens/s at a fixed token
count.

Every generation is forced to decode exactly ``new_tokens`` tokens (min = max new tokens, greedy), so
backends are compared on equal work. A generative variant's timed call returns a
:class:`GenerationTiming` built from per-token stamps: the first stamp ends the prefill (vision encoder
+ prompt), the gaps between stamps are the decode steps. Eager stamps come from a logits processor in
HF ``generate()``; artifacts (any backend) run vlexport.runtime.generate's loop, whose ``on_step``
callback gives the stamps. The harness measures these variants like any other (backends.Variant).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from transformers import LogitsProcessor, LogitsProcessorList, PreTrainedModel

from vlexport.bench.rows import ERROR, FAILED_PARITY, OK
from vlexport.contracts.precision import PrecisionConfig

Call = tuple[
    Callable[[dict[str, torch.Tensor]], Any],
    Callable[[Any], "GenerationTiming"],
    Callable[["GenerationTiming"], dict[str, np.ndarray]],
]


@dataclass
class GenerationTiming:
    total_s: float
    prefill_s: float
    decode_s: list[float]  # one per token after the first
    tokens: np.ndarray  # [batch, new_tokens]: the generated tokens only


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
        raise RuntimeError("generate() produced no token (no per-token stamp)")
    decode = [(b - a) / 1e9 for a, b in itertools.pairwise(stamps)]
    return GenerationTiming((end_ns - start_ns) / 1e9, (stamps[0] - start_ns) / 1e9, decode, tokens)


def hf_generate_timed(
    model: PreTrainedModel, inputs: dict[str, torch.Tensor], new_tokens: int, device: str
) -> GenerationTiming:
    """HF ``generate()``, greedy, exactly ``new_tokens`` new tokens, with per-token stamps."""
    clock = TokenClock(device)
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter_ns()
    with torch.no_grad():
        out = model.generate(
            **inputs,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            num_beams=1,
            logits_processor=LogitsProcessorList([clock]),
        )
    if device == "cuda":
        torch.cuda.synchronize()
    end = time.perf_counter_ns()
    # Decoder-only models return prompt + new tokens, encoder-decoders only new ones: the tail is common.
    return timing_from_stamps(start, clock.stamps, end, out[:, -new_tokens:].cpu().numpy())


def _tokens(timing: GenerationTiming) -> dict[str, np.ndarray]:
    return {"tokens": timing.tokens}


def hf_generate_call(
    model: PreTrainedModel, cast: Callable[[torch.Tensor], torch.Tensor], new_tokens: int, device: str
) -> Call:
    """(prepare, call, outputs) of the eager model's ``generate()``; ``cast`` moves an input to dtype and
    device."""

    def prepare(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: cast(v) for k, v in inputs.items()}

    return prepare, lambda x: hf_generate_timed(model, x, new_tokens, device), _tokens


def generator_call(generator: Any, new_tokens: int) -> Call:
    """(prepare, call, outputs) of a loaded artifact's ``runtime.generate.Generator``."""

    def prepare(inputs: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
        return {k: v.numpy() for k, v in inputs.items()}

    def call(x: dict[str, np.ndarray]) -> GenerationTiming:
        stamps: list[int] = []
        start = time.perf_counter_ns()
        out = generator.generate(
            **x,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            on_step=lambda step: stamps.append(time.perf_counter_ns()),
        )
        return timing_from_stamps(start, stamps, time.perf_counter_ns(), out.sequences[:, -new_tokens:])

    return prepare, call, _tokens


def generation_stats(timings: Sequence[GenerationTiming]) -> dict[str, float | None]:
    """Median prefill ms and median decode ms per token over a variant's timed calls."""
    decode = [d for t in timings for d in t.decode_s]
    return {
        "prefill_ms": round(float(np.median([t.prefill_s for t in timings])) * 1e3, 4),
        "decode_ms_per_token": round(float(np.median(decode)) * 1e3, 4) if decode else None,
    }


def token_parity(
    tokens: np.ndarray, reference: np.ndarray | None, precision: PrecisionConfig
) -> tuple[str, dict, str]:
    """Value-exact precisions must match eager fp32 token for token; reduced ones need their agreement
    share."""
    if reference is None:
        return ERROR, {}, "the eager fp32 reference failed: no parity baseline"
    if tokens.shape != reference.shape:
        return FAILED_PARITY, {}, f"tokens shape {list(tokens.shape)} != eager {list(reference.shape)}"
    agreement = float((tokens == reference).mean())
    tol = precision.tolerance
    need = 1.0 if tol.exact_tokens else (tol.min_agreement or 1.0)
    report = {"tokens": {"kind": "agreement", "agreement": round(agreement, 4)}}
    if agreement < need:
        return FAILED_PARITY, report, f"tokens agree with eager fp32 on {agreement:.1%} (need {need:.0%})"
    return OK, report, ""
