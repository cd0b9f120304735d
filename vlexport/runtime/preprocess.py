"""Image preprocessing for ``vlexport run``: decode, resize to the artifact's size, rescale, normalise.

Mean/std/resample come from the artifact's ``preprocessor_config.json`` when the export source had one,
else from the family's defaults (``FamilySpec.image_stats``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vlexport.errors import CheckError, UsageError
from vlexport.userdata import brief, finite, kind_of, read_json

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
    if not 1 <= manifest.image_size <= 16384:
        raise CheckError(f"{directory}/manifest.json records image_size {manifest.image_size}, not a size in "
                         "1..16384; the manifest is damaged, export the artifact again.")
    # imported here, not at the top: served models import load_image without torch
    from vlexport.models import get_family

    mean, std = get_family(manifest.family).image_stats
    path = Path(directory) / "preprocessor_config.json"
    if not path.is_file():
        return ImageSettings(manifest.image_size, tuple(mean), tuple(std))
    again = "The artifact is damaged: export it again."
    cfg = read_json(path, advice=again)
    if not isinstance(cfg, dict):
        raise CheckError(f"{path} holds {kind_of(cfg)}, not an object of image settings. {again}")
    mean, std = cfg.get("image_mean") or mean, cfg.get("image_std") or std
    rescale, resample = cfg.get("rescale_factor") or 1 / 255, cfg.get("resample") or _BICUBIC
    for key, value in (("image_mean", mean), ("image_std", std)):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value] * 3  # processors accept one number for every channel
        if not (isinstance(value, (list, tuple)) and len(value) == 3 and all(map(finite, value))):
            raise CheckError(f"{path}: {key} must be 3 numbers (one per RGB channel), got {value!r:.60}. {again}")
    if not all(std if isinstance(std, (list, tuple)) else [std]):
        raise CheckError(f"{path}: image_std holds a 0, which would divide by zero. {again}")
    if not finite(rescale) or isinstance(resample, bool) or resample not in range(6):
        raise CheckError(f"{path}: rescale_factor must be a number and resample a PIL filter id 0..5, got "
                         f"{rescale!r:.30} and {resample!r:.30}. {again}")
    expand = (lambda v: tuple(v) if isinstance(v, (list, tuple)) else (v,) * 3)
    return ImageSettings(manifest.image_size, expand(mean), expand(std), float(rescale), int(resample),
                         "preprocessor_config.json")


def load_image(path: str | Path, settings: ImageSettings) -> np.ndarray:
    """``[1, 3, size, size]`` float32 pixel values, or a UsageError when the file is not a decodable image."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    other = "Pass a JPEG, PNG or another format Pillow reads."
    if path.is_dir():
        raise UsageError(f"Image {path} is a directory; --image takes one image file. {other}")
    if not path.is_file():
        raise UsageError(f"Image {path} does not exist." if not path.exists() else
                         f"Image {path} is not a regular file. {other}")
    if path.stat().st_size == 0:
        raise UsageError(f"Image {path} is empty (0 bytes). {other}")
    try:
        with warnings.catch_warnings():
            # Pillow warns above MAX_IMAGE_PIXELS and raises above twice that: both are refusals here, because
            # decoding a "bomb" (a small file claiming a huge canvas) takes all the memory before it is resized.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()
                rgb = img.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise UsageError(f"Image {path} is refused as a possible decompression bomb ({e}). Pass an image of at "
                         f"most {Image.MAX_IMAGE_PIXELS} pixels (resize it first); it is resized to the "
                         "artifact's input size anyway.") from None
    except UnidentifiedImageError:
        raise UsageError(f"Cannot decode image {path}: not an image format Pillow recognises. {other}") from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:  # Pillow's ways of saying truncated / corrupt
        raise UsageError(f"Cannot decode image {path}: it is truncated or damaged ({brief(e)}); re-save or "
                         f"re-download it. {other}") from None
    rgb = rgb.resize((settings.size, settings.size), resample=settings.resample)
    arr = np.asarray(rgb, dtype=np.float32) * np.float32(settings.rescale)
    arr = (arr - np.asarray(settings.mean, np.float32)) / np.asarray(settings.std, np.float32)
    return np.ascontiguousarray(arr.transpose(2, 0, 1)[None])
