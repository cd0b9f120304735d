"""Texts for an artifact's graphs: options that apply to its task, padded batches for encoders, the token
limit.

Shared by the task objects (runtime/tasks.py), `vlexport run`, calibration and the Triton preprocessors, so
that every caller encodes a text the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from vlexport.contracts.manifest import Manifest
from vlexport.errors import UsageError
from vlexport.models import get_family
from vlexport.runtime.tokenizer import ArtifactTokenizer, build_placeholder, pad_batch

if TYPE_CHECKING:
    from tokenizers import Tokenizer


def check_options(
    directory: Path,
    manifest: Manifest,
    *,
    max_new_tokens: int | None,
    num_beams: int | None,
    raw_prompt: bool,
) -> None:
    """Options that do not apply to the artifact are an error, not silently ignored (before anything
    loads)."""
    what = f"{directory} holds a {manifest.family} {manifest.task} artifact"
    if not get_family(manifest.family).task(manifest.task).generative:
        given = [
            name
            for name, value in (
                ("--num-beams", num_beams),
                ("--max-new-tokens", max_new_tokens),
                ("--raw-prompt", raw_prompt or None),
            )
            if value is not None
        ]
        if given:
            raise UsageError(
                f"{' and '.join(given)} appl{'ies' if len(given) == 1 else 'y'} to generative artifacts "
                f"(caption, vqa, generate); {what}, which generates no text (it scores or embeds its "
                "inputs). Drop the option."
            )
    elif raw_prompt and "{}" not in (manifest.generation.get("prompt_template") or ""):
        raise UsageError(
            f"--raw-prompt turns off the prompt template (BLIP-2's 'Question: {{}} Answer:'); {what}, "
            "whose recipe has none, so --text is already used as is. Drop --raw-prompt."
        )


def token_limit(directory: Path, manifest: Manifest) -> int | None:
    """The longest token sequence the artifact's graphs take (its position table), None when unbounded."""
    from vlexport.models.base import with_axis_limits
    from vlexport.runtime.generate import artifact_config

    family, config = get_family(manifest.family), artifact_config(directory)
    offset = family.position_offset(config)
    limits = [
        with_axis_limits(spec, config, offset).axis_max.get("sequence")
        for spec in family.task(manifest.task).components(config)
    ]
    return min((n for n in limits if n), default=None)


def placeholder_text_tokenizer(directory: Path) -> tuple[Tokenizer, int]:
    """The byte-level placeholder and pad id that encode encoder texts when the artifact has no tokenizer
    (random weights); `vlexport triton` writes it as the served tokenizer.json."""
    from vlexport.runtime.generate import artifact_config

    text = artifact_config(directory).text_config
    settings = {
        "pad_token_id": text.pad_token_id,
        "bos_token_id": getattr(text, "bos_token_id", None),
        "eos_token_id": [text.eos_token_id] if getattr(text, "eos_token_id", None) is not None else [],
    }
    keys = (
        tuple(k for k in ("bos_token_id",) if settings[k] is not None),
        tuple(k for k in ("eos_token_id",) if settings[k]),
    )
    return build_placeholder(text.vocab_size, settings, keys), text.pad_token_id or 0


class PlaceholderTexts:
    """The byte-level placeholder encoding of encoder texts, for artifacts without a tokenizer (built
    once)."""

    def __init__(self, directory: Path):
        self.tok, self.pad = placeholder_text_tokenizer(directory)

    def batch(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        return pad_batch([self.tok.encode(t).ids for t in texts], self.pad)


def placeholder_batch(directory: Path, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    return PlaceholderTexts(directory).batch(texts)


def encode_batch(
    tokenizer: ArtifactTokenizer | PlaceholderTexts, texts: Sequence[str], limit: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded ids and mask of encoder texts (one width for all), refused past the position table."""
    ids, mask = tokenizer.batch(texts)
    if limit is not None and ids.shape[1] > limit:
        longest = int(np.argmax(mask.sum(axis=1)))
        raise UsageError(
            f"--text {texts[longest][:40]!r} is {ids.shape[1]} tokens, more than the {limit} this model's "
            "position table holds; shorten it."
        )
    return ids, mask
