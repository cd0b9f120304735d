"""The work one benchmark call does, counted once per model and shape: FLOPs, and bytes per decode step.

Encoders: the FLOPs of the eager fp32 forward of each component at the row's batch and sequence
(``torch.utils.flop_counter.FlopCounterMode``: matmuls, convolutions and attention, the ops that set a
model's compute; elementwise ops are not counted, by the usual convention). The forward runs on fake
tensors when the model allows it (no data-dependent control flow), so counting a large batch costs no
real compute; otherwise on real ones. Every backend of the row did that same work, so achieved GFLOP/s
is the count over the backend's p50.

Generation: a decode step is bandwidth-bound, so its work is the bytes it must read (gpt-fast's
convention): the weights of every module one decoder step runs (tied ones once, an embedding table one
row per sample) at the variant's storage width (4 bytes fp32, 2 fp16 / bf16, 1 int8), plus the KV cache
at the step's length (prompt + half the new tokens, the mean over the decode; cross-attention K/V in
full). Achieved GB/s is that over decode ms per token. Counted on the module, not an artifact's file
(ONNX files store tied weights twice and carry the graph).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from vlexport.contracts.family import ComponentSpec
from vlexport.contracts.precision import PrecisionConfig
from vlexport.models.inputs import InputShape


@dataclass
class Work:
    """What one timed call of a row does; ``None`` where it was not counted."""

    flops: float | None = None  # per call, the whole batch
    flops_by_component: dict[str, float] = field(default_factory=dict)
    bytes_per_step: float | None = None  # generation: bytes read per decode step, the whole batch
    method: str = ""  # fake | real (how the forward ran under the counter)


def count_flops(module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[int, str]:
    """(FLOPs of ``module(*args)``, "fake" | "real"): on fake tensors first, real ones when the forward needs
    data."""
    try:
        from torch._subclasses.fake_tensor import FakeTensorMode

        fake = FakeTensorMode(allow_non_fake_inputs=True)  # parameters stay real; they are read as fakes
        with torch.no_grad(), fake:
            fake_args = tuple(fake.from_tensor(a) for a in args)
            with FlopCounterMode(display=False) as counter:
                module(*fake_args)
        return counter.get_total_flops(), "fake"
    except Exception:  # noqa: BLE001  (data-dependent control flow, .item(), nonzero: count on real tensors)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            module(*args)
        return counter.get_total_flops(), "real"


def encoder_work(
    model: Any, components: tuple[ComponentSpec, ...], inputs: Mapping[str, torch.Tensor]
) -> Work:
    """FLOPs of each component's eager fp32 forward on ``inputs`` (the row's shape), and their sum."""
    by: dict[str, float] = {}
    methods = set()
    for spec in components:
        module = spec.build(model).eval()
        flops, how = count_flops(module, tuple(inputs[n] for n in spec.inputs))
        by[spec.name] = float(flops)
        methods.add(how)
    return Work(flops=sum(by.values()), flops_by_component=by, method="/".join(sorted(methods)))


def decoder_spec(components: tuple[ComponentSpec, ...]) -> ComponentSpec | None:
    """The decoder step: the component that takes a past (KV cache)."""
    return next((c for c in components if any(n.startswith("past_key_values.") for n in c.inputs)), None)


def step_weight_elements(
    model: Any, spec: ComponentSpec, example: Mapping[str, torch.Tensor], batch: int
) -> int:
    """Weight elements one decoder step reads: every parameter and buffer of the modules the step runs.

    Counted on the running module, so what the decoder holds but a step does not use (a T5's encoder) is
    left out; tied weights count once (by storage). An embedding table is read one row per sample, not in
    full (an LM head tied to it still reads it all).
    """
    module = spec.build(model).eval()
    read: dict[int, int] = {}  # storage -> elements read

    def hook(mod: nn.Module, _args: Any) -> None:
        for t in (*mod.parameters(recurse=False), *mod.buffers(recurse=False)):
            if not t.is_floating_point():
                continue
            n = batch * mod.embedding_dim if isinstance(mod, nn.Embedding) else t.numel()
            key = t.untyped_storage().data_ptr()
            read[key] = max(read.get(key, 0), n)

    hooks = [m.register_forward_pre_hook(hook) for m in module.modules()]
    try:
        # runs the step (on fake tensors if it can)
        count_flops(module, tuple(example[n] for n in spec.inputs))
    finally:
        for h in hooks:
            h.remove()
    return sum(read.values())


@dataclass
class DecodeShape:
    """What one decode step of a decoder reads at one batch, in elements (each variant's dtypes give
    bytes)."""

    weight_elements: int  # weights one step reads
    kv_elements: float  # KV cache read per step at the average decode length, the whole batch


def decode_shape(
    model: Any,
    components: tuple[ComponentSpec, ...],
    batch: int,
    prompt_tokens: int,
    new_tokens: int,
    seed: int = 0,
) -> DecodeShape | None:
    """Weights and KV cache per decode step at ``batch``; None when the task has no decoder component.

    The self-attention cache is read at ``prompt_tokens + new_tokens / 2`` positions (the mean over the
    decode); the example past's length gives elements per position; cross-attention K/V are read in full.
    This assumes the decoder's own cache starts from the prompt (true of decoder-only models; an
    encoder-decoder's starts from one token, so its KV is overestimated by the prompt: small against the
    weights at the batch sizes decode runs at).
    """
    spec = decoder_spec(components)
    if spec is None or spec.example_inputs is None:
        return None
    example = spec.example_inputs(model, InputShape(batch, max(1, prompt_tokens)), seed)
    past = {n: t for n, t in example.items() if n.startswith("past_key_values.")}
    self_past = [t for n, t in past.items() if ".encoder." not in n]
    cross = sum(t.numel() for n, t in past.items() if ".encoder." in n)
    past_len = self_past[0].shape[2] if self_past else 0
    per_position = sum(t.numel() for t in self_past) / past_len if past_len else 0.0
    return DecodeShape(
        step_weight_elements(model, spec, example, batch),
        per_position * (prompt_tokens + new_tokens / 2) + cross,
    )


def step_bytes(shape: DecodeShape, *, weight_bytes: float, activation_bytes: int) -> float:
    """Bytes one decode step of a variant reads: weights at its storage width (1 for int8 schemes, whose
    scales add under 1%), the KV cache at its activation dtype."""
    return float(shape.weight_elements * weight_bytes + shape.kv_elements * activation_bytes)


def storage_bytes(precision: PrecisionConfig) -> tuple[float, int]:
    """(bytes per weight element, bytes per activation element) of a variant at ``precision`` (its config's
    weight bits: 1 byte for int8 schemes, half that for 4-bit ones)."""
    return precision.weight_bytes, precision.activation_bytes
