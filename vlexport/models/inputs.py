"""Seeded example inputs: images, token ids and realistic padded attention masks."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from vlexport.contracts.family import InputShape

if TYPE_CHECKING:  # annotations only: compiled artifacts generate without transformers
    from transformers import PretrainedConfig


# The export example avoids 1 (torch.export specialises size-1 dims) and the validation shapes differ
# from it in both batch and sequence length.
EXPORT_SHAPE = InputShape(batch=2, seq_len=11)
VALIDATION_SHAPES = (InputShape(1, 5), InputShape(3, 16), InputShape(4, 23))


def image_size(vision_config: PretrainedConfig) -> int:
    size = vision_config.image_size
    return size if isinstance(size, int) else size[0]


def pixel_values(vision_config: PretrainedConfig, batch: int, gen: torch.Generator) -> torch.Tensor:
    """Normalised-image-like values (roughly N(0,1) per channel, as a processor would produce)."""
    n = image_size(vision_config)
    return torch.randn(
        batch,
        vision_config.num_channels if hasattr(vision_config, "num_channels") else 3,
        n,
        n,
        generator=gen,
    )


def text_inputs(
    vocab_size: int,
    shape: InputShape,
    gen: torch.Generator,
    *,
    pad_token_id: int = 0,
    first_token_id: int | None = None,
) -> dict[str, torch.Tensor]:
    """Random token ids with right padding: row i keeps a different length (the first row is full)."""
    # Ids below 3 are the usual special tokens (pad/bos/eos) of these vocabularies.
    ids = torch.randint(3, vocab_size, (shape.batch, shape.seq_len), generator=gen)
    mask = torch.ones(shape.batch, shape.seq_len, dtype=torch.long)
    for row in range(1, shape.batch):
        keep = max(2, shape.seq_len - (row * 3) % shape.seq_len)
        mask[row, keep:] = 0
    if first_token_id is not None:
        ids[:, 0] = first_token_id
    ids = ids.masked_fill(mask == 0, pad_token_id)
    return {"input_ids": ids, "attention_mask": mask}


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)
