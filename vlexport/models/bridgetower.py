"""BridgeTower: RoBERTa text tower + CLIP-ViT vision tower joined by cross-modal bridge layers."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from transformers import PretrainedConfig

from vlexport.contracts.family import FamilySpec, Preset, ScoreReader, TaskSpec
from vlexport.inject import (
    Rule,
    add_layer_norm,
    additive_bias,
    check_layer_norm,
    interface,
    kernel_attention,
    post_norm,
    use_original,
)
from vlexport.models import scores
from vlexport.models.base import roberta_position_offset, single_component
from vlexport.models.host import bridgetower as host_bridgetower
from vlexport.models.inputs import InputShape, generator, image_size, pixel_values, text_inputs

INPUTS = ("input_ids", "attention_mask", "pixel_values", "pixel_mask")
AXES = {
    "input_ids": {0: "batch", 1: "sequence"},
    "attention_mask": {0: "batch", 1: "sequence"},
    "pixel_values": {0: "batch"},
    "pixel_mask": {0: "batch"},
}


def make_inputs(config: PretrainedConfig, shape: InputShape, seed: int) -> dict[str, torch.Tensor]:
    gen = generator(seed)
    text = config.text_config
    out = text_inputs(
        text.vocab_size, shape, gen, pad_token_id=text.pad_token_id, first_token_id=text.bos_token_id
    )
    out["pixel_values"] = pixel_values(config.vision_config, shape.batch, gen)
    n = image_size(config.vision_config)
    out["pixel_mask"] = torch.ones(shape.batch, n, n, dtype=torch.long)
    return out


def _task(
    name: str,
    cls: str,
    outputs: tuple[str, ...],
    axes: dict,
    agreement: dict,
    description: str,
    score: ScoreReader | None = None,
) -> TaskSpec:
    return TaskSpec(
        name,
        cls,
        single_component(INPUTS, outputs, {**AXES, **axes}),
        make_inputs,
        agreement=agreement,
        description=description,
        run_inputs=host_bridgetower.run_inputs,
        scores=score,
    )


# ---------------------------------------------------------------- --kernels: vision blocks and link towers
def _residual_block_attention(
    self: nn.Module, original: Callable, hidden_state: torch.Tensor, attention_mask: torch.Tensor | None
) -> torch.Tensor:
    """BridgeTowerResidualAttention.attention: nn.MultiheadAttention on (L, B, E), key padding mask True =
    pad."""
    mha: nn.MultiheadAttention = self.attn
    if use_original(self):
        return original(hidden_state, attention_mask)
    seq, bsz, embed = hidden_state.shape
    heads = mha.num_heads
    qkv = nn.functional.linear(hidden_state, mha.in_proj_weight, mha.in_proj_bias)
    query, key, value = qkv.view(seq, bsz, 3, heads, embed // heads).permute(2, 1, 3, 0, 4).unbind(0)
    bias = None
    if self.attn_mask is not None:  # (L, L): bool True = masked, or additive float
        m = self.attn_mask
        bias = additive_bias(~m if m.dtype == torch.bool else m, query.dtype)
    keep = None if attention_mask is None else ~attention_mask.to(torch.bool)  # the kernel's mask: 1 = keep
    out = kernel_attention(
        query, key, value, bias=bias, scale=(embed // heads) ** -0.5, key_padding_mask=keep
    )
    return mha.out_proj(out.permute(2, 0, 1, 3).reshape(seq, bsz, embed))


def _check_mha(module: nn.Module) -> str | None:
    mha = module.attn
    if not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn or mha.batch_first:
        return "expected nn.MultiheadAttention with packed in_proj, no bias_k/zero_attn, sequence-first"
    return None


def _link_tower(
    self: nn.Module,
    original: Callable,
    hidden_states: torch.Tensor,
    cross_modal_hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None,
) -> torch.Tensor:
    """BridgeTowerLinkTower: LayerNorm(a + b) for add / scaled_add / interpolate, the scaling kept as in
    eager."""
    if self.training:
        return original(hidden_states, cross_modal_hidden_states, attention_mask)
    x, residual = hidden_states, cross_modal_hidden_states
    if self.link_tower_type == "scaled_add":
        x = hidden_states * self.scaled_factor
    elif self.link_tower_type == "interpolate":
        x, residual = hidden_states * (1 - self.beta), cross_modal_hidden_states * self.beta
    return add_layer_norm(x, residual, self.LayerNorm)


def _check_link_tower(module: nn.Module) -> str | None:
    if module.link_tower_type not in ("add", "scaled_add", "interpolate"):
        return f"link_tower_type {module.link_tower_type!r}"
    return check_layer_norm(module.LayerNorm)


_M = "bridgetower.modeling_bridgetower."
INJECTION = (
    interface(f"{_M}BridgeTowerSelfAttention", f"{_M}BridgeTowerCrossAttention"),
    Rule(
        "attention",
        (f"{_M}BridgeTowerResidualAttention",),
        _residual_block_attention,
        method="attention",
        check=_check_mha,
    ),
    post_norm(f"{_M}BridgeTowerSelfOutput", f"{_M}BridgeTowerOutput"),
    Rule("bridge", (f"{_M}BridgeTowerLinkTower",), _link_tower, check=_check_link_tower),
)

_BT_ALL = ("itm", "itc", "mlm", "features")
PRESETS = (
    Preset(
        "bridgetower-base",
        "bridgetower",
        ("features",),
        "BridgeTower/bridgetower-base",
        "bridgetower-tiny",
        "BridgeTower base: image/text/cross-modal features",
    ),
    Preset(
        "bridgetower-base-itm-mlm",
        "bridgetower",
        ("itm", "mlm", "features"),
        "BridgeTower/bridgetower-base-itm-mlm",
        "bridgetower-tiny",
        "BridgeTower base fine-tuned for image-text matching and masked LM",
    ),
    Preset(
        "bridgetower-large-itm-mlm-itc",
        "bridgetower",
        ("itm", "itc", "mlm", "features"),
        "BridgeTower/bridgetower-large-itm-mlm-itc",
        "bridgetower-tiny",
        "BridgeTower large: matching, contrastive and masked LM heads",
    ),
    # Tiny twin: same architecture code paths, a few MB, every task of the family.
    Preset("bridgetower-tiny", "bridgetower", _BT_ALL, None, None, "tiny BridgeTower (tests)"),
)

FAMILY = FamilySpec(
    name="bridgetower",
    model_types=("bridgetower",),
    tasks={
        "itm": _task(
            "itm",
            "BridgeTowerForImageAndTextRetrieval",
            ("logits",),
            {"logits": {0: "batch"}},
            {"logits": "argmax"},
            "image-text matching logits (no match / match)",
            scores.itm("logits"),
        ),
        "itc": _task(
            "itc",
            "BridgeTowerForContrastiveLearning",
            ("text_embeds", "image_embeds", "cross_embeds"),
            {"text_embeds": {0: "batch"}, "image_embeds": {0: "batch"}, "cross_embeds": {0: "batch"}},
            {},
            "contrastive text / image / cross-modal embeddings",
            scores.cosine("text_embeds", "image_embeds"),
        ),
        # mlm and features have no image-text score: `vlexport run` refuses them
        "mlm": _task(
            "mlm",
            "BridgeTowerForMaskedLM",
            ("logits",),
            {"logits": {0: "batch", 1: "sequence"}},
            {"logits": "argmax"},
            "masked-LM logits over the vocabulary",
        ),
        "features": _task(
            "features",
            "BridgeTowerModel",
            ("text_features", "image_features", "pooler_output"),
            {
                "text_features": {0: "batch", 1: "sequence"},
                "image_features": {0: "batch"},
                "pooler_output": {0: "batch"},
            },
            {},
            "text, image and pooled cross-modal features",
        ),
    },
    architectures={
        "BridgeTowerForImageAndTextRetrieval": ("itm", "mlm", "features"),
        "BridgeTowerForMaskedLM": ("mlm", "itm", "features"),
        "BridgeTowerForContrastiveLearning": ("itc", "itm", "mlm", "features"),
        "BridgeTowerModel": ("features",),
    },
    injection=INJECTION,
    ort_model_type="bert",  # RoBERTa text and CLIP-ViT vision encoder blocks: what ORT's "bert" fusions match
    title="BridgeTower",
    position_offset=roberta_position_offset,
    presets=PRESETS,
)
