"""Build a VisionTextDualEncoder checkpoint from two local encoder directories.

The projections and logit scale are new (seeded) parameters, as in
``VisionTextDualEncoderModel.from_vision_text_pretrained``: fine-tune before using the scores. The
result is an ordinary save_pretrained directory, so every other command treats it as a local model.
Each side's config.json is checked first (:func:`check_role`): a pair that cannot compose is refused
before any weights load or anything is written.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from vlexport.artifact import check_output_dir, staged_dir
from vlexport.errors import UsageError
from vlexport.weights import check_safetensors

# model_type values each tower may have. from_vision_text_pretrained (transformers 5.24) loads a side with
# AutoModel (full CLIP: its vision part) and projects its pooler_output from config.hidden_size; each of these
# was composed with a BERT / ViT partner and exported and validated with `vlexport onnx`.
VISION_TYPES = (
    "vit",
    "deit",
    "beit",
    "dinov2",
    "dinov2_with_registers",
    "swin",
    "swinv2",
    "clip_vision_model",
    "siglip_vision_model",
    "chinese_clip_vision_model",
    "clip",
)
TEXT_TYPES = (
    "bert",
    "roberta",
    "xlm-roberta",
    "xlm-roberta-xl",
    "camembert",
    "albert",
    "mpnet",
    "ernie",
    "roberta-prelayernorm",
    "megatron-bert",
    "mobilebert",
    "luke",
    "data2vec-text",
    "clip_text_model",
)
_NO_POOLER = "has no pooled output (VisionTextDualEncoder projects pooler_output)"
_TOWERS = {
    ("vision", "siglip"): "SiglipVisionModel",
    ("text", "clip"): "CLIPTextModel",
}  # full two-tower models
WHY_NOT = {  # encoders that fail inside VisionTextDualEncoder, and why
    **dict.fromkeys(
        (
            "distilbert",
            "electra",
            "deberta",
            "deberta-v2",
            "nystromformer",
            "data2vec-vision",
            "vit_msn",
            "vit_mae",
            "ijepa",
        ),
        _NO_POOLER,
    ),
    **dict.fromkeys(
        ("convnext", "convnextv2", "resnet", "regnet"), "has no single hidden_size for the projection"
    ),
}


def _encoder_dir(path: Path, role: str) -> Path:
    if not (path / "config.json").is_file():
        raise UsageError(
            f"The {role} encoder {path} has no config.json; pass a directory written by save_pretrained."
        )
    shards = sorted(path.glob("*.safetensors"))
    if not shards:
        raise UsageError(
            f"The {role} encoder {path} has no *.safetensors weights; re-save it with save_pretrained."
        )
    for shard in shards:
        check_safetensors(shard)
    return path


def check_role(path: Path, role: str) -> str:
    """The model_type in ``path``/config.json must be a ``role`` ("vision" / "text") encoder that composes."""
    try:
        config = json.loads((path / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(
            f"{path / 'config.json'} is not valid JSON ({e}); re-save the {role} encoder."
        ) from None
    mt = config.get("model_type") if isinstance(config, dict) else None
    wanted, other = (VISION_TYPES, TEXT_TYPES) if role == "vision" else (TEXT_TYPES, VISION_TYPES)
    if mt in wanted:
        return mt
    if mt is None:
        why = "has no model_type in its config.json (it was not written by save_pretrained)"
    elif (role, mt) in _TOWERS:
        tower = _TOWERS[role, mt]
        why = f"holds a full {mt} model: save its {role} tower alone ({tower}) and pass that directory"
    elif mt in other:
        side = "text" if role == "vision" else "vision"
        why = f"holds a {mt!r} model, which is a {side} encoder (wrong side?)"
    elif "text_config" in config and "vision_config" in config:
        why = f"holds a {mt!r} model, which is multimodal (it has both towers), not a {role} encoder"
    else:
        why = f"holds a {mt!r} model, which {WHY_NOT.get(mt, 'is not an encoder known to compose')}"
    raise UsageError(
        f"The {role} encoder {path} {why}. The {role} side takes a save_pretrained directory whose "
        f"model_type is one of: {', '.join(wanted)}."
    )


def compose_dual_encoder(
    vision_dir: str | Path,
    text_dir: str | Path,
    output: str | Path,
    *,
    projection_dim: int = 512,
    seed: int = 0,
    force: bool = False,
) -> Path:
    """Write a VisionTextDualEncoder save_pretrained directory at ``output``; UsageError for a pair that
    cannot work."""
    from transformers import VisionTextDualEncoderModel

    vision_dir = _encoder_dir(Path(vision_dir), "vision")
    text_dir = _encoder_dir(Path(text_dir), "text")
    check_role(vision_dir, "vision")  # from the configs alone: before loading weights or writing anything
    check_role(text_dir, "text")
    check_output_dir(output, force=force, source_dir=(vision_dir, text_dir))
    torch.manual_seed(seed)
    try:
        model = VisionTextDualEncoderModel.from_vision_text_pretrained(
            str(vision_dir), str(text_dir), projection_dim=projection_dim, use_safetensors=True
        )
    except (ValueError, KeyError, OSError) as e:
        raise UsageError(
            f"Cannot combine {vision_dir} (vision) and {text_dir} (text): {e}. The vision directory "
            "must hold a vision model (ViT, CLIP vision, ...) and the text one a text encoder "
            "(BERT, RoBERTa, ...)."
        ) from None
    weights = sum(p.numel() * p.element_size() for p in model.parameters())  # the disk-space estimate
    with staged_dir(output, force=force, expected_bytes=weights, source_dir=(vision_dir, text_dir)) as tmp:
        model.save_pretrained(tmp)
        for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
            if (text_dir / name).is_file():
                (tmp / name).write_bytes((text_dir / name).read_bytes())
        if (vision_dir / "preprocessor_config.json").is_file():
            (tmp / "preprocessor_config.json").write_bytes(
                (vision_dir / "preprocessor_config.json").read_bytes()
            )
        (tmp / "vlexport_compose.json").write_text(
            json.dumps(
                {
                    "vision": str(vision_dir.resolve()),
                    "text": str(text_dir.resolve()),
                    "projection_dim": projection_dim,
                    "seed": seed,
                    "note": "projections are newly initialised",
                },
                indent=2,
            )
            + "\n"
        )
    return Path(output)
