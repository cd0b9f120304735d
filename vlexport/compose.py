"""Build a VisionTextDualEncoder checkpoint from two local encoder directories.

The projections and logit scale are new (seeded) parameters, as in
``VisionTextDualEncoderModel.from_vision_text_pretrained``: fine-tune before using the scores. The
result is an ordinary save_pretrained directory, so every other command treats it as a local model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from vlexport.artifact import staged_dir
from vlexport.errors import UsageError
from vlexport.weights import check_safetensors


def _encoder_dir(path: Path, role: str) -> Path:
    if not (path / "config.json").is_file():
        raise UsageError(f"The {role} encoder {path} has no config.json; pass a directory written by save_pretrained.")
    shards = sorted(path.glob("*.safetensors"))
    if not shards:
        raise UsageError(f"The {role} encoder {path} has no *.safetensors weights; re-save it with save_pretrained.")
    for shard in shards:
        check_safetensors(shard)
    return path


def compose_dual_encoder(vision_dir: str | Path, text_dir: str | Path, output: str | Path, *,
                         projection_dim: int = 512, seed: int = 0, force: bool = False) -> Path:
    from transformers import VisionTextDualEncoderModel

    vision_dir = _encoder_dir(Path(vision_dir), "vision")
    text_dir = _encoder_dir(Path(text_dir), "text")
    torch.manual_seed(seed)
    try:
        model = VisionTextDualEncoderModel.from_vision_text_pretrained(
            str(vision_dir), str(text_dir), projection_dim=projection_dim, use_safetensors=True)
    except (ValueError, KeyError, OSError) as e:
        raise UsageError(f"Cannot combine {vision_dir} (vision) and {text_dir} (text): {e}. The vision directory "
                         "must hold a vision model (ViT, CLIP vision, ...) and the text one a text encoder "
                         "(BERT, RoBERTa, ...).") from None
    with staged_dir(output, force=force) as tmp:
        model.save_pretrained(tmp)
        for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
            if (text_dir / name).is_file():
                (tmp / name).write_bytes((text_dir / name).read_bytes())
        if (vision_dir / "preprocessor_config.json").is_file():
            (tmp / "preprocessor_config.json").write_bytes((vision_dir / "preprocessor_config.json").read_bytes())
        (tmp / "vlexport_compose.json").write_text(json.dumps(
            {"vision": str(vision_dir.resolve()), "text": str(text_dir.resolve()), "projection_dim": projection_dim,
             "seed": seed, "note": "projections are newly initialised"}, indent=2) + "\n")
    return Path(output)
