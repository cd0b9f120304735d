"""Fault injection: weights that do not fit the model, weights changed after export, encoders that cannot
compose, advice for presets without weights, and `vlexport run` options that do not apply.

Every bad input must end in one paragraph on stderr (``error: ...``, no traceback), the right exit code (1
failed check, 2 usage) and nothing written. The bad weight directories are edits of one save_pretrained
directory of ``bridgetower-tiny`` (ITM), built once per module.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from vlexport.cli import main
from vlexport.contracts.manifest import Manifest
from vlexport.weights import load_model, resolve

Tensors = dict[str, torch.Tensor]
HEAD = ("itm_score.fc.bias", "itm_score.fc.weight")  # BridgeTowerForImageAndTextRetrieval's matching head


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete save_pretrained directory of bridgetower-tiny ITM (seeded random weights)."""
    path = tmp_path_factory.mktemp("saved") / "bridgetower-itm"
    load_model(resolve("bridgetower-tiny", random_weights=True, seed=5), "itm").save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import BertConfig, BertModel

    path = tmp_path_factory.mktemp("bert") / "bert"
    torch.manual_seed(0)
    BertModel(
        BertConfig(
            vocab_size=200,
            hidden_size=32,
            num_attention_heads=2,
            intermediate_size=64,
            num_hidden_layers=1,
            max_position_embeddings=32,
        )
    ).save_pretrained(path)
    return path


def _variant(saved: Path, dest: Path, edit: Callable[[Tensors], Tensors]) -> Path:
    """A copy of ``saved`` whose safetensors file holds ``edit(tensors)``."""
    shutil.copytree(saved, dest)
    tensors = load_file(dest / "model.safetensors")
    save_file(edit(tensors), dest / "model.safetensors", metadata={"format": "pt"})
    return dest


def _cli(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _one_paragraph(code: int, err: str, expected: int, *phrases: str) -> str:
    """The error as a user reads it: right exit code, one paragraph, no traceback; returns it unwrapped."""
    assert code == expected, err
    assert "Traceback" not in err and err.startswith("error:"), err
    assert "\n\n" not in err.strip() and "LOAD REPORT" not in err, err  # transformers' own report stays quiet
    flat = " ".join(err.split())
    for phrase in phrases:
        assert phrase in flat, flat
    return flat


def _nothing_written(parent: Path) -> None:
    assert not list(parent.iterdir()), list(parent.iterdir())  # no output and no partial sibling


# ---------------------------------------------------------------- checkpoints that do not fit the model
def test_missing_tensors_are_an_error_that_names_them(saved: Path, tmp_path: Path, capsys) -> None:
    keys = sorted(load_file(saved / "model.safetensors"))
    dropped = keys[::3]  # a third of the model
    bad = _variant(saved, tmp_path / "bad", lambda t: {k: v for k, v in t.items() if k not in dropped})
    out = tmp_path / "out"
    out.mkdir()
    code, _, err = _cli(capsys, "onnx", bad, "-o", out / "artifact")
    flat = _one_paragraph(
        code,
        err,
        1,
        f"lacks {len(dropped)} of the {len(keys)} tensors",
        dropped[0],
        f"and {len(dropped) - 8} more",
        "Re-save the complete model",
    )
    assert sum(k in flat for k in dropped) == 8  # the first eight by name, then a count
    _nothing_written(out)


def test_unexpected_tensors_are_an_error(saved: Path, tmp_path: Path, capsys) -> None:
    bad = _variant(saved, tmp_path / "bad", lambda t: {**t, "extra_head.weight": torch.ones(4, 4)})
    out = tmp_path / "out"
    out.mkdir()
    code, _, err = _cli(capsys, "onnx", bad, "-o", out / "artifact")
    _one_paragraph(
        code,
        err,
        1,
        "holds 1 tensor(s) that no BridgeTower class has: extra_head.weight",
        "--allow-new-weights extra_head.*",
    )
    _nothing_written(out)


def test_shape_mismatch_is_an_error(saved: Path, tmp_path: Path, capsys) -> None:
    def widen(t: Tensors) -> Tensors:
        return {**t, HEAD[1]: torch.zeros(t[HEAD[1]].shape[0] + 1, t[HEAD[1]].shape[1])}

    bad = _variant(saved, tmp_path / "bad", widen)
    out = tmp_path / "out"
    out.mkdir()
    code, _, err = _cli(capsys, "onnx", bad, "-o", out / "artifact")
    _one_paragraph(
        code, err, 1, "1 tensor(s) of another shape", f"{HEAD[1]} (checkpoint [3, 128], model [2, 128])"
    )
    _nothing_written(out)


def test_allowed_new_head_is_seeded_recorded_and_validates_again(saved: Path, tmp_path: Path, capsys) -> None:
    headless = _variant(saved, tmp_path / "headless", lambda t: {k: v for k, v in t.items() if k not in HEAD})
    art = tmp_path / "artifact"
    code, _, err = _cli(
        capsys, "onnx", headless, "-o", art, "--allow-new-weights", "itm_score.*", "--seed", "3"
    )
    assert code == 0, err
    weights = Manifest.read(art).weights
    assert weights["new_weights"] == sorted(HEAD) and weights["new_weights_seed"] == 3
    assert weights["allow_new_weights"] == ["itm_score.*"]
    for _ in range(2):  # the reference is rebuilt from the manifest each time: the same fresh head
        code, out, err = _cli(capsys, "validate", art)
        assert code == 0 and "validation passed" in out, err


def test_allow_pattern_does_not_cover_other_unexpected_tensors(saved: Path, tmp_path: Path, capsys) -> None:
    def edit(t: Tensors) -> Tensors:
        return {**{k: v for k, v in t.items() if k not in HEAD}, "stray.weight": torch.ones(2)}

    bad = _variant(saved, tmp_path / "bad", edit)
    out = tmp_path / "out"
    out.mkdir()
    code, _, err = _cli(capsys, "onnx", bad, "-o", out / "artifact", "--allow-new-weights", "itm_score.*")
    flat = _one_paragraph(code, err, 1, "stray.weight")
    assert "lacks" not in flat  # the allowed head is not reported
    _nothing_written(out)


def test_weights_changed_after_export_fail_validation_naming_the_dir(
    saved: Path, tmp_path: Path, capsys
) -> None:
    model_dir = _variant(saved, tmp_path / "model", lambda t: t)
    art = tmp_path / "artifact"
    code, _, err = _cli(capsys, "onnx", model_dir, "-o", art)
    assert code == 0, err
    header = (model_dir / "model.safetensors").read_bytes()[:4096]
    tensors = load_file(model_dir / "model.safetensors")  # same names, shapes and header; other values
    save_file(
        {**tensors, HEAD[0]: tensors[HEAD[0]] + 1.0},
        model_dir / "model.safetensors",
        metadata={"format": "pt"},
    )
    assert (model_dir / "model.safetensors").read_bytes()[:4096] == header
    code, _, err = _cli(capsys, "validate", art)
    _one_paragraph(
        code,
        err,
        1,
        f"The weights in {model_dir.resolve()} changed since {art} was exported",
        "Re-export, or restore the weights",
    )


# ---------------------------------------------------------------- dual-encoder: composition that cannot work
@pytest.mark.parametrize(
    ("which", "found"),
    [
        ("two-bridgetower", "'bridgetower' model, which is multimodal"),
        ("text-as-vision", "'bert' model, which is a text encoder"),
    ],
)
def test_dual_encoder_refuses_encoders_that_cannot_compose(
    saved: Path, bert_dir: Path, tmp_path: Path, capsys, which: str, found: str
) -> None:
    vision, text = (saved, saved) if which == "two-bridgetower" else (bert_dir, bert_dir)
    out = tmp_path / "out"
    out.mkdir()
    code, _, err = _cli(capsys, "dual-encoder", vision, text, "-o", out / "dual")
    _one_paragraph(code, err, 2, f"The vision encoder {vision}", found, "model_type is one of: vit,")
    _nothing_written(out)


# ---------------------------------------------------------------- advice for presets without weights
def test_tiny_preset_advice_says_there_is_no_checkpoint(monkeypatch, tmp_path: Path, capsys) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, err = _cli(capsys, "onnx", "bridgetower-tiny", "-o", tmp_path / "o")
    flat = _one_paragraph(code, err, 2, "no upstream checkpoint", "--random-weights", "local directory")
    assert "download" not in flat.replace("no weights to download", "")  # nothing to download for a tiny twin
    assert not (tmp_path / "o").exists()


def test_full_preset_advice_names_a_command_that_exists(monkeypatch, tmp_path: Path, capsys) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, err = _cli(capsys, "onnx", "bridgetower-base", "-o", tmp_path / "o")
    flat = _one_paragraph(code, err, 2, "`hf download BridgeTower/bridgetower-base`", "--random-weights")
    assert "huggingface-cli" not in flat
    scripts = {
        e.name for e in metadata.distribution("huggingface_hub").entry_points if e.group == "console_scripts"
    }
    assert "hf" in scripts  # the advised CLI is the one the installed huggingface_hub ships
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------- `vlexport run` options that do not apply
@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from PIL import Image

    path = tmp_path_factory.mktemp("img") / "photo.png"
    Image.new("RGB", (40, 30), (120, 30, 200)).save(path)
    return path


@pytest.mark.parametrize(
    "option",
    [("--num-beams", "3"), ("--max-new-tokens", "5"), ("--raw-prompt",)],
    ids=["num-beams", "max-new-tokens", "raw-prompt"],
)
def test_generation_options_on_a_scoring_artifact(
    exported, image: Path, capsys, option: tuple[str, ...]
) -> None:
    code, out, err = _cli(
        capsys, "run", exported("bridgetower-tiny", "itm"), "--image", image, "--text", "a cat", *option
    )
    _one_paragraph(code, err, 2, f"{option[0]} applies to generative artifacts", "bridgetower itm artifact")
    assert out == ""


def test_raw_prompt_without_a_prompt_template(exported, image: Path, capsys) -> None:
    art = exported("blip-tiny", "caption")
    assert "prompt_template" not in json.loads((art / "manifest.json").read_text())["generation"]
    code, _, err = _cli(capsys, "run", art, "--image", image, "--text", "a photo of", "--raw-prompt")
    _one_paragraph(code, err, 2, "--raw-prompt", "blip caption artifact", "has none")
