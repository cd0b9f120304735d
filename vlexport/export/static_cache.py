"""Decoders over a static KV cache (the gpt-fast pattern), for AOTInductor packages.

The ONNX decoder (models/generative.py ``CachedDecoder``) takes a past of any length and returns a longer
present: torch.export cannot relate ``total = past + sequence`` as a dim and AOTInductor would allocate new
caches every step. Here the cache is ``max_length`` slots per layer, fed as inputs ``cache.{i}.key/value``
[batch, heads, max_length, head_dim] that the graph updates **in place** (``index_copy_`` at the slots in
``cache_position``; checked: after an AOTInductor call the caller's buffer holds the update), and the
attention mask is ``attention_mask`` [batch, max_length] over the slots (1: a token is there), made causal in
the graph against ``cache_position``. Only batch, the new-token count and encoder lengths are dynamic: one
package serves the prompt (sequence = prompt length) and every decode step (sequence = 1), and on CUDA
the step can be captured in a CUDA graph per batch bucket (runtime/static_step.py).

The HF modules are called through the family's own step function (``CachedDecoder.static_step``), with a
cache object whose layers write into the slots and a ready 4D additive mask (HF's mask builders pass 4D
masks through unchanged), so no family code is duplicated here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache, EncoderDecoderCache

from vlexport.contracts.family import ComponentSpec
from vlexport.errors import UsageError
from vlexport.models.generative import EXAMPLE_NEW_TOKENS, EXAMPLE_PAST, CachedDecoder, CacheLayout
from vlexport.runtime.static_step import CACHE_POSITION


def cache_names(layout: CacheLayout) -> tuple[str, ...]:
    return tuple(f"cache.{i}.{kv}" for i in range(layout.num_layers) for kv in ("key", "value"))


class SlotLayer(CacheLayerMixin):
    """One layer's static slots: ``update`` writes the new keys/values at ``positions`` and returns all
    slots."""

    is_compileable = True
    is_sliding = False

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor):
        super().__init__()
        self.keys, self.values, self.positions = keys, values, positions
        self.device = keys.device
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        return None

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self.keys.index_copy_(2, self.positions, key_states.to(self.keys.dtype))
        self.values.index_copy_(2, self.positions, value_states.to(self.values.dtype))
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.keys.shape[2], 0

    def get_seq_length(self) -> torch.Tensor:
        # The slot of the first new token = tokens already seen (relative-position models offset by it).
        return self.positions[0]

    def get_max_length(self) -> int:
        return self.keys.shape[2]


class StaticCacheDecoder(nn.Module):
    """``(inputs..., attention_mask [b, L], cache_position [s], cross K/V..., cache...) -> (logits [b, 1,
    V],)``."""

    def __init__(self, decoder: CachedDecoder, input_names: Sequence[str], max_length: int):
        super().__init__()
        self.module = decoder.module
        self.step = decoder.static_step
        self.layout = decoder.layout
        self.input_names = tuple(input_names)
        self.max_length = max_length

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor]:
        named = dict(zip(self.input_names, args))
        positions = named.pop(CACHE_POSITION)
        slots = [named.pop(n) for n in cache_names(self.layout)]
        dtype = slots[0].dtype
        # Causal over the slots: query q (at slot positions[q]) sees slot k when k <= positions[q] and
        # mask[k].
        seen = torch.arange(self.max_length, device=positions.device)[None, :] <= positions[:, None]
        allowed = named["attention_mask"].bool()[:, None, None, :] & seen[None, None, :, :]
        zero = torch.zeros((), dtype=dtype, device=positions.device)
        named["attention_mask"] = torch.where(allowed, zero, torch.finfo(dtype).min)
        layers = [SlotLayer(slots[i], slots[i + 1], positions) for i in range(0, len(slots), 2)]
        cache: Cache = Cache(layers=layers)
        if self.layout.cross:
            cross = [named.pop(n) for n in self.layout.cross_past]
            pairs = [(cross[i], cross[i + 1]) for i in range(0, len(cross), 2)]
            cache = EncoderDecoderCache(cache, DynamicCache(pairs))
            cache.is_updated = {i: True for i in range(self.layout.num_layers)}
            named["encoder_hidden_states"] = cross[0][
                :, 0, :, :1
            ]  # batch and length only (see CachedDecoder)
        out = self.step(self.module, named, cache)
        return (out.logits[:, -1:, :],)


def static_decoder(
    decoder: CachedDecoder,
    spec: ComponentSpec,
    example: Mapping[str, torch.Tensor],
    *,
    max_length: int,
    max_batch: int,
) -> tuple[StaticCacheDecoder, ComponentSpec, dict[str, torch.Tensor]]:
    """The static-cache twin of an ONNX decoder component: module, spec (names, axes, limits) and example."""
    table = spec.axis_max.get("sequence")  # the model's learned position table, where it has one
    if table is not None and max_length > table:
        raise UsageError(
            f"--max-length {max_length} is more than the model's {table} positions "
            "(max_position_embeddings): give at most that many cache slots."
        )
    layout = decoder.layout
    past = set(layout.past)
    family_inputs = [n for n in decoder.input_names if n not in past and n not in layout.cross_past]
    if "attention_mask" not in family_inputs:
        family_inputs.append("attention_mask")
    inputs = (*family_inputs, CACHE_POSITION, *layout.cross_past, *cache_names(layout))
    axes: dict[str, dict[int, str]] = {}
    for name in inputs:
        onnx_axes = spec.dynamic_axes.get(name, {})
        if name == "attention_mask" or name.startswith("cache."):
            axes[name] = {0: "batch"}
        elif name == CACHE_POSITION:
            axes[name] = {0: "sequence"}
        else:
            axes[name] = dict(onnx_axes)
    axes["logits"] = {0: "batch"}
    limits = {**spec.axis_max, "sequence": max_length, "batch": max(2, max_batch)}
    limits.pop("past_sequence", None)
    limits.pop("total_sequence", None)
    static_spec = dataclasses.replace(
        spec, inputs=inputs, outputs=("logits",), dynamic_axes=axes, axis_max=limits
    )
    return (
        StaticCacheDecoder(decoder, inputs, max_length),
        static_spec,
        static_example(example, layout, inputs, max_length),
    )


def static_example(
    example: Mapping[str, torch.Tensor], layout: CacheLayout, inputs: Sequence[str], max_length: int
) -> dict[str, torch.Tensor]:
    """The ONNX decoder's example (``EXAMPLE_NEW_TOKENS`` new tokens after ``EXAMPLE_PAST``) in slot form."""
    if EXAMPLE_PAST + EXAMPLE_NEW_TOKENS >= max_length:
        raise ValueError(f"max_length {max_length} leaves no room for the export example")
    first = next(v for k, v in example.items() if k.startswith("past_key_values.") and ".encoder." not in k)
    batch = first.shape[0]
    out = {k: v for k, v in example.items() if k in inputs and not k.startswith("cache.")}
    mask = torch.zeros(batch, max_length, dtype=torch.long)
    mask[:, : EXAMPLE_PAST + EXAMPLE_NEW_TOKENS] = 1
    mask[-1, :2] = 0  # a padded row, as in the ONNX example
    out["attention_mask"] = mask
    out[CACHE_POSITION] = torch.arange(EXAMPLE_PAST, EXAMPLE_PAST + EXAMPLE_NEW_TOKENS)
    gen = torch.Generator().manual_seed(0)
    for name in cache_names(layout):
        out[name] = torch.randn(
            batch, layout.num_heads, max_length, layout.head_dim, dtype=first.dtype, generator=gen
        )
    return out
