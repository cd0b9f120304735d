"""BridgeTower: RoBERTa text tower + CLIP-ViT vision tower joined by cross-modal bridge layers."""

from __future__ import annotations

import torch
from transformers import PretrainedConfig

from vlexport.models.base import FamilySpec, TaskSpec, single_component
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
    out = text_inputs(text.vocab_size, shape, gen, pad_token_id=text.pad_token_id, first_token_id=text.bos_token_id)
    out["pixel_values"] = pixel_values(config.vision_config, shape.batch, gen)
    n = image_size(config.vision_config)
    out["pixel_mask"] = torch.ones(shape.batch, n, n, dtype=torch.long)
    return out


def _task(name: str, cls: str, outputs: tuple[str, ...], axes: dict, agreement: dict, description: str) -> TaskSpec:
    return TaskSpec(name, cls, single_component(INPUTS, outputs, {**AXES, **axes}), make_inputs,
                    agreement=agreement, description=description)


FAMILY = FamilySpec(
    name="bridgetower",
    model_types=("bridgetower",),
    tasks={
        "itm": _task("itm", "BridgeTowerForImageAndTextRetrieval", ("logits",), {"logits": {0: "batch"}},
                     {"logits": "argmax"}, "image-text matching logits (no match / match)"),
        "itc": _task("itc", "BridgeTowerForContrastiveLearning", ("text_embeds", "image_embeds", "cross_embeds"),
                     {"text_embeds": {0: "batch"}, "image_embeds": {0: "batch"}, "cross_embeds": {0: "batch"}},
                     {}, "contrastive text / image / cross-modal embeddings"),
        "mlm": _task("mlm", "BridgeTowerForMaskedLM", ("logits",), {"logits": {0: "batch", 1: "sequence"}},
                     {"logits": "argmax"}, "masked-LM logits over the vocabulary"),
        "features": _task("features", "BridgeTowerModel", ("text_features", "image_features", "pooler_output"),
                          {"text_features": {0: "batch", 1: "sequence"}, "image_features": {0: "batch"},
                           "pooler_output": {0: "batch"}}, {}, "text, image and pooled cross-modal features"),
    },
    architectures={
        "BridgeTowerForImageAndTextRetrieval": ("itm", "mlm", "features"),
        "BridgeTowerForMaskedLM": ("mlm", "itm", "features"),
        "BridgeTowerForContrastiveLearning": ("itc", "itm", "mlm", "features"),
        "BridgeTowerModel": ("features",),
    },
)
