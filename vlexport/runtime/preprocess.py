"""Image preprocessing for ``vlexport run``: decode, resize to the artifact's size, rescale, normalise.

Mean/std/resample come from the artifact's ``preprocessor_config.json`` when the export source had one,
else from the family's defaults (``FamilySpec.image_stats``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vlexport.errors import UsageError
from vlexport.models import get_family

_BICUBIC = 3  # PIL.Image.Resampling.BICUBIC, what the BLIP / CLIP processors use


@dataclass(frozen=True)
class ImageSettings:
    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    rescale: float = 1 / 255
    resample: int = _BICUBIC
    source: str = "defaults"  # or "preprocessor_config.json"


def image_settings(directory: Path, manifest: Any) -> ImageSettings:
    if manifest.image_size is None:
        raise UsageError(f"{directory}: the manifest records no image_size; this artifact takes no images.")
    mean, std = get_family(manifest.family).image_stats
    path = Path(directory) / "preprocessor_config.json"
    if not path.is_file():
        return ImageSettings(manifest.image_size, tuple(mean), tuple(std))
    cfg = json.loads(path.read_text())
    return ImageSettings(manifest.image_size, tuple(cfg.get("image_mean") or mean), tuple(cfg.get("image_std") or std),
                         float(cfg.get("rescale_factor") or 1 / 255), int(cfg.get("resample") or _BICUBIC),
                         "preprocessor_config.json")


def load_image(path: str | Path, settings: ImageSettings) -> np.ndarray:
    """``[1, 3, size, size]`` float32 pixel values, or a UsageError when the file is not a decodable image."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"Image {path} does not exist.")
    try:
        with Image.open(path) as img:
            img.load()
            rgb = img.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise UsageError(f"Cannot decode image {path} ({type(e).__name__}: {e}). Pass a JPEG, PNG or another "
                         "format Pillow reads.") from None
    rgb = rgb.resize((settings.size, settings.size), resample=settings.resample)
    arr = np.asarray(rgb, dtype=np.float32) * np.float32(settings.rescale)
    arr = (arr - np.asarray(settings.mean, np.float32)) / np.asarray(settings.std, np.float32)
    return np.ascontiguousarray(arr.transpose(2, 0, 1)[None])
