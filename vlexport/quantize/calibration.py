"""Calibration inputs for int8-static: a user's directory of images (+ prompts), or a seeded synthetic set.

A directory is read exactly as ``vlexport run`` reads its inputs: each image through
runtime.preprocess (the artifact's own resize / mean / std), each text through the artifact's tokenizer,
then the family's ``run_inputs`` (e.g. BridgeTower's pixel_mask). Texts come from the ``*.txt`` files in
the directory, one prompt or caption per line; without any, each image is paired with a synthetic text.
Without a directory, seeded synthetic inputs (the family's ``make_inputs``, seeds far from validation's,
so the accuracy report is never measured on the calibration set). Which one was used is recorded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from vlexport.errors import UsageError
from vlexport.models.inputs import InputShape

if TYPE_CHECKING:
    from transformers import PretrainedConfig

    from vlexport.contracts.family import TaskSpec
    from vlexport.contracts.manifest import Manifest


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
SYNTHETIC_SAMPLES = 16  # batches of 2 (the second row padded)
# One text width for every sample: the histogram calibrators (entropy, percentile) stack each tensor's
# values across samples, so shapes must not vary; shorter texts are right-padded as `vlexport run` pads.
TEXT_WIDTH = 16
MAX_TEXT_WIDTH = 64
SYNTHETIC_SEED = 50_000  # validation uses seeds from 1234 (validate/outputs.py): never the same inputs
MAX_SAMPLES = 512


@dataclass
class CalibrationSet:
    source: str  # "directory" | "synthetic"
    feeds: list[dict[str, np.ndarray]]  # one feed per sample (batch 1), the component's input names
    path: str | None = None
    images: int = 0
    texts: int = 0
    skipped: list[str] = field(default_factory=list)  # files in the directory that are not usable images

    def record(self, method: str) -> dict[str, Any]:
        return {
            "source": self.source,
            "path": self.path,
            "samples": len(self.feeds),
            "images": self.images,
            "texts": self.texts,
            "method": method,
            "skipped": self.skipped[:20],
        }


def calibration_set(
    directory: Path | None,
    *,
    artifact_dir: Path,
    manifest: Manifest,
    task_spec: TaskSpec,
    config: PretrainedConfig,
    input_names: tuple[str, ...],
) -> CalibrationSet:
    """Calibration feeds for a single-component artifact; UsageError when ``directory`` has no usable
    image."""
    if directory is None:
        return _synthetic(task_spec, config, input_names)
    return _from_directory(Path(directory), artifact_dir, manifest, task_spec, config, input_names)


def _synthetic(task_spec: TaskSpec, config: PretrainedConfig, input_names: tuple[str, ...]) -> CalibrationSet:
    feeds = []
    for i in range(SYNTHETIC_SAMPLES):
        x = task_spec.make_inputs(config, InputShape(2, TEXT_WIDTH), SYNTHETIC_SEED + i)
        feeds.append({k: v.numpy() for k, v in x.items() if k in input_names})
    return CalibrationSet("synthetic", feeds)


def _from_directory(
    directory: Path,
    artifact_dir: Path,
    manifest: Manifest,
    task_spec: TaskSpec,
    config: PretrainedConfig,
    input_names: tuple[str, ...],
) -> CalibrationSet:
    from vlexport.runtime.preprocess import image_settings, load_image

    if not directory.is_dir():
        raise UsageError(
            f"--calibration {directory} is not a directory. Pass a directory of images (JPEG, PNG, "
            "...), optionally with a .txt file of prompts or captions, one per line."
        )
    settings = image_settings(artifact_dir, manifest)
    pixels, skipped, why = [], [], []
    for path in sorted(p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES):
        try:
            pixels.append(load_image(path, settings))
        except UsageError as e:
            skipped.append(path.name)
            why.append(str(e))
        if len(pixels) >= MAX_SAMPLES:
            break
    if not pixels:
        raise UsageError(
            f"--calibration {directory} holds no usable image ({len(skipped)} file(s) with an image "
            f"suffix could not be decoded; suffixes read: {', '.join(IMAGE_SUFFIXES)}). Add images, "
            "or leave --calibration out to calibrate on a seeded synthetic set."
        )
    if skipped:  # calibrating on part of the folder, unsaid, would change the variant's ranges without a word
        raise UsageError(
            f"--calibration {directory}: {len(skipped)} of its images cannot be used ({why[0]}"
            f"{f' And {len(skipped) - 1} more: ' + ', '.join(skipped[1:6]) if len(skipped) > 1 else ''})."
            " Nothing was written: repair or remove them, or move them out of the folder."
        )
    texts = [
        line.strip()
        for t in sorted(directory.glob("*.txt"))
        for line in t.read_text(errors="replace").splitlines()
        if line.strip()
    ]
    ids = _token_rows(texts, artifact_dir, manifest) if texts else []
    width = min(MAX_TEXT_WIDTH, max(map(len, ids))) if ids else TEXT_WIDTH
    pad = _pad_id(config)
    feeds = []
    for i, px in enumerate(pixels):
        synthetic = task_spec.make_inputs(config, InputShape(1, width), SYNTHETIC_SEED + i)
        base = {"pixel_values": px.astype(np.float32)}
        if ids:
            row = ids[i % len(ids)][:width]
            padded = np.full((1, width), pad, dtype=np.int64)
            mask = np.zeros((1, width), dtype=np.int64)
            padded[0, : len(row)], mask[0, : len(row)] = row, 1
            base.update(input_ids=padded, attention_mask=mask)
        else:
            base.update({k: synthetic[k].numpy() for k in ("input_ids", "attention_mask") if k in synthetic})
        fed = task_spec.run_inputs(base)
        fed.update({k: v.numpy() for k, v in synthetic.items() if k not in fed})  # inputs run does not make
        feeds.append({k: v for k, v in fed.items() if k in input_names})
    return CalibrationSet("directory", feeds, str(directory.resolve()), len(pixels), len(texts), skipped)


def _pad_id(config: PretrainedConfig) -> int:
    text = getattr(config, "text_config", config)
    pad = getattr(text, "pad_token_id", None)
    return int(pad) if isinstance(pad, int) else 0


def _token_rows(texts: list[str], artifact_dir: Path, manifest: Manifest) -> list[list[int]]:
    from vlexport.runtime.tokenizer import ArtifactTokenizer

    if (
        manifest.tokenizer.get("kind", "none") == "none"
    ):  # random weights: `vlexport run`'s byte-level placeholder
        from vlexport.runtime.texts import placeholder_batch

        ids, mask = placeholder_batch(artifact_dir, texts)
        return [row[m == 1].tolist() for row, m in zip(ids, mask)]
    tok = ArtifactTokenizer(artifact_dir, manifest)
    return [tok.encode(t) for t in texts]


class FeedReader:
    """ONNX Runtime's CalibrationDataReader over a list of feeds."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]):
        self._it = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)
