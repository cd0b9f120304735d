"""``vlexport.load``: task objects on tiny artifacts give, input by input, what `vlexport run` prints (which
tests/test_generation_cli.py checks against HF generate()), whatever the batching and the image's form; bad
input raises a vlexport.errors exception with the CLI's message."""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

import vlexport
from vlexport.cli import main
from vlexport.errors import CheckError, UsageError, VlexportError
from vlexport.runtime.tasks import FillMaskTask, GenerateTask, MatchTask, SimilarityTask


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    from PIL import Image

    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(1)
    paths = []
    for i, (h, w) in enumerate([(120, 90), (64, 64), (50, 130), (97, 101), (30, 40)]):
        paths.append(root / f"img{i}.png")
        Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(paths[-1])
    return paths


def _forms(paths: list[Path]) -> list[object]:
    """The same images as path, bytes, PIL image, uint8 array, str path (cycled)."""
    from PIL import Image

    out: list[object] = []
    for i, p in enumerate(paths):
        kind = i % 5
        out.append(
            p
            if kind == 0
            else p.read_bytes()
            if kind == 1
            else Image.open(p)
            if kind == 2
            else np.asarray(Image.open(p).convert("RGB"))
            if kind == 3
            else str(p)
        )
    return out


def _cli(capsys, *argv: object) -> list[str]:
    code = main(["run", *map(str, argv)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out.strip().splitlines()


def _cli_ids(capsys, directory: Path, image: Path, *extra: str) -> list[list[int]]:
    lines = _cli(capsys, directory, "--image", image, "--ids", *extra)
    return [json.loads(line.split("ids: ", 1)[1]) for line in lines if "ids: " in line]


@pytest.mark.parametrize(
    ("preset", "task", "prompt"),
    [
        ("blip-tiny", "caption", None),
        ("blip-tiny", "vqa", "what is in the picture?"),
        ("blip2-opt-tiny", "generate", "what is it?"),
    ],
    ids=["caption", "vqa", "blip2-opt"],
)
def test_generate_batched_equals_run_image_by_image(
    exported, capsys, images: list[Path], preset: str, task: str, prompt: str | None
) -> None:
    art = exported(preset, task)
    model = vlexport.load(art, batch_size=2)  # 5 images: batches of 2, 2, 1
    assert isinstance(model, GenerateTask)
    method = model.answer if prompt else model.caption
    records = (
        method(_forms(images), prompt, max_new_tokens=5, return_ids=True)
        if prompt
        else method(_forms(images), max_new_tokens=5, return_ids=True)
    )
    assert len(records) == len(images)
    extra = ("--text", prompt) if prompt else ()
    for rec, path in zip(records, images, strict=True):
        assert [rec.ids] == _cli_ids(capsys, art, path, "--max-new-tokens", "5", *extra)
    # beams, and the plain-text return (random weights: the placeholder tokenizer's text)
    beam = model.generate(images[:3], prompt, max_new_tokens=4, num_beams=3, return_ids=True)
    for rec, path in zip(beam, images[:3], strict=True):
        assert [rec.ids] == _cli_ids(capsys, art, path, "--max-new-tokens", "4", "--num-beams", "3", *extra)
    single = model.generate(images[0], prompt, max_new_tokens=5)
    assert isinstance(single, str) and single == records[0].text


def test_concurrent_calls_equal_sequential(exported, images: list[Path]) -> None:
    model = vlexport.load(exported("blip-tiny", "caption"), batch_size=3)
    expected = [model.caption(p, max_new_tokens=5, return_ids=True).ids for p in images]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda p: model.caption(p, max_new_tokens=5, return_ids=True).ids, images * 2))
    assert got == expected * 2


def _scores(lines: list[str]) -> list[dict[str, float]]:
    """`vlexport run`'s score lines ("text: name value, name value") as dicts."""
    return [
        {k: float(v) for k, v in (kv.rsplit(" ", 1) for kv in line.split(": ", 1)[1].split(", "))}
        for line in lines
    ]


def test_match_equals_run_per_image(exported, capsys, images: list[Path]) -> None:
    art = exported("bridgetower-tiny", "itm")
    texts = ["a cat", "two dogs on a sofa", "x"]
    model = vlexport.load(art, batch_size=4)  # 5 x 3 pairs in batches of 4
    assert isinstance(model, MatchTask)
    result = model.match(_forms(images), texts)
    assert result.probability.shape == result.logit.shape == (5, 3)
    for i, path in enumerate(images):
        printed = _scores(_cli(capsys, art, "--image", path, *(a for t in texts for a in ("--text", t))))
        assert [f"{p['match_probability']:.4f}" for p in printed] == [
            f"{x:.4f}" for x in result.probability[i]
        ]
        assert [f"{p['match_logit']:.4f}" for p in printed] == [f"{x:.4f}" for x in result.logit[i]]
    assert np.allclose(result.probability, 1 / (1 + np.exp(-result.logit)), atol=1e-6)
    one = model.match(images[1], texts[0])
    assert one.probability.shape == () and abs(float(one.probability) - result.probability[1, 0]) < 1e-6


@pytest.mark.parametrize(
    ("preset", "task"), [("vision-text-dual-encoder-tiny", "features"), ("blip-tiny", "itc")]
)
def test_similarity_equals_run_per_image(
    exported, capsys, images: list[Path], preset: str, task: str
) -> None:
    art = exported(preset, task)
    texts = ["a cat", "two dogs on a sofa", "a red car", "x", "the sea"]
    model = vlexport.load(art, batch_size=2)  # tiles of 2 x 2, the short side padded
    assert isinstance(model, SimilarityTask)
    sim = model.similarity(_forms(images[:3]), texts)
    assert sim.shape == (3, 5)
    for i, path in enumerate(images[:3]):
        printed = _scores(_cli(capsys, art, "--image", path, *(a for t in texts for a in ("--text", t))))
        assert [f"{p['similarity']:.4f}" for p in printed] == [f"{x:.4f}" for x in sim[i]]


def test_embeddings_are_the_graphs_outputs(exported, images: list[Path]) -> None:
    art = exported("vision-text-dual-encoder-tiny", "features")
    model = vlexport.load(art, batch_size=2)
    texts = ["a cat", "two dogs on a sofa", "x"]
    img, txt = model.embed_images(images[:3]), model.embed_texts(texts)
    # the graph's own outputs for the same pairs, called directly
    ids, mask = model.texts(texts)
    direct = model.component(
        {"pixel_values": model.pixels(images[:3]), "input_ids": ids, "attention_mask": mask}
    )
    np.testing.assert_allclose(img, direct["image_embeds"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(txt, direct["text_embeds"], rtol=1e-5, atol=1e-6)
    # similarity is the scaled cosine of the two
    cos = (img / np.linalg.norm(img, axis=-1, keepdims=True)) @ (
        txt / np.linalg.norm(txt, axis=-1, keepdims=True)
    ).T
    sim = model.similarity(images[:3], texts)
    np.testing.assert_allclose(sim / sim.flat[0] * cos.flat[0], cos, rtol=1e-4, atol=1e-5)
    assert model.embed_texts("a cat").shape == txt[0].shape


def test_fill_mask_outputs_and_placeholder_tokenizer(exported, images: list[Path]) -> None:
    model = vlexport.load(exported("bridgetower-tiny", "mlm"), batch_size=2)
    assert isinstance(model, FillMaskTask)
    with pytest.raises(UsageError, match="no mask token"):
        model.fill_mask(images[0], "a <mask> on a sofa")
    logits = model.outputs(images[:3], ["a cat", "two dogs", "x"])["logits"]
    ids, mask = model.texts(["a cat", "two dogs", "x"])
    direct = model.call(model.pixels(images[:3]), ids, mask)["logits"]
    np.testing.assert_allclose(logits, direct, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- bad input
def test_bad_input_raises_vlexport_errors(exported, images: list[Path], tmp_path: Path) -> None:
    caption = vlexport.load(exported("blip-tiny", "caption"))
    match = vlexport.load(exported("bridgetower-tiny", "itm"))
    cases = [
        (lambda: caption.caption([]), UsageError, "No images given"),
        (lambda: caption.caption(42), UsageError, "Image #0 is int"),
        (lambda: caption.caption(b""), UsageError, "empty bytes"),
        (lambda: caption.caption(b"not an image"), UsageError, "Cannot decode image"),
        (lambda: caption.caption(tmp_path / "missing.png"), UsageError, "does not exist"),
        (lambda: caption.caption(np.zeros((4, 4, 3), np.float64)), UsageError, "uint8"),
        (lambda: caption.caption(np.zeros((2, 3, 8, 8), np.float32)), UsageError, "must be [N, 3,"),
        (lambda: caption.caption(images[0], max_new_tokens=70), UsageError, "more than the model's 64"),
        (lambda: caption.caption(images[0], max_new_tokens=0), UsageError, "max_new_tokens"),
        (
            lambda: caption.caption(images[0], "word " * 80),
            UsageError,
            "longer than the model's 64 positions",
        ),
        (lambda: caption.answer(images[0], "what?"), UsageError, "captions images"),
        (lambda: match.match(images[:2], [1, 2]), UsageError, "texts must be a str or a list of str"),
        (lambda: match.match(images[0], "x" * 63), UsageError, "is 65 tokens, more than the 64"),
        (lambda: match.outputs(images[:2], ["a", "b", "c"]), UsageError, "2 images and 3 texts"),
        (lambda: vlexport.load(tmp_path), VlexportError, "manifest"),
        (lambda: vlexport.load(exported("blip-tiny", "caption"), device="tpu"), UsageError, "device must be"),
        (lambda: vlexport.load(exported("blip-tiny", "caption"), threads=0), UsageError, "threads must be"),
        (lambda: vlexport.load(exported("blip-tiny", "caption"), batch_size=0), UsageError, "batch_size"),
    ]
    for call, kind, phrase in cases:
        with pytest.raises(kind) as info:
            call()
        assert phrase in str(info.value), (phrase, str(info.value))
    vqa = vlexport.load(exported("blip-tiny", "vqa"))
    with pytest.raises(UsageError, match="needs a text prompt"):
        vqa.answer(images[0], None)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="answers questions"):
        vqa.caption(images[0])


def test_load_refuses_an_incomplete_artifact(exported, tmp_path: Path) -> None:
    import shutil

    d = tmp_path / "art"
    shutil.copytree(exported("blip-tiny", "vqa"), d)
    (d / "question_encoder.onnx").unlink()
    with pytest.raises(CheckError, match="question_encoder.onnx"):
        vlexport.load(d)


def test_import_vlexport_stays_light() -> None:
    code = (
        "import sys, vlexport; assert callable(vlexport.__getattr__); "
        "print(sorted(m for m in ('torch', 'onnxruntime', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    assert vlexport.load.__module__ == "vlexport.runtime.tasks"
