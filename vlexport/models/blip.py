"""BLIP: ViT vision encoder + BERT text encoder/decoder with cross-attention to the image.

Generative tasks (DESIGN.md pitfall: BlipForQuestionAnswering.forward returns only the loss, so the
parts are exported as components):
  caption: vision_encoder (pixel_values -> the decoder's cross-attention K/V of the image) + decoder
  vqa:     vision_encoder (-> image_embeds) + question_encoder (question cross-attending to the image ->
           the answer decoder's cross-attention K/V) + decoder
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from vlexport.errors import UsageError
from vlexport.models import dual_encoder_tasks
from vlexport.models.base import ComponentSpec, FamilySpec, TaskSpec, single_component
from vlexport.models.generative import (
    CacheLayout,
    ExampleDims,
    GenerationRecipe,
    cross_kv,
    decoder_component,
    encoder_component,
    generation_settings,
)
from vlexport.models.inputs import InputShape, generator, image_size, pixel_values, text_inputs

_ITM_OUTPUTS = ("itm_score",)


def _retrieval_task(name: str, use_itm_head: bool, axes: dict, description: str) -> TaskSpec:
    return TaskSpec(
        name, "BlipForImageTextRetrieval",
        single_component(dual_encoder_tasks.INPUTS, _ITM_OUTPUTS, {**dual_encoder_tasks.AXES, **axes},
                         call_kwargs={"use_itm_head": use_itm_head}),
        dual_encoder_tasks.make_inputs, agreement={"itm_score": "argmax"}, description=description,
    )


# ---------------------------------------------------------------- generative: components
def _layout(config: PretrainedConfig) -> CacheLayout:
    text = config.text_config
    return CacheLayout(text.num_hidden_layers, text.num_attention_heads,
                       text.hidden_size // text.num_attention_heads, cross=True)


def _num_patches(config: PretrainedConfig) -> int:
    vision = config.vision_config
    return (image_size(vision) // vision.patch_size) ** 2 + 1  # + the class token


def _cross_projections(decoder: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    return [(layer.crossattention.self.key, layer.crossattention.self.value) for layer in decoder.bert.encoder.layer]


def _pixels(model: PreTrainedModel, batch: int, gen: torch.Generator) -> torch.Tensor:
    return pixel_values(model.config.vision_config, batch, gen)


def _dims(model: PreTrainedModel, encoder_sequence: int | None = None) -> ExampleDims:
    config = model.config
    extra = {} if encoder_sequence is None else {"encoder_sequence": encoder_sequence}
    return ExampleDims(config.text_config.vocab_size, _layout(config), **extra)


def _decoder_step(decoder: nn.Module, x: dict[str, torch.Tensor], cache: Any) -> Any:
    # BlipTextLMHeadModel as HF generate() calls it: explicit positions, 2D mask of past + new tokens.
    return decoder(input_ids=x["input_ids"], attention_mask=x["attention_mask"], position_ids=x["position_ids"],
                   encoder_hidden_states=x["encoder_hidden_states"], past_key_values=cache, use_cache=True,
                   logits_to_keep=1, return_dict=True)


_DECODER_INPUTS = ("input_ids", "attention_mask", "position_ids")


def _decoder(config: PretrainedConfig, encoder_sequence: int | None) -> ComponentSpec:
    return decoder_component(_DECODER_INPUTS, _layout(config), lambda m: m.text_decoder, _decoder_step,
                             lambda m: _dims(m, encoder_sequence))


def _caption_components(config: PretrainedConfig) -> tuple[ComponentSpec, ...]:
    layout = _layout(config)
    vision = encoder_component(
        "vision_encoder", ("pixel_values",), layout.cross_present, lambda m: m,
        lambda m, x: cross_kv(m.vision_model(pixel_values=x["pixel_values"])[0],
                              _cross_projections(m.text_decoder), layout.head_dim),
        _dims, _pixels)
    return vision, _decoder(config, _num_patches(config))


def _vqa_components(config: PretrainedConfig) -> tuple[ComponentSpec, ...]:
    layout = _layout(config)
    vision = encoder_component(
        "vision_encoder", ("pixel_values",), ("image_embeds",), lambda m: m.vision_model,
        lambda vm, x: vm(pixel_values=x["pixel_values"])[0], _dims, _pixels, axes={"image_embeds": {0: "batch"}})
    n = _num_patches(config)
    hidden = config.vision_config.hidden_size
    question = encoder_component(
        "question_encoder", ("input_ids", "attention_mask", "image_embeds"), layout.cross_present, lambda m: m,
        # As BlipForQuestionAnswering.generate: the question cross-attends to the whole image (mask of ones).
        lambda m, x: cross_kv(m.text_encoder(input_ids=x["input_ids"], attention_mask=x["attention_mask"],
                                             encoder_hidden_states=x["image_embeds"], return_dict=False)[0],
                              _cross_projections(m.text_decoder), layout.head_dim),
        lambda m: ExampleDims(config.text_config.vocab_size, layout,
                              extra={"image_embeds": lambda shape, gen: torch.randn(shape.batch, n, hidden,
                                                                                    generator=gen)}),
        axes={"image_embeds": {0: "batch"}})
    return vision, question, _decoder(config, None)


# ---------------------------------------------------------------- generative: what generate() does first
def _settings(model: PreTrainedModel) -> dict[str, Any]:
    text = model.config.text_config
    # BlipFor*.generate call text_decoder.generate(eos_token_id=sep_token_id, pad_token_id=pad_token_id).
    return generation_settings(
        text, model.text_decoder.generation_config, eos=text.sep_token_id, pad=text.pad_token_id,
        bos_token_id=int(text.bos_token_id), sep_token_id=int(text.sep_token_id),
        text_eos_token_id=int(text.eos_token_id), max_positions=int(text.max_position_embeddings),
    )


def _caption_prompt(env: dict[str, np.ndarray], s: dict[str, Any]) -> dict[str, np.ndarray]:
    """BlipForConditionalGeneration.generate: default prompt [bos, eos]; the first token becomes bos and the
    last one (the tokenizer's [SEP]) is dropped, from the ids and the mask alike."""
    batch = env["pixel_values"].shape[0]
    ids = env.get("input_ids")
    if ids is None:
        ids = np.tile(np.array([[s["bos_token_id"], s["text_eos_token_id"]]], dtype=np.int64), (batch, 1))
    if ids.shape[1] < 2:
        raise UsageError("A BLIP caption prompt needs at least 2 tokens ([CLS] text [SEP] as the tokenizer writes "
                         "it): generate() drops the last one.")
    ids = ids.copy()
    ids[:, 0] = s["bos_token_id"]
    mask = env.get("attention_mask")
    return {"decoder_input_ids": ids[:, :-1], "decoder_attention_mask": None if mask is None else mask[:, :-1]}


def _answer_prompt(env: dict[str, np.ndarray], s: dict[str, Any]) -> dict[str, np.ndarray]:
    """BlipForQuestionAnswering.generate: the answer decoder starts from [bos] alone, without a mask."""
    batch = env["pixel_values"].shape[0]
    return {"decoder_input_ids": np.full((batch, 1), s["bos_token_id"], dtype=np.int64)}


# ---------------------------------------------------------------- generative: generate() inputs
def _prompts(config: PretrainedConfig, shape: InputShape, seed: int, *, left: bool) -> dict[str, torch.Tensor]:
    """pixel_values + "[CLS] text [SEP]"-like prompts of different lengths (generate()'s inputs)."""
    gen = generator(seed)
    text = config.text_config
    out = {"pixel_values": pixel_values(config.vision_config, shape.batch, gen)}
    if shape.seq_len == 0:
        return out
    ids_mask = text_inputs(text.vocab_size, shape, gen, pad_token_id=text.pad_token_id,
                           first_token_id=text.bos_token_id)
    ids, mask = ids_mask["input_ids"], ids_mask["attention_mask"]
    lengths = mask.sum(1)
    ids[torch.arange(shape.batch), lengths - 1] = text.sep_token_id
    if left:  # decoder-only prompts are padded on the left, as HF recommends for generate()
        for row, n in enumerate(lengths.tolist()):
            ids[row] = torch.roll(ids[row], shape.seq_len - n)
            mask[row] = torch.roll(mask[row], shape.seq_len - n)
    return {**out, "input_ids": ids, "attention_mask": mask}


_BLIP_TEMPLATE = (("bos_token_id",), ("sep_token_id",))

TASKS: dict[str, TaskSpec] = {
    "itm": _retrieval_task("itm", True, {"itm_score": {0: "batch"}}, "image-text matching scores (no/yes)"),
    "itc": _retrieval_task("itc", False, {"itm_score": {0: "batch", 1: "batch"}},
                           "image-text cosine similarity matrix (contrastive head)"),
    "features": dual_encoder_tasks.features_task("BlipModel"),
    "caption": TaskSpec(
        "caption", "BlipForConditionalGeneration", _caption_components,
        lambda config, shape, seed: _prompts(config, shape, seed, left=True), generative=True,
        description="image captioning (optionally from a text prompt): vision encoder + decoder with KV cache",
        generation=lambda config: GenerationRecipe(("vision_encoder", _caption_prompt), _settings,
                                                   tokenizer_template=_BLIP_TEMPLATE, continues_prompt=True),
    ),
    "vqa": TaskSpec(
        "vqa", "BlipForQuestionAnswering", _vqa_components,
        lambda config, shape, seed: _prompts(config, shape, seed, left=False), generative=True,
        description="visual question answering: vision encoder + question encoder + answer decoder with KV cache",
        generation=lambda config: GenerationRecipe(("vision_encoder", "question_encoder", _answer_prompt), _settings,
                                                   tokenizer_template=_BLIP_TEMPLATE, needs_prompt=True),
    ),
}

FAMILY = FamilySpec(
    name="blip",
    model_types=("blip",),
    tasks=TASKS,
    architectures={
        "BlipForImageTextRetrieval": ("itm", "itc", "features"),
        "BlipForConditionalGeneration": ("caption",),
        "BlipForQuestionAnswering": ("vqa",),
        "BlipModel": ("features",),
    },
)
