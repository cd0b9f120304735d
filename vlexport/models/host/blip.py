"""BLIP's generation prompt rules (what BlipFor*.generate does before decoding), numpy only."""

from __future__ import annotations

from typing import Any

import numpy as np

from vlexport.errors import UsageError


def caption_prompt(env: dict[str, np.ndarray], s: dict[str, Any]) -> dict[str, np.ndarray]:
    """BlipForConditionalGeneration.generate: default prompt [bos, eos]; the first token becomes bos and the
    last one (the tokenizer's [SEP]) is dropped, from the ids and the mask alike."""
    batch = env["pixel_values"].shape[0]
    ids = env.get("input_ids")
    if ids is None:
        ids = np.tile(np.array([[s["bos_token_id"], s["text_eos_token_id"]]], dtype=np.int64), (batch, 1))
    if ids.shape[1] < 2:
        raise UsageError(
            "A BLIP caption prompt needs at least 2 tokens ([CLS] text [SEP] as the tokenizer writes "
            "it): generate() drops the last one."
        )
    ids = ids.copy()
    ids[:, 0] = s["bos_token_id"]
    mask = env.get("attention_mask")
    return {
        "decoder_input_ids": ids[:, :-1],
        "decoder_attention_mask": None if mask is None else mask[:, :-1],
    }


def answer_prompt(env: dict[str, np.ndarray], s: dict[str, Any]) -> dict[str, np.ndarray]:
    """BlipForQuestionAnswering.generate: the answer decoder starts from [bos] alone, without a mask."""
    batch = env["pixel_values"].shape[0]
    return {"decoder_input_ids": np.full((batch, 1), s["bos_token_id"], dtype=np.int64)}
