"""BLIP-2: ViT + Q-Former + language projection in front of a frozen LM (OPT decoder or Flan-T5).

One task, ``generate``, whose components depend on the language model:
  OPT:  image_encoder (pixel_values -> query_embeds) + decoder (token ids, with the query embeddings put at
        the image-token positions on the first step, past key/values)
  T5:   image_encoder + encoder (T5 encoder over [queries; prompt] -> the decoder's cross-attention K/V)
        + decoder (self-attention past, cross-attention K/V)
The decoder graphs embed token ids themselves (their LM head shares that table), so no separate
embedding component duplicates the vocabulary matrix.

docs/ARCHITECTURE.md, "Pitfalls": generate() only uses the image where the prompt holds ``image_token_index``
tokens, ``num_query_tokens`` of them; the runtime checks that instead of silently ignoring the image.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from vlexport.contracts.family import ComponentSpec, FamilySpec, Preset, TaskSpec
from vlexport.inject import interface, post_norm
from vlexport.models.generative import (
    CacheLayout,
    ExampleDims,
    GenerationRecipe,
    cross_kv,
    decoder_component,
    embed_with_image,
    encoder_component,
    generation_settings,
)
from vlexport.models.host import blip2 as host_blip2
from vlexport.models.inputs import InputShape, generator, pixel_values, text_inputs

if TYPE_CHECKING:  # annotations only: compiled artifacts generate without transformers
    from transformers import PretrainedConfig, PreTrainedModel

    from vlexport.contracts.precision import PrecisionConfig


def _is_opt(config: PretrainedConfig) -> bool:
    return bool(config.use_decoder_only_language_model)


def _layout(config: PretrainedConfig) -> CacheLayout:
    text = config.text_config
    if _is_opt(config):
        return CacheLayout(
            text.num_hidden_layers, text.num_attention_heads, text.hidden_size // text.num_attention_heads
        )
    return CacheLayout(text.num_decoder_layers, text.num_heads, text.d_kv, cross=True)


def _dims(model: PreTrainedModel) -> ExampleDims:
    config = model.config
    return ExampleDims(
        config.text_config.vocab_size,
        _layout(config),
        embed_dim=config.text_config.hidden_size if _is_opt(config) else config.text_config.d_model,
        num_query_tokens=config.num_query_tokens,
    )


def _pixels(model: PreTrainedModel, batch: int, gen: torch.Generator) -> torch.Tensor:
    return pixel_values(model.config.vision_config, batch, gen)


def _image_encoder() -> ComponentSpec:
    # Vision encoder + Q-Former + language projection: what generate() computes before the LM.
    return encoder_component(
        "image_encoder",
        ("pixel_values",),
        ("query_embeds",),
        lambda m: m,
        lambda m, x: m.get_image_features(pixel_values=x["pixel_values"], return_dict=True).pooler_output,
        _dims,
        _pixels,
    )


def _opt_step(lm: nn.Module, x: dict[str, torch.Tensor], cache: Any) -> Any:
    embeds = embed_with_image(lm.get_input_embeddings(), x["input_ids"], x["image_embeds"], x["image_mask"])
    return lm(
        inputs_embeds=embeds,
        attention_mask=x["attention_mask"],
        position_ids=x["position_ids"],
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,
        return_dict=True,
    )


def _t5_encode(lm: nn.Module, x: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    embeds = embed_with_image(lm.get_input_embeddings(), x["input_ids"], x["image_embeds"], x["image_mask"])
    states = lm.encoder(
        inputs_embeds=embeds, attention_mask=x["attention_mask"], return_dict=True
    ).last_hidden_state
    pairs = [
        (block.layer[1].EncDecAttention.k, block.layer[1].EncDecAttention.v) for block in lm.decoder.block
    ]
    return cross_kv(states, pairs, lm.config.d_kv)


def _t5_step(lm: nn.Module, x: dict[str, torch.Tensor], cache: Any) -> Any:
    from transformers.modeling_outputs import BaseModelOutput

    return lm(
        encoder_outputs=BaseModelOutput(last_hidden_state=x["encoder_hidden_states"]),
        attention_mask=x["encoder_attention_mask"],
        decoder_input_ids=x["input_ids"],
        past_key_values=cache,
        use_cache=True,
        return_dict=True,
    )


def _t5_static_step(lm: nn.Module, x: dict[str, torch.Tensor], cache: Any) -> Any:
    # Over a static cache the decoder's mask (4D over the slots) is given: T5 would build a mask of the
    # cache's whole length from it otherwise. Positions (relative bias) come from the cache's seen length.
    from transformers.modeling_outputs import BaseModelOutput

    return lm(
        encoder_outputs=BaseModelOutput(last_hidden_state=x["encoder_hidden_states"]),
        attention_mask=x["encoder_attention_mask"],
        decoder_input_ids=x["input_ids"],
        decoder_attention_mask=x["attention_mask"],
        past_key_values=cache,
        use_cache=True,
        return_dict=True,
    )


_LM_INPUTS = ("input_ids", "image_embeds", "image_mask", "attention_mask")


def _components(config: PretrainedConfig) -> tuple[ComponentSpec, ...]:
    layout = _layout(config)
    if _is_opt(config):
        decoder = decoder_component(
            (*_LM_INPUTS, "position_ids"), layout, lambda m: m.language_model, _opt_step, _dims
        )
        return _image_encoder(), decoder
    encoder = encoder_component(
        "encoder", _LM_INPUTS, layout.cross_present, lambda m: m.language_model, _t5_encode, _dims
    )
    decoder = decoder_component(
        ("input_ids", "encoder_attention_mask"),
        layout,
        lambda m: m.language_model,
        _t5_step,
        _dims,
        static_step=_t5_static_step,
    )
    return _image_encoder(), encoder, decoder


def _mixes(config: PretrainedConfig) -> tuple[dict[str, PrecisionConfig], ...]:
    """Per-component recipes `vlexport tune` tries. The language model is where decode time goes (it reads
    every weight per token), so it gets int4 weights with its token table quantized too; the image tower
    runs once per image at many rows, where weight-only kernels lose to fp32 GEMMs and int8-dynamic per-token
    wins (OPT-2.7b prefill 0.51x fp32: benchmarks/results/cpu-blip2-opt-2.7b-mixed-dyn.json). The T5 encoder
    at int4 dropped logit cosine to 0.929 where int8 weights kept 0.977
    (benchmarks/results/cpu-blip2-flan-t5-xl-int4-mixed.json)."""
    from vlexport.contracts.precision import Int4WeightConfig, Int8DynamicConfig, Int8WeightConfig

    lm = {"decoder": Int4WeightConfig(quantize_embeddings=True)}
    vision = {"image_encoder": Int8DynamicConfig(activations="per-token")}
    if _is_opt(config):
        return lm, lm | vision
    return lm | {"encoder": Int8WeightConfig()}, lm | {"encoder": Int8WeightConfig()} | vision


# ---------------------------------------------------------------- what generate() does before the LM
def _settings(model: PreTrainedModel) -> dict[str, Any]:
    config, lm = model.config, model.language_model
    text = config.text_config
    gen = lm.generation_config  # Blip2ForConditionalGeneration.generate calls language_model.generate
    start = gen.decoder_start_token_id
    start = getattr(text, "decoder_start_token_id", None) if start is None else start
    return generation_settings(
        text,
        gen,
        image_token_id=int(config.image_token_index),
        num_query_tokens=int(config.num_query_tokens),
        bos_token_id=None if gen.bos_token_id is None else int(gen.bos_token_id),
        decoder_start_token_id=None if _is_opt(config) else int(start),
        max_positions=int(text.max_position_embeddings) if _is_opt(config) else None,
    )


def _recipe(config: PretrainedConfig) -> GenerationRecipe:
    if _is_opt(config):
        return GenerationRecipe(
            ("image_encoder", host_blip2.place_queries, host_blip2.opt_prompt),
            _settings,
            first_step=("image_embeds", "image_mask"),
            tokenizer_template=(("bos_token_id",), ()),  # OPT's tokenizer prepends </s>
            prompt_template="Question: {} Answer:",
        )
    return GenerationRecipe(
        ("image_encoder", host_blip2.place_queries, "encoder", host_blip2.t5_prompt),
        _settings,
        tokenizer_template=((), ("eos_token_id",)),  # T5's tokenizer appends </s>
        prompt_template="Question: {} Answer:",
        needs_prompt=True,
    )


def _precision_limits(config: PretrainedConfig) -> dict[str, str]:
    if _is_opt(config):
        return {}
    return {
        "fp16": "Flan-T5 checkpoints were trained in bfloat16 and overflow in fp16 (the BLIP-2 documentation "
        "says so): use bf16 on a backend that builds it"
    }


def make_inputs(config: PretrainedConfig, shape: InputShape, seed: int) -> dict[str, torch.Tensor]:
    """generate() inputs: pixel_values + [image]*Q + text prompts of different lengths (OPT: [bos] first, left
    padding; T5: [eos] last, right padding, as their tokenizers write them)."""
    gen = generator(seed)
    text = config.text_config
    out = {"pixel_values": pixel_values(config.vision_config, shape.batch, gen)}
    n = max(shape.seq_len, 2)
    pad = text.pad_token_id
    t = text_inputs(text.vocab_size, InputShape(shape.batch, n), gen, pad_token_id=pad)
    ids, mask = t["input_ids"], t["attention_mask"]
    ids = ids.masked_fill(ids == config.image_token_index, 3)  # text never holds the image token
    lengths = mask.sum(1)
    q = config.num_query_tokens
    rows = []
    for row, length in enumerate(lengths.tolist()):
        body = ids[row, :length].tolist()
        if _is_opt(config):
            body = [text.bos_token_id, *body[1:]]
        else:
            body = [*body[:-1], text.eos_token_id]
        rows.append([config.image_token_index] * q + body)
    width = max(map(len, rows))
    ids = torch.full((shape.batch, width), pad, dtype=torch.long)
    mask = torch.zeros((shape.batch, width), dtype=torch.long)
    for row, r in enumerate(rows):
        sl = slice(width - len(r), width) if _is_opt(config) else slice(0, len(r))
        ids[row, sl] = torch.tensor(r)
        mask[row, sl] = 1
    return {**out, "input_ids": ids, "attention_mask": mask}


def random_init(model: PreTrainedModel) -> None:
    """Random-init quirk of transformers that the config alone cannot fix (``--random-weights``).

    T5 v1.1 / Flan-T5 (the T5 language model) has its own LM head and no ``d_model**-0.5`` rescaling of
    the decoder output (``scale_decoder_outputs=False``). transformers 5 builds it with the head tied to the
    std-1 input embeddings (it unties only when a checkpoint brings a head), so random logits reach ~1e3 at
    d_model 2048: every greedy token is the same and beam paths tie to float32 precision, which leaves
    token-exact validation nothing to check. Random weights get the checkpoint's layout instead, an
    untied head, initialised at std ``d_model**-0.5`` (the effective scale of T5's tied, rescaled head).
    """
    from transformers import T5ForConditionalGeneration

    for module in model.modules():
        if isinstance(module, T5ForConditionalGeneration) and not module.config.scale_decoder_outputs:
            head = module.lm_head
            head.weight = nn.Parameter(torch.randn_like(head.weight) * module.config.d_model**-0.5)
            module.config.tie_word_embeddings = False


PRESETS = (
    Preset(
        "blip2-opt-2.7b",
        "blip2",
        ("generate",),
        "Salesforce/blip2-opt-2.7b",
        "blip2-opt-tiny",
        "BLIP-2 with OPT-2.7b: captioning and prompted VQA",
    ),
    Preset(
        "blip2-flan-t5-xl",
        "blip2",
        ("generate",),
        "Salesforce/blip2-flan-t5-xl",
        "blip2-flan-t5-tiny",
        "BLIP-2 with Flan-T5-XL: captioning and prompted VQA",
    ),
    Preset("blip2-opt-tiny", "blip2", ("generate",), None, None, "tiny BLIP-2 with OPT (tests)"),
    Preset("blip2-flan-t5-tiny", "blip2", ("generate",), None, None, "tiny BLIP-2 with T5 (tests)"),
)

FAMILY = FamilySpec(
    name="blip2",
    model_types=("blip-2",),
    tasks={
        "generate": TaskSpec(
            "generate",
            "Blip2ForConditionalGeneration",
            _components,
            make_inputs,
            generative=True,
            description="captioning / prompted VQA: image encoder (ViT + Q-Former + projection) + LM with KV "
            "cache",
            generation=_recipe,
            component_mixes=_mixes,
        ),
    },
    architectures={"Blip2ForConditionalGeneration": ("generate",)},
    injection=(
        interface(
            "blip_2.modeling_blip_2.Blip2Attention",
            "blip_2.modeling_blip_2.Blip2QFormerMultiHeadAttention",
            "opt.modeling_opt.OPTAttention",
            "t5.modeling_t5.T5Attention",
        ),
        post_norm(
            "blip_2.modeling_blip_2.Blip2QFormerSelfOutput", "blip_2.modeling_blip_2.Blip2QFormerOutput"
        ),
    ),
    random_init=random_init,
    # ViT and Q-Former are BERT-style blocks; OPT/T5 graphs get the generic fusions only
    ort_model_type="bert",
    title="BLIP-2",
    presets=PRESETS,
    precision_limits=_precision_limits,
)
