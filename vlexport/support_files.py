"""Files an artifact carries beside its graphs so the directory alone can run: config, tokenizer,
processor."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from transformers import PretrainedConfig

# What save_pretrained writes for tokenizers and processors of these families.
SUPPORT_PATTERNS = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "added_tokens.json",
    "preprocessor_config.json",
    "processor_config.json",
    "generation_config.json",
    "chat_template.jinja",
)


def write_config(config: PretrainedConfig, directory: Path) -> str:
    """The HF config copy: validation rebuilds the eager reference from it."""
    (directory / "config.json").write_text(
        json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str) + "\n"
    )
    return "config.json"


def copy_support_files(source_dir: Path | None, directory: Path) -> list[str]:
    """Copy tokenizer / processor files that the source directory has; return their relative names."""
    if source_dir is None:
        return []
    copied = []
    for name in SUPPORT_PATTERNS:
        src = source_dir / name
        if src.is_file():
            shutil.copy2(src, directory / name)
            copied.append(name)
    return copied


def tokenizer_record(copied: list[str]) -> dict[str, Any]:
    if any(name.startswith(("tokenizer", "vocab", "spiece", "sentencepiece")) for name in copied):
        return {"kind": "copied", "files": [n for n in copied if n != "preprocessor_config.json"]}
    return {"kind": "none"}
