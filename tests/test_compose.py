"""VisionTextDualEncoder built from two local encoder directories, then exported like any local model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertModel, ViTConfig, ViTModel

from vlexport.cli import main
from vlexport.compose import TEXT_TYPES, VISION_TYPES, check_role
from vlexport.contracts.manifest import Manifest
from vlexport.errors import UsageError


def test_dual_encoder_from_two_dirs_exports_and_validates(tmp_path: Path, capsys) -> None:
    torch.manual_seed(0)
    common = {"hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64, "num_hidden_layers": 1}
    ViTModel(ViTConfig(image_size=32, patch_size=8, **common)).save_pretrained(tmp_path / "vit")
    BertModel(BertConfig(vocab_size=200, max_position_embeddings=32, **common)).save_pretrained(
        tmp_path / "bert"
    )
    assert (
        main(
            [
                "dual-encoder",
                str(tmp_path / "vit"),
                str(tmp_path / "bert"),
                "-o",
                str(tmp_path / "dual"),
                "--projection-dim",
                "16",
            ]
        )
        == 0
    )
    assert main(["onnx", str(tmp_path / "dual"), "-o", str(tmp_path / "onnx")]) == 0
    manifest = Manifest.read(tmp_path / "onnx")
    assert manifest.family == "vision-text-dual-encoder" and manifest.weights["kind"] == "local"
    assert manifest.validation.passed is True
    assert manifest.components["model"].outputs[0].shape == ["batch", 16]


def test_dual_encoder_rejects_a_dir_without_weights(tmp_path: Path, capsys) -> None:
    (tmp_path / "v").mkdir()
    (tmp_path / "v" / "config.json").write_text("{}")
    (tmp_path / "t").mkdir()
    assert main(["dual-encoder", str(tmp_path / "v"), str(tmp_path / "t"), "-o", str(tmp_path / "o")]) == 2
    assert "no *.safetensors" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_full_clip_as_vision_and_roberta_as_text_compose_and_export(tmp_path: Path, capsys) -> None:
    # Not the ViT + BERT default: VisionTextDualEncoder takes a full CLIP's vision part, and any pooled text
    # encoder.
    from transformers import CLIPConfig, CLIPModel, RobertaConfig, RobertaModel

    torch.manual_seed(0)
    common = {"hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64, "num_hidden_layers": 1}
    CLIPModel(
        CLIPConfig(
            vision_config=dict(image_size=32, patch_size=8, **common),
            text_config=dict(vocab_size=100, **common),
        )
    ).save_pretrained(tmp_path / "clip")
    RobertaModel(
        RobertaConfig(vocab_size=200, max_position_embeddings=40, pad_token_id=1, **common)
    ).save_pretrained(tmp_path / "roberta")
    assert (
        main(
            [
                "dual-encoder",
                str(tmp_path / "clip"),
                str(tmp_path / "roberta"),
                "-o",
                str(tmp_path / "dual"),
                "--projection-dim",
                "8",
            ]
        )
        == 0
    )
    assert main(["onnx", str(tmp_path / "dual"), "-o", str(tmp_path / "onnx")]) == 0
    assert Manifest.read(tmp_path / "onnx").validation.passed is True


@pytest.mark.parametrize(
    ("role", "config", "phrase"),
    [
        ("text", {"model_type": "distilbert"}, "'distilbert' model, which has no pooled output"),
        ("vision", {"model_type": "convnext"}, "has no single hidden_size"),
        ("vision", {"model_type": "siglip", "text_config": {}, "vision_config": {}}, "(SiglipVisionModel)"),
        ("text", {"model_type": "clip", "text_config": {}, "vision_config": {}}, "(CLIPTextModel)"),
        ("text", {"model_type": "vit"}, "'vit' model, which is a vision encoder"),
        (
            "text",
            {"model_type": "blip", "text_config": {}, "vision_config": {}},
            "'blip' model, which is multimodal",
        ),
        ("vision", {"model_type": "gpt2"}, "'gpt2' model, which is not an encoder known to compose"),
        ("vision", {"architectures": ["ViTModel"]}, "has no model_type"),
    ],
)
def test_check_role_reads_the_config_only(tmp_path: Path, role: str, config: dict, phrase: str) -> None:
    (tmp_path / "config.json").write_text(json.dumps(config))  # no weights: the check needs none
    with pytest.raises(UsageError) as e:
        check_role(tmp_path, role)
    assert phrase in str(e.value) and f"The {role} side takes" in str(e.value)


def test_check_role_accepts_the_encoders_it_lists(tmp_path: Path) -> None:
    for role, types in (("vision", VISION_TYPES), ("text", TEXT_TYPES)):
        for model_type in types:
            (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type}))
            assert check_role(tmp_path, role) == model_type
