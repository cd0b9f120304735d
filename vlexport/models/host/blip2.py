"""BLIP-2's generation glue (Blip2ForConditionalGeneration.generate up to the language model), numpy only."""

from __future__ import annotations

from typing import Any

import numpy as np

from vlexport.errors import UsageError


def place_queries(env: dict[str, np.ndarray], s: dict[str, Any]) -> dict[str, np.ndarray]:
    """Blip2ForConditionalGeneration.generate up to the LM: default prompt [image]*Q + [bos], mask of ones,
    query embeddings scattered into the image-token positions (row-major, as masked_scatter)."""
    query = env["query_embeds"]
    batch, q, width = query.shape
    ids = env.get("input_ids")
    if ids is None:
        if s.get("bos_token_id") is None:
            raise UsageError(
                "This BLIP-2 model (T5 language model) has no default prompt: give a prompt (--text), "
                "e.g. 'Question: what is in the picture? Answer:'."
            )
        ids = np.tile(np.array([[s["image_token_id"]] * q + [s["bos_token_id"]]], dtype=np.int64), (batch, 1))
    mask = env.get("attention_mask")
    mask = np.ones_like(ids) if mask is None else mask
    image_mask = ids == s["image_token_id"]
    counts = image_mask.sum(1)
    if (counts != q).any():
        raise UsageError(
            f"Each BLIP-2 prompt must contain exactly num_query_tokens={q} image tokens (id "
            f"{s['image_token_id']}); "
            f"got {sorted(set(counts.tolist()))}. Without them generate() silently ignores the image. "
            "Prepend "
            f"{q} image tokens to the tokenized prompt (the BLIP-2 processor does that)."
        )
    embeds = np.zeros((*ids.shape, width), dtype=query.dtype)
    embeds[image_mask] = query.reshape(-1, width)
    return {"input_ids": ids, "attention_mask": mask, "image_mask": image_mask, "image_embeds": embeds}


def opt_prompt(env: dict[str, np.ndarray], s: dict[str, Any]) -> dict[str, np.ndarray]:
    return {"decoder_input_ids": env["input_ids"], "decoder_attention_mask": env["attention_mask"]}


def t5_prompt(env: dict[str, np.ndarray], s: dict[str, Any]) -> dict[str, np.ndarray]:
    # T5 generate(): the decoder starts from decoder_start_token_id and attends to the encoder's mask. Its own
    # mask is all ones (the start token is the pad id: inferring a mask from pads would hide it).
    batch = env["input_ids"].shape[0]
    return {
        "decoder_input_ids": np.full((batch, 1), s["decoder_start_token_id"], dtype=np.int64),
        "decoder_attention_mask": np.ones((batch, 1), dtype=np.int64),
        "encoder_attention_mask": env["attention_mask"],
    }
