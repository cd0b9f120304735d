"""VisionTextDualEncoder built from two local encoder directories, then exported like any local model."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import BertConfig, BertModel, ViTConfig, ViTModel

from vlexport.cli import main
from vlexport.manifest import Manifest


def test_dual_encoder_from_two_dirs_exports_and_validates(tmp_path: Path, capsys) -> None:
    torch.manual_seed(0)
    common = dict(hidden_size=32, num_attention_heads=2, intermediate_size=64, num_hidden_layers=1)
    ViTModel(ViTConfig(image_size=32, patch_size=8, **common)).save_pretrained(tmp_path / "vit")
    BertModel(BertConfig(vocab_size=200, max_position_embeddings=32, **common)).save_pretrained(tmp_path / "bert")
    assert main(["dual-encoder", str(tmp_path / "vit"), str(tmp_path / "bert"), "-o", str(tmp_path / "dual"),
                 "--projection-dim", "16"]) == 0
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
