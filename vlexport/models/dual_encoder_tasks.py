"""Shared task declaration for CLIP-style two-tower models (AltCLIP, VisionTextDualEncoder, BlipModel)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from vlexport.contracts.family import TaskSpec
from vlexport.models import scores
from vlexport.models.base import single_component
from vlexport.models.inputs import InputShape, generator, pixel_values, text_inputs

if TYPE_CHECKING:  # annotations only (family modules load without transformers)
    from transformers import PretrainedConfig

INPUTS = ("input_ids", "attention_mask", "pixel_values")
OUTPUTS = ("text_embeds", "image_embeds", "logits_per_image")
AXES = {
    "input_ids": {0: "batch", 1: "sequence"},
    "attention_mask": {0: "batch", 1: "sequence"},
    "pixel_values": {0: "batch"},
    "text_embeds": {0: "batch"},
    "image_embeds": {0: "batch"},
    "logits_per_image": {0: "batch", 1: "batch"},
}


def make_inputs(config: PretrainedConfig, shape: InputShape, seed: int) -> dict[str, torch.Tensor]:
    gen = generator(seed)
    text = config.text_config
    out = text_inputs(text.vocab_size, shape, gen, pad_token_id=text.pad_token_id or 0)
    out["pixel_values"] = pixel_values(config.vision_config, shape.batch, gen)
    return out


def features_task(hf_class_name: str, description: str = "projected text and image embeddings") -> TaskSpec:
    """The ``features`` task: projected embeddings plus the image-text similarity matrix."""
    return TaskSpec(
        "features",
        hf_class_name,
        single_component(INPUTS, OUTPUTS, AXES),
        make_inputs,
        agreement={"logits_per_image": "argmax"},
        description=description,
        scores=scores.similarity_row("logits_per_image"),
    )
