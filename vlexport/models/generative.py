"""Shared export pieces for generative tasks: decoders with explicit past key/values, cross-attention K/V.

HF cache objects do not cross a graph boundary, so a decoder is wrapped in a module that takes the past
as flat tensors (``past_key_values.{i}.key/value``, optimum's names), rebuilds DynamicCache /
EncoderDecoderCache inside and returns ``present.{i}.key/value``. One decoder graph serves every step:
the first step feeds a past of length 0 (ONNX Runtime handles the empty dim), so no second
"decoder_with_past" copy of the weights is written.

Cross-attention keys/values of the image (BLIP caption), the question (BLIP VQA) or the T5 encoder
output are projected once by the encoder-side component (outputs ``present.{i}.encoder.key/value``) and
fed to every decoder step as ``past_key_values.{i}.encoder.key/value``: exactly what HF's
EncoderDecoderCache holds after its first step, without re-projecting 577 image tokens per token.

Family modules stay declarative: they name the inputs and give a small ``step`` / ``encode`` function
over the HF modules; names, dynamic axes and example inputs are derived here from the tensor names.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from vlexport.contracts.family import ComponentSpec
from vlexport.models.host import GenerationRecipe, HostStage, past_name  # noqa: F401  (re-exported)
from vlexport.models.inputs import InputShape, generator

if TYPE_CHECKING:  # the runtime reads recipes without transformers (compiled artifacts); export imports it
    from transformers import PretrainedConfig, PreTrainedModel
    from transformers.cache_utils import Cache

# Example sizes for decoder exports: all different from each other and from the batch (2), so
# torch.export never unifies two dynamic dims by coincidence; none is 0 or 1 (those specialise).
EXAMPLE_NEW_TOKENS = 3
EXAMPLE_PAST = 5
EXAMPLE_ENCODER_SEQUENCE = 7


@dataclass(frozen=True)
class CacheLayout:
    """Shape of a decoder's KV cache: one self-attention key/value pair per layer, plus cross-attention."""

    num_layers: int
    num_heads: int
    head_dim: int
    cross: bool = False  # the decoder also takes cross-attention keys/values (past_key_values.{i}.encoder.*)

    @property
    def past(self) -> tuple[str, ...]:
        return tuple(f"past_key_values.{i}.{kv}" for i in range(self.num_layers) for kv in ("key", "value"))

    @property
    def cross_past(self) -> tuple[str, ...]:
        if not self.cross:
            return ()
        return tuple(
            f"past_key_values.{i}.encoder.{kv}" for i in range(self.num_layers) for kv in ("key", "value")
        )

    @property
    def present(self) -> tuple[str, ...]:
        return tuple(f"present.{i}.{kv}" for i in range(self.num_layers) for kv in ("key", "value"))

    @property
    def cross_present(self) -> tuple[str, ...]:
        """Outputs of the encoder-side component that become the decoder's cross-attention inputs."""
        return tuple(f"present.{i}.encoder.{kv}" for i in range(self.num_layers) for kv in ("key", "value"))


# ---------------------------------------------------------------- axes, by tensor name
_SEQ = {0: "batch", 1: "sequence"}
_AXES_BY_NAME: dict[str, dict[int, str]] = {
    "pixel_values": {0: "batch"},
    "input_ids": _SEQ,
    "position_ids": _SEQ,
    "image_mask": _SEQ,
    "image_embeds": _SEQ,
    "query_embeds": {0: "batch"},
    "logits": {0: "batch"},
    "encoder_attention_mask": {0: "batch", 1: "encoder_sequence"},
}


def axes_for(
    names: Sequence[str], *, decoder: bool, overrides: Mapping[str, Mapping[int, str]] | None = None
) -> dict[str, dict[int, str]]:
    """Dynamic axes from tensor names. In a decoder the attention mask spans past + new tokens: its own dim
    ("total_sequence"), not an expression of two dims (docs/ARCHITECTURE.md, "Pitfalls")."""
    axes: dict[str, dict[int, str]] = {}
    for name in names:
        if name.startswith("past_key_values.") and ".encoder." in name:
            axes[name] = {0: "batch", 2: "encoder_sequence"}
        elif name.startswith("past_key_values."):
            axes[name] = {0: "batch", 2: "past_sequence"}
        elif name.startswith("present.") and ".encoder." in name:
            axes[name] = {0: "batch", 2: "sequence"}
        elif name.startswith("present."):
            axes[name] = {0: "batch", 2: "total_sequence"}
        elif name == "attention_mask":
            axes[name] = {0: "batch", 1: "total_sequence"} if decoder else _SEQ
        elif name in _AXES_BY_NAME:
            axes[name] = dict(_AXES_BY_NAME[name])
    axes.update({k: dict(v) for k, v in (overrides or {}).items()})
    return axes


# ---------------------------------------------------------------- wrappers
Step = Callable[[nn.Module, dict[str, torch.Tensor], "Cache"], Any]
Encode = Callable[[nn.Module, dict[str, torch.Tensor]], Any]


class NamedCall(nn.Module):
    """``forward(*inputs) -> tuple``: ``fn(module, named_inputs)``, with the module's parameters
    registered."""

    def __init__(self, module: nn.Module, fn: Encode, input_names: Sequence[str]):
        super().__init__()
        self.module = module
        self.fn = fn
        self.input_names = tuple(input_names)

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.fn(self.module, dict(zip(self.input_names, args)))
        return tuple(out) if isinstance(out, (tuple, list)) else (out,)


class CachedDecoder(nn.Module):
    """A decoder step over flat past tensors: ``(inputs..., past...) -> (logits of the last position,
    present...)``.

    ``step(module, named_inputs, cache)`` calls the HF decoder with ``past_key_values=cache, use_cache=True``
    and returns its output (``.logits``, ``.past_key_values``). When the layout has cross-attention, the
    cache is an EncoderDecoderCache whose cross part is already filled (``is_updated``), so the HF
    attention reads keys/values from it; ``named_inputs["encoder_hidden_states"]`` is then a stand-in
    carrying only batch and length (HF checks it for None and reads its shape for the mask, never its values).
    ``static_step`` is how the family calls the same module over a static cache (export/static_cache.py: the
    mask arrives 4D over the cache slots); it defaults to ``step``.
    """

    def __init__(
        self,
        module: nn.Module,
        step: Step,
        input_names: Sequence[str],
        layout: CacheLayout,
        static_step: Step | None = None,
    ):
        super().__init__()
        self.module = module
        self.step = step
        self.static_step = static_step or step
        self.input_names = tuple(input_names)
        self.layout = layout

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        from transformers.cache_utils import DynamicCache, EncoderDecoderCache

        named = dict(zip(self.input_names, args))
        self_cache = DynamicCache(_pairs([named.pop(n) for n in self.layout.past]))
        cache: Cache = self_cache
        if self.layout.cross:
            cross = [named.pop(n) for n in self.layout.cross_past]
            cache = EncoderDecoderCache(self_cache, DynamicCache(_pairs(cross)))
            key0 = cross[0]  # [batch, heads, encoder_sequence, head_dim]
            named["encoder_hidden_states"] = key0[:, 0, :, :1]  # [batch, encoder_sequence, 1]
        out = self.step(self.module, named, cache)
        present = out.past_key_values
        if isinstance(present, EncoderDecoderCache):
            present = present.self_attention_cache
        flat = [t for layer in present.layers for t in (layer.keys, layer.values)]
        return (out.logits[:, -1:, :], *flat)


def _pairs(flat: Sequence[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(flat[i], flat[i + 1]) for i in range(0, len(flat), 2)]


def cross_kv(
    states: torch.Tensor, projections: Sequence[tuple[nn.Module, nn.Module]], head_dim: int
) -> tuple[torch.Tensor, ...]:
    """Every decoder layer's cross-attention key/value of ``states`` [batch, seq, hidden] -> [batch, heads,
    seq, dim].

    The same view/transpose the HF attention modules apply to their key/value projections.
    """
    batch, seq = states.shape[:2]
    out = []
    for key, value in projections:
        for proj in (key, value):
            out.append(proj(states).view(batch, seq, -1, head_dim).transpose(1, 2))
    return tuple(out)


def embed_with_image(
    embedding: nn.Module, input_ids: torch.Tensor, image_embeds: torch.Tensor, image_mask: torch.Tensor
) -> torch.Tensor:
    """Token embeddings with image-token positions replaced by the image embeddings placed there.

    HF's BLIP-2 ``masked_scatter`` of the query outputs, with the scatter done on the host (the runtime
    puts the queries at the image-token positions), so the graph is a plain ``Where``.
    """
    embeds = embedding(input_ids)
    return torch.where(image_mask.unsqueeze(-1), image_embeds.to(embeds.dtype), embeds)


# ---------------------------------------------------------------- example inputs, by tensor name
@dataclass(frozen=True)
class ExampleDims:
    """What example tensors of a component need beyond the names: vocab, widths, cache layout."""

    vocab_size: int
    layout: CacheLayout | None = None
    embed_dim: int = 0  # width of image_embeds / query_embeds
    num_query_tokens: int = 0
    encoder_sequence: int = EXAMPLE_ENCODER_SEQUENCE  # length of cross-attention keys / encoder mask
    extra: Mapping[str, Callable[[InputShape, torch.Generator], torch.Tensor]] = field(default_factory=dict)


def example_inputs(
    names: Sequence[str],
    dims: ExampleDims,
    shape: InputShape,
    seed: int,
    *,
    decoder: bool,
    pixel_values: Callable[[int, torch.Generator], torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Seeded example tensors for a component's inputs. Decoders get ``EXAMPLE_NEW_TOKENS`` new tokens over a
    past of ``EXAMPLE_PAST``, and a mask with a left-padded row, so the export sees the general case."""
    gen = generator(seed)
    b = shape.batch
    s = EXAMPLE_NEW_TOKENS if decoder else shape.seq_len
    past = EXAMPLE_PAST if decoder else 0
    out: dict[str, torch.Tensor] = {}
    for name in names:
        if name in dims.extra:
            out[name] = dims.extra[name](shape, gen)
        elif name == "pixel_values":
            assert pixel_values is not None, "a component with pixel_values needs a pixel_values example"
            out[name] = pixel_values(b, gen)
        elif name == "input_ids":
            out[name] = torch.randint(3, dims.vocab_size, (b, s), generator=gen)
        elif name == "attention_mask":
            mask = torch.ones(b, past + s, dtype=torch.long)
            mask[-1, :2] = 0  # a padded row: the graph must not assume an all-ones mask
            out[name] = mask
        elif name == "position_ids":
            out[name] = torch.arange(past, past + s).expand(b, s).contiguous()
        elif name == "encoder_attention_mask":
            mask = torch.ones(b, dims.encoder_sequence, dtype=torch.long)
            mask[-1, -2:] = 0
            out[name] = mask
        elif name == "image_embeds":
            out[name] = torch.randn(b, s, dims.embed_dim, generator=gen)
        elif name == "image_mask":
            out[name] = torch.zeros(b, s, dtype=torch.bool)
            out[name][:, : max(1, s // 2)] = True
        elif name == "query_embeds":
            out[name] = torch.randn(b, dims.num_query_tokens, dims.embed_dim, generator=gen)
        elif name.startswith("past_key_values."):
            layout = dims.layout
            length = dims.encoder_sequence if ".encoder." in name else past
            out[name] = torch.randn(b, layout.num_heads, length, layout.head_dim, generator=gen)
        else:
            raise KeyError(f"no example rule for input {name!r}: declare it in ExampleDims.extra")
    return out


# ---------------------------------------------------------------- component declarations
def encoder_component(
    name: str,
    inputs: Sequence[str],
    outputs: Sequence[str],
    module: Callable[[Any], nn.Module],
    encode: Encode,
    dims: Callable[[PreTrainedModel], ExampleDims],
    pixel_values: Callable[[PreTrainedModel, int, torch.Generator], torch.Tensor] | None = None,
    axes: Mapping[str, Mapping[int, str]] | None = None,
) -> ComponentSpec:
    """A once-per-request component (vision encoder, question encoder, T5 encoder, ...)."""
    return ComponentSpec(
        name,
        tuple(inputs),
        tuple(outputs),
        axes_for((*inputs, *outputs), decoder=False, overrides=axes),
        lambda model: NamedCall(module(model), encode, inputs),
        lambda model, shape, seed: example_inputs(
            inputs,
            dims(model),
            shape,
            seed,
            decoder=False,
            pixel_values=(lambda b, gen: pixel_values(model, b, gen)) if pixel_values else None,
        ),
    )


def decoder_component(
    inputs: Sequence[str],
    layout: CacheLayout,
    module: Callable[[Any], nn.Module],
    step: Step,
    dims: Callable[[PreTrainedModel], ExampleDims],
    name: str = "decoder",
    static_step: Step | None = None,
) -> ComponentSpec:
    """The decoder step: ``inputs`` (token ids, masks, ...) + past -> logits of the last position + present.

    ``static_step``: the family's call over a static cache, where it differs from ``step`` (compile backend).
    """
    all_inputs = (*inputs, *layout.past, *layout.cross_past)
    outputs = ("logits", *layout.present)
    return ComponentSpec(
        name,
        all_inputs,
        outputs,
        axes_for((*all_inputs, *outputs), decoder=True),
        lambda model: CachedDecoder(module(model), step, all_inputs, layout, static_step),
        lambda model, shape, seed: example_inputs(all_inputs, dims(model), shape, seed, decoder=True),
    )


def generation_settings(
    config: PretrainedConfig, gen_config: Any, *, eos: Any = None, pad: Any = None, **extra: Any
) -> dict[str, Any]:
    """The generation settings every recipe records: eos (a list), pad, beam defaults, limits."""
    eos = gen_config.eos_token_id if eos is None else eos
    eos_list = [] if eos is None else ([int(eos)] if isinstance(eos, int) else [int(e) for e in eos])
    pad = gen_config.pad_token_id if pad is None else pad
    return {
        "eos_token_id": eos_list,
        "pad_token_id": None if pad is None else int(pad),
        "length_penalty": float(gen_config.length_penalty if gen_config.length_penalty is not None else 1.0),
        "early_stopping": gen_config.early_stopping if gen_config.early_stopping is not None else False,
        "vocab_size": int(config.vocab_size),
        **extra,
    }
