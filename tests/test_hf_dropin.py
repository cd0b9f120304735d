"""``vlexport.hf.from_artifact``: HF code that calls ``Model.from_pretrained(dir)`` gives the same outputs
(within the artifact precision's tolerance) and the same generate() tokens when that line is replaced by
``vlexport.hf.from_artifact(artifact)``. The HF side loads a save_pretrained directory of the weights the
artifact was exported from (tiny presets, seeded random weights); pixel values come from the family's HF image
processor."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import vlexport.hf
from vlexport.contracts.manifest import Manifest
from vlexport.contracts.precision import get_precision
from vlexport.errors import UsageError
from vlexport.weights import load_model, resolve

FULL = pytest.mark.exhaustive
ENCODERS = [
    ("blip-tiny", "itm"),
    pytest.param("blip-tiny", "itc", marks=FULL),
    pytest.param("blip-tiny", "features", marks=FULL),
    ("bridgetower-tiny", "itm"),
    pytest.param("bridgetower-tiny", "itc", marks=FULL),
    pytest.param("bridgetower-tiny", "mlm", marks=FULL),
    pytest.param("bridgetower-tiny", "features", marks=FULL),
    ("vision-text-dual-encoder-tiny", "features"),
    pytest.param("altclip-tiny", "features", marks=FULL),
]
GENERATORS = [
    ("blip-tiny", "caption"),
    pytest.param("blip-tiny", "vqa", marks=FULL),
    ("blip2-opt-tiny", "generate"),
    pytest.param("blip2-flan-t5-tiny", "generate", marks=FULL),
]


def _hf_model(preset: str, task: str, tmp_path: Path) -> torch.nn.Module:
    """``Class.from_pretrained`` on a save_pretrained copy of the weights the artifact was exported from."""
    model = load_model(resolve(preset, random_weights=True), task)
    model.save_pretrained(tmp_path / "hf")
    return type(model).from_pretrained(tmp_path / "hf").eval()


def _images(n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(3)
    # square: BridgeTower's processor resizes the shortest edge and pads, so a square image lands at the size
    return [(rng.random((40 + 9 * i, 40 + 9 * i, 3)) * 255).astype(np.uint8) for i in range(n)]


def _pixels(manifest: Manifest, images: list[np.ndarray]) -> dict[str, torch.Tensor]:
    """The family's HF image processor at the artifact's image size (return_tensors='pt')."""
    import transformers

    def cls(name: str) -> type:  # the PIL backend (no torchvision here), the class transformers falls back to
        return getattr(transformers, f"{name}Pil", None) or getattr(transformers, name)

    size = manifest.image_size
    if manifest.family in ("blip", "blip2"):
        proc = cls("BlipImageProcessor")(size={"height": size, "width": size})
    elif (
        manifest.family == "bridgetower"
    ):  # its center crop fails on transformers 5.25's SizeDict; square images
        proc = cls("BridgeTowerImageProcessor")(
            size={"shortest_edge": size}, size_divisor=1, do_center_crop=False
        )
    else:
        proc = cls("CLIPImageProcessor")(
            size={"shortest_edge": size}, crop_size={"height": size, "width": size}
        )
    return dict(proc(images=images, return_tensors="pt"))


def _texts(model: torch.nn.Module, n: int, width: int = 7) -> dict[str, torch.Tensor]:
    """Tokenizer-shaped ids (random weights ship no tokenizer): a padded batch with its attention mask."""
    config = getattr(model.config, "text_config", model.config)
    pad = getattr(config, "pad_token_id", 0) or 0
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(5, min(config.vocab_size, 1000), (n, width), generator=g)
    mask = torch.ones_like(ids)
    ids[-1, width - 3 :], mask[-1, width - 3 :] = pad, 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize(("preset", "task"), ENCODERS)
def test_call_equals_hf_forward(exported, tmp_path: Path, preset: str, task: str) -> None:
    art = exported(preset, task)
    manifest = Manifest.read(art)
    hf = _hf_model(preset, task, tmp_path)
    inputs = {**_pixels(manifest, _images(3)), **_texts(hf, 3)}
    extra = {"use_itm_head": task == "itm"} if preset == "blip-tiny" and task != "features" else {}
    with torch.no_grad():
        ref = hf(**inputs, **extra)
    ours = vlexport.hf.from_artifact(art)(**inputs, **extra)
    tol = get_precision(manifest.precision).tolerance
    assert list(ours)  # every output the artifact exports is an HF field of the same name
    for name in ours:
        assert isinstance(ours[name], torch.Tensor) and ours[name].shape == ref[name].shape, name
        torch.testing.assert_close(ours[name], ref[name].float(), atol=tol.atol, rtol=tol.rtol, msg=name)
    if "logits_per_image" in ours:  # two towers: HF takes any number of texts per image batch
        fewer = {
            **inputs,
            "input_ids": inputs["input_ids"][:2],
            "attention_mask": inputs["attention_mask"][:2],
        }
        with torch.no_grad():
            ref2 = hf(**fewer)
        got2 = vlexport.hf.from_artifact(art)(**fewer)
        for name in got2:
            assert got2[name].shape == ref2[name].shape, name
            torch.testing.assert_close(got2[name], ref2[name].float(), atol=tol.atol, rtol=tol.rtol, msg=name)
    np_out = vlexport.hf.from_artifact(art)(**{k: v.numpy() for k, v in inputs.items()}, **extra)
    assert isinstance(np_out[0], np.ndarray)
    np.testing.assert_array_equal(np_out[0], ours[0].numpy())


@pytest.mark.parametrize(("preset", "task"), GENERATORS)
def test_generate_equals_hf_generate_tokens(exported, tmp_path: Path, preset: str, task: str) -> None:
    art = exported(preset, task)
    manifest = Manifest.read(art)
    hf = _hf_model(preset, task, tmp_path)
    inputs: dict[str, torch.Tensor] = _pixels(manifest, _images(2))
    s = manifest.generation
    if task != "caption" or preset.startswith("blip2"):
        text = _texts(hf, 2, width=5)
        text["attention_mask"][:] = 1  # HF BLIP-2 generate pads on the left; keep one prompt length
        if s.get("num_query_tokens"):
            queries = torch.full((2, int(s["num_query_tokens"])), int(s["image_token_id"]))
            text = {
                "input_ids": torch.cat([queries, text["input_ids"]], 1),
                "attention_mask": torch.ones(2, queries.shape[1] + 5, dtype=torch.long),
            }
        inputs.update(text)
    model = vlexport.hf.from_artifact(art)
    for beams in (1, 3):
        with torch.no_grad():
            ref = hf.generate(**inputs, max_new_tokens=6, num_beams=beams, do_sample=False)
        got = model.generate(**inputs, max_new_tokens=6, num_beams=beams)
        assert isinstance(got, torch.Tensor) and got.dtype == torch.long
        assert got.tolist() == ref.tolist(), (beams, got.tolist(), ref.tolist())


def test_wrong_calls_are_usage_errors(exported) -> None:
    caption = vlexport.hf.from_artifact(exported("blip-tiny", "caption"))
    itm = vlexport.hf.from_artifact(exported("blip-tiny", "itm"))
    pixels = np.zeros((1, 3, Manifest.read(exported("blip-tiny", "itm")).image_size, 8), np.float32)
    for call, phrase in [
        (lambda: caption(pixel_values=pixels), "call .generate"),
        (lambda: itm.generate(pixel_values=pixels), "instead of generate"),
        (lambda: itm(pixel_values=pixels, input_ids=[[1, 2]]), "must be [N, 3,"),
        (lambda: itm(input_ids=[[1, 2]]), "pixel_values is required"),
        (lambda: itm(pixel_values="x", input_ids=[[1, 2]]), "pass the processor's output"),
        (lambda: itm(pixel_values=pixels, input_ids=[[1, 2]], labels=[1]), "unexpected argument"),
        (lambda: caption.generate(pixel_values=pixels, do_sample=True), "greedy or beam search only"),
    ]:
        with pytest.raises(UsageError) as info:
            call()
        assert phrase in str(info.value), (phrase, str(info.value))
