"""BLIP: ViT vision encoder + BERT text encoder/decoder with cross-attention to the image.

Generative tasks (docs/ARCHITECTURE.md, "Pitfalls": BlipForQuestionAnswering.forward returns only the loss, so
the parts are exported as components): caption: vision_encoder (pixel_values -> the decoder's cross-attention
K/V of the image) + decoder vqa: vision_encoder (-> image_embeds) + question_encoder (question cross-attending
to the image -> the answer decoder's cross-attention K/V) + decoder
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from vlexport.contracts.family import ComponentSpec, FamilySpec, Preset, TaskSpec
from vlexport.inject import Rule, additive_bias, kernel_attention, post_norm, use_original
from vlexport.models import dual_encoder_tasks, scores
from vlexport.models.base import single_component
from vlexport.models.generative import (
    CacheLayout,
    ExampleDims,
    GenerationRecipe,
    cross_kv,
    decoder_component,
    encoder_component,
    generation_settings,
)
from vlexport.models.host import blip as host_blip
from vlexport.models.inputs import InputShape, generator, image_size, pixel_values, text_inputs

if TYPE_CHECKING:  # annotations only: compiled artifacts generate without transformers
    from transformers import PretrainedConfig, PreTrainedModel

_ITM_OUTPUTS = ("itm_score",)


def _retrieval_task(name: str, use_itm_head: bool, axes: dict, description: str) -> TaskSpec:
    return TaskSpec(
        name,
        "BlipForImageTextRetrieval",
        single_component(
            dual_encoder_tasks.INPUTS,
            _ITM_OUTPUTS,
            {**dual_encoder_tasks.AXES, **axes},
            call_kwargs={"use_itm_head": use_itm_head},
        ),
        dual_encoder_tasks.make_inputs,
        agreement={"itm_score": "argmax"},
        description=description,
        # itm_score is the (no, yes) head with use_itm_head, else the image x text cosine-similarity matrix
        scores=scores.itm("itm_score") if use_itm_head else scores.similarity_row("itm_score"),
    )


# ---------------------------------------------------------------- generative: components
def _layout(config: PretrainedConfig) -> CacheLayout:
    text = config.text_config
    return CacheLayout(
        text.num_hidden_layers,
        text.num_attention_heads,
        text.hidden_size // text.num_attention_heads,
        cross=True,
    )


def _num_patches(config: PretrainedConfig) -> int:
    vision = config.vision_config
    return (image_size(vision) // vision.patch_size) ** 2 + 1  # + the class token


def _cross_projections(decoder: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    return [
        (layer.crossattention.self.key, layer.crossattention.self.value)
        for layer in decoder.bert.encoder.layer
    ]


def _pixels(model: PreTrainedModel, batch: int, gen: torch.Generator) -> torch.Tensor:
    return pixel_values(model.config.vision_config, batch, gen)


def _dims(model: PreTrainedModel, encoder_sequence: int | None = None) -> ExampleDims:
    config = model.config
    extra = {} if encoder_sequence is None else {"encoder_sequence": encoder_sequence}
    return ExampleDims(config.text_config.vocab_size, _layout(config), **extra)


def _decoder_step(decoder: nn.Module, x: dict[str, torch.Tensor], cache: Any) -> Any:
    # BlipTextLMHeadModel as HF generate() calls it: explicit positions, 2D mask of past + new tokens.
    return decoder(
        input_ids=x["input_ids"],
        attention_mask=x["attention_mask"],
        position_ids=x["position_ids"],
        encoder_hidden_states=x["encoder_hidden_states"],
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,
        return_dict=True,
    )


_DECODER_INPUTS = ("input_ids", "attention_mask", "position_ids")


def _decoder(config: PretrainedConfig, encoder_sequence: int | None) -> ComponentSpec:
    return decoder_component(
        _DECODER_INPUTS,
        _layout(config),
        lambda m: m.text_decoder,
        _decoder_step,
        lambda m: _dims(m, encoder_sequence),
    )


def _caption_components(config: PretrainedConfig) -> tuple[ComponentSpec, ...]:
    layout = _layout(config)
    vision = encoder_component(
        "vision_encoder",
        ("pixel_values",),
        layout.cross_present,
        lambda m: m,
        lambda m, x: cross_kv(
            m.vision_model(pixel_values=x["pixel_values"])[0],
            _cross_projections(m.text_decoder),
            layout.head_dim,
        ),
        _dims,
        _pixels,
    )
    return vision, _decoder(config, _num_patches(config))


def _vqa_components(config: PretrainedConfig) -> tuple[ComponentSpec, ...]:
    layout = _layout(config)
    vision = encoder_component(
        "vision_encoder",
        ("pixel_values",),
        ("image_embeds",),
        lambda m: m.vision_model,
        lambda vm, x: vm(pixel_values=x["pixel_values"])[0],
        _dims,
        _pixels,
        axes={"image_embeds": {0: "batch"}},
    )
    n = _num_patches(config)
    hidden = config.vision_config.hidden_size
    question = encoder_component(
        "question_encoder",
        ("input_ids", "attention_mask", "image_embeds"),
        layout.cross_present,
        lambda m: m,
        # As BlipForQuestionAnswering.generate: the question cross-attends to the whole image (mask of ones).
        lambda m, x: cross_kv(
            m.text_encoder(
                input_ids=x["input_ids"],
                attention_mask=x["attention_mask"],
                encoder_hidden_states=x["image_embeds"],
                return_dict=False,
            )[0],
            _cross_projections(m.text_decoder),
            layout.head_dim,
        ),
        lambda m: ExampleDims(
            config.text_config.vocab_size,
            layout,
            extra={"image_embeds": lambda shape, gen: torch.randn(shape.batch, n, hidden, generator=gen)},
        ),
        axes={"image_embeds": {0: "batch"}},
    )
    return vision, question, _decoder(config, None)


# ---------------------------------------------------------------- generative: what generate() does first
def _settings(model: PreTrainedModel) -> dict[str, Any]:
    text = model.config.text_config
    # BlipFor*.generate call text_decoder.generate(eos_token_id=sep_token_id, pad_token_id=pad_token_id).
    return generation_settings(
        text,
        model.text_decoder.generation_config,
        eos=text.sep_token_id,
        pad=text.pad_token_id,
        bos_token_id=int(text.bos_token_id),
        sep_token_id=int(text.sep_token_id),
        text_eos_token_id=int(text.eos_token_id),
        max_positions=int(text.max_position_embeddings),
    )


# ---------------------------------------------------------------- generative: generate() inputs
def _prompts(
    config: PretrainedConfig, shape: InputShape, seed: int, *, left: bool
) -> dict[str, torch.Tensor]:
    """pixel_values + "[CLS] text [SEP]"-like prompts of different lengths (generate()'s inputs)."""
    gen = generator(seed)
    text = config.text_config
    out = {"pixel_values": pixel_values(config.vision_config, shape.batch, gen)}
    if shape.seq_len == 0:
        return out
    ids_mask = text_inputs(
        text.vocab_size, shape, gen, pad_token_id=text.pad_token_id, first_token_id=text.bos_token_id
    )
    ids, mask = ids_mask["input_ids"], ids_mask["attention_mask"]
    lengths = mask.sum(1)
    ids[torch.arange(shape.batch), lengths - 1] = text.sep_token_id
    if left:  # decoder-only prompts are padded on the left, as HF recommends for generate()
        for row, n in enumerate(lengths.tolist()):
            ids[row] = torch.roll(ids[row], shape.seq_len - n)
            mask[row] = torch.roll(mask[row], shape.seq_len - n)
    return {**out, "input_ids": ids, "attention_mask": mask}


# ---------------------------------------------------------------- --kernels: BLIP's hand-rolled attention
def _vision_attention(
    self: nn.Module, original: Callable, hidden_states: torch.Tensor, **kwargs: Any
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """BlipAttention: fused qkv projection, no mask."""
    if use_original(self):
        return original(hidden_states, **kwargs)
    bsz, tgt_len, embed_dim = hidden_states.shape
    qkv = self.qkv(hidden_states).reshape(bsz, tgt_len, 3, self.num_heads, embed_dim // self.num_heads)
    query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    out = kernel_attention(query, key, value, bias=None, scale=self.scale)
    return self.projection(out.transpose(1, 2).reshape(bsz, tgt_len, embed_dim)), None


def _text_attention(
    self: nn.Module,
    original: Callable,
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    encoder_hidden_states: torch.Tensor | None = None,
    encoder_attention_mask: torch.Tensor | None = None,
    past_key_values: Any = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """BlipTextSelfAttention (self and cross, with its KV cache): the HF code up to the scores, then the
    kernel."""
    # transformers 5.24 renamed the cache argument `past_key_values` -> `cache` (the old name is deprecated).
    if past_key_values is None:
        past_key_values = kwargs.pop("cache", None)
    if use_original(self):
        return original(
            hidden_states,
            attention_mask=attention_mask,
            encoder_hidden_states=encoder_hidden_states,
            encoder_attention_mask=encoder_attention_mask,
            past_key_values=past_key_values,
            **kwargs,
        )
    from transformers.cache_utils import EncoderDecoderCache

    input_shape = hidden_states.shape[:-1]
    query = self.query(hidden_states).view(*input_shape, -1, self.attention_head_size).transpose(1, 2)
    is_cross = encoder_hidden_states is not None
    attention_mask = encoder_attention_mask if is_cross else attention_mask
    is_updated, cache = False, past_key_values
    if isinstance(past_key_values, EncoderDecoderCache):
        is_updated = past_key_values.is_updated.get(self.layer_idx)
        cache = past_key_values.cross_attention_cache if is_cross else past_key_values.self_attention_cache
    current = encoder_hidden_states if is_cross else hidden_states
    if is_cross and past_key_values is not None and is_updated:
        key, value = cache.layers[self.layer_idx].keys, cache.layers[self.layer_idx].values
    else:
        kv_shape = (*current.shape[:-1], -1, self.attention_head_size)
        key = self.key(current).view(kv_shape).transpose(1, 2)
        value = self.value(current).view(kv_shape).transpose(1, 2)
        if past_key_values is not None:
            key, value = cache.update(key, value, self.layer_idx)
            if is_cross and isinstance(past_key_values, EncoderDecoderCache):
                past_key_values.is_updated[self.layer_idx] = True
    bias = additive_bias(attention_mask, query.dtype)
    out = kernel_attention(query, key, value, bias=bias, scale=self.attention_head_size**-0.5)
    return out.transpose(1, 2).reshape(*input_shape, self.all_head_size), None


INJECTION = (
    Rule("attention", ("blip.modeling_blip.BlipAttention",), _vision_attention),
    Rule("attention", ("blip.modeling_blip_text.BlipTextSelfAttention",), _text_attention),
    post_norm("blip.modeling_blip_text.BlipTextSelfOutput", "blip.modeling_blip_text.BlipTextOutput"),
)


_BLIP_TEMPLATE = (("bos_token_id",), ("sep_token_id",))

TASKS: dict[str, TaskSpec] = {
    "itm": _retrieval_task("itm", True, {"itm_score": {0: "batch"}}, "image-text matching scores (no/yes)"),
    "itc": _retrieval_task(
        "itc",
        False,
        {"itm_score": {0: "batch", 1: "batch"}},
        "image-text cosine similarity matrix (contrastive head)",
    ),
    "features": dual_encoder_tasks.features_task("BlipModel"),
    "caption": TaskSpec(
        "caption",
        "BlipForConditionalGeneration",
        _caption_components,
        lambda config, shape, seed: _prompts(config, shape, seed, left=True),
        generative=True,
        description="image captioning (optionally from a text prompt): "
        "vision encoder + decoder with KV cache",
        generation=lambda config: GenerationRecipe(
            ("vision_encoder", host_blip.caption_prompt),
            _settings,
            tokenizer_template=_BLIP_TEMPLATE,
            continues_prompt=True,
        ),
    ),
    "vqa": TaskSpec(
        "vqa",
        "BlipForQuestionAnswering",
        _vqa_components,
        lambda config, shape, seed: _prompts(config, shape, seed, left=False),
        generative=True,
        description="visual question answering: vision encoder + question encoder + answer decoder with KV "
        "cache",
        generation=lambda config: GenerationRecipe(
            ("vision_encoder", "question_encoder", host_blip.answer_prompt),
            _settings,
            tokenizer_template=_BLIP_TEMPLATE,
            needs_prompt=True,
        ),
    ),
}

PRESETS = (
    # No `features`: BlipModel's text tower and projections are not in a retrieval checkpoint (other names).
    Preset(
        "blip-itm-base-coco",
        "blip",
        ("itm", "itc"),
        "Salesforce/blip-itm-base-coco",
        "blip-tiny",
        "BLIP image-text retrieval (ITM and ITC heads)",
    ),
    Preset(
        "blip-image-captioning-base",
        "blip",
        ("caption",),
        "Salesforce/blip-image-captioning-base",
        "blip-tiny",
        "BLIP image captioning",
    ),
    Preset(
        "blip-vqa-base",
        "blip",
        ("vqa",),
        "Salesforce/blip-vqa-base",
        "blip-tiny",
        "BLIP visual question answering",
    ),
    Preset(
        "blip-tiny", "blip", ("itm", "itc", "features", "caption", "vqa"), None, None, "tiny BLIP (tests)"
    ),
)

FAMILY = FamilySpec(
    name="blip",
    model_types=("blip",),
    tasks=TASKS,
    injection=INJECTION,
    ort_model_type="bert",  # its ViT vision tower and BERT text towers are BERT-style encoder blocks
    architectures={
        "BlipForImageTextRetrieval": ("itm", "itc"),
        "BlipForConditionalGeneration": ("caption",),
        "BlipForQuestionAnswering": ("vqa",),
        "BlipModel": ("features",),
    },
    title="BLIP",
    presets=PRESETS,
)
