"""`vlexport run` on tiny artifacts ("blip-tiny" caption/vqa, "blip2-opt-tiny" and "blip2-flan-t5-tiny"
generate), and bad input: one clear paragraph, a non-zero exit code, no traceback."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from vlexport.cli import main
from vlexport.runtime import load_artifact
from vlexport.runtime.generate import Generator
from vlexport.runtime.preprocess import image_settings, load_image
from vlexport.runtime.tokenizer import ArtifactTokenizer
from vlexport.weights import load_model, resolve


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from PIL import Image

    path = tmp_path_factory.mktemp("img") / "photo.jpg"
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((120, 90, 3)) * 255).astype(np.uint8)).save(path)
    return path


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["run", *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize(
    ("preset", "task", "text"),
    [
        ("blip-tiny", "caption", "a picture of"),
        ("blip-tiny", "vqa", "what is in the picture?"),
        ("blip2-opt-tiny", "generate", "what is in the picture?"),
        ("blip2-flan-t5-tiny", "generate", "what is in the picture?"),
    ],
    ids=["caption", "vqa", "blip2-opt", "blip2-t5"],
)
def test_run_prints_what_hf_generate_produces_for_the_image_and_prompt(
    exported, capsys, image: Path, preset: str, task: str, text: str
) -> None:
    out_dir = exported(preset, task)
    code, out, err = run(capsys, out_dir, "--image", image, "--text", text, "--ids", "--max-new-tokens", "5")
    assert code == 0, err
    printed_ids = json.loads(out.strip().splitlines()[-1].removeprefix("ids: "))
    assert "placeholder tokenizer" in err  # random weights say so

    # The same image preprocessing + prompt through the eager model's generate() gives the same ids.
    artifact = load_artifact(out_dir, device="cpu")
    pixels = torch.from_numpy(load_image(image, image_settings(out_dir, artifact.manifest)))
    s = artifact.manifest.generation
    prompt = text if task != "generate" else s["prompt_template"].format(text)
    ids = ArtifactTokenizer(out_dir, artifact.manifest).encode(prompt)
    if task == "generate":
        ids = [s["image_token_id"]] * s["num_query_tokens"] + ids
    ids_t = torch.tensor([ids])
    model = load_model(resolve(preset, random_weights=True), task)
    with torch.no_grad():
        ref = model.generate(
            pixel_values=pixels, input_ids=ids_t, attention_mask=torch.ones_like(ids_t), max_new_tokens=5
        )
    assert printed_ids == ref[0].tolist()


def test_run_caption_default_prompt_and_beams(exported, capsys, image: Path) -> None:
    code, out, err = run(
        capsys, exported("blip-tiny", "caption"), "--image", image, "--num-beams", "3", "--ids"
    )
    assert code == 0, err
    assert out.strip().splitlines()[-1].startswith("ids: [1000,")  # the caption starts from BLIP's bos


def test_run_scores_non_generative_artifact(exported, capsys, image: Path) -> None:
    code, out, err = run(
        capsys,
        exported("bridgetower-tiny", "itm"),
        "--image",
        image,
        "--text",
        "a cat",
        "--text",
        "two dogs on a sofa",
    )
    assert code == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("a cat: match_probability ")
    p = [float(line.split("match_probability ")[1].split(",")[0]) for line in lines]
    assert all(0 < x < 1 for x in p)


# ---------------------------------------------------------------- bad input
def _assert_clean_error(code: int, err: str, expected_code: int, *phrases: str) -> None:
    assert code == expected_code, err
    assert "Traceback" not in err and err.startswith("error:")
    for phrase in phrases:
        assert phrase in err, err


def test_prompt_longer_than_max_positions(exported, capsys, image: Path) -> None:
    code, _, err = run(capsys, exported("blip-tiny", "caption"), "--image", image, "--text", "word " * 80)
    _assert_clean_error(code, err, 2, "longer than the model's 64 positions")
    code, _, err = run(
        capsys,
        exported("blip-tiny", "caption"),
        "--image",
        image,
        "--text",
        "a photo of",
        "--max-new-tokens",
        "60",
    )
    _assert_clean_error(code, err, 2, "more than the model's 64", "--max-new-tokens")


def test_text_longer_than_the_position_table(exported, capsys, image: Path) -> None:
    # RoBERTa-style positions start at pad_token_id + 1: bridgetower-tiny's 66 rows hold 64 tokens (the
    # placeholder tokenizer adds bos and eos to one id per byte). 65 tokens used to index past the table in
    # ORT.
    art = exported("bridgetower-tiny", "itm")
    code, _, err = run(capsys, art, "--image", image, "--text", "x" * 62)
    assert code == 0, err
    code, _, err = run(capsys, art, "--image", image, "--text", "x" * 63)
    _assert_clean_error(code, err, 2, "is 65 tokens, more than the 64")


@pytest.mark.parametrize("n", ["0", "-3"])
def test_max_new_tokens_must_be_positive(exported, capsys, image: Path, n: str) -> None:
    code, _, err = run(capsys, exported("blip-tiny", "caption"), "--image", image, "--max-new-tokens", n)
    _assert_clean_error(code, err, 2, "--max-new-tokens must be a positive integer")


def test_image_that_does_not_decode(exported, capsys, tmp_path: Path) -> None:
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    code, _, err = run(capsys, exported("blip-tiny", "caption"), "--image", bad)
    _assert_clean_error(code, err, 2, "Cannot decode image", "broken.jpg")
    code, _, err = run(capsys, exported("blip-tiny", "caption"), "--image", tmp_path / "missing.png")
    _assert_clean_error(code, err, 2, "does not exist")


def test_missing_component_file(exported, capsys, image: Path, tmp_path: Path) -> None:
    d = tmp_path / "art"
    shutil.copytree(exported("blip-tiny", "vqa"), d)
    (d / "question_encoder.onnx").unlink()
    code, _, err = run(capsys, d, "--image", image, "--text", "what?")
    _assert_clean_error(code, err, 1, "incomplete", "question_encoder.onnx")


def test_manifest_that_does_not_match_its_files(exported, capsys, image: Path, tmp_path: Path) -> None:
    d = tmp_path / "art"
    shutil.copytree(exported("blip-tiny", "caption"), d)
    with (d / "decoder.onnx").open("ab") as f:
        f.write(b"\0" * 16)  # a changed file: its size no longer matches the manifest
    code, _, err = run(capsys, d, "--image", image)
    _assert_clean_error(code, err, 1, "the manifest records", "decoder")
    d2 = tmp_path / "art2"
    shutil.copytree(exported("blip-tiny", "caption"), d2)
    m = json.loads((d2 / "manifest.json").read_text())
    del m["components"]["vision_encoder"]
    (d2 / "manifest.json").write_text(json.dumps(m))
    code, _, err = run(capsys, d2, "--image", image)
    _assert_clean_error(code, err, 1, "lacks component", "vision_encoder")


def test_vqa_needs_a_question_and_blip2_checks_image_tokens(exported, capsys, image: Path) -> None:
    code, _, err = run(capsys, exported("blip-tiny", "vqa"), "--image", image)
    _assert_clean_error(code, err, 2, "needs a text prompt")
    # T5 has no default prompt: run builds one from the image tokens alone (as HF needs explicit input_ids).
    code, out, err = run(capsys, exported("blip2-flan-t5-tiny", "generate"), "--image", image, "--ids")
    assert code == 0, err
    assert out.strip().splitlines()[-1].startswith("ids: [0")


def test_generator_rejects_bad_arguments(exported) -> None:
    from vlexport.errors import UsageError

    gen = Generator(load_artifact(exported("blip-tiny", "caption"), device="cpu"))
    pixels = np.zeros((1, 3, 64, 64), np.float32)
    for kwargs, phrase in (
        ({"max_new_tokens": 0}, "positive"),
        ({"num_beams": 0}, "num_beams"),
        ({"max_new_tokens": 2.5}, "positive"),
    ):
        with pytest.raises(UsageError, match=phrase):
            gen.generate(pixels, **kwargs)
    with pytest.raises(UsageError, match="64x64"):
        gen.generate(np.zeros((1, 3, 32, 32), np.float32), max_new_tokens=2)
