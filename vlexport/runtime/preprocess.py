"""Image preprocessing for ``vlexport run``: decode, resize to the artifact's size, rescale, normalise.

Mean/std/resample come from the artifact's ``preprocessor_config.json`` when the export source had one,
else from the family's defaults (``FamilySpec.image_stats``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import numpy as np

from vlexport.errors import CheckError, UsageError
from vlexport.userdata import brief, finite, kind_of, read_json

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

    from vlexport.contracts.manifest import Manifest


_BICUBIC = 3  # PIL.Image.Resampling.BICUBIC, what the BLIP / CLIP processors use


@dataclass(frozen=True)
class ImageSettings:
    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    rescale: float = 1 / 255
    resample: int = _BICUBIC
    source: str = "defaults"  # or "preprocessor_config.json"


def image_settings(directory: Path, manifest: Manifest) -> ImageSettings:
    if manifest.image_size is None:
        raise UsageError(f"{directory}: the manifest records no image_size; this artifact takes no images.")
    if not 1 <= manifest.image_size <= 16384:
        raise CheckError(
            f"{directory}/manifest.json records image_size {manifest.image_size}, not a size in "
            "1..16384; the manifest is damaged, export the artifact again."
        )
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
            raise CheckError(
                f"{path}: {key} must be 3 numbers (one per RGB channel), got {value!r:.60}. {again}"
            )
    if not all(std if isinstance(std, (list, tuple)) else [std]):
        raise CheckError(f"{path}: image_std holds a 0, which would divide by zero. {again}")
    if not finite(rescale) or isinstance(resample, bool) or resample not in range(6):
        raise CheckError(
            f"{path}: rescale_factor must be a number and resample a PIL filter id 0..5, got "
            f"{rescale!r:.30} and {resample!r:.30}. {again}"
        )
    expand = lambda v: tuple(v) if isinstance(v, (list, tuple)) else (v,) * 3
    return ImageSettings(
        manifest.image_size,
        expand(mean),
        expand(std),
        float(rescale),
        int(resample),
        "preprocessor_config.json",
    )


_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")


def _as_rgb(img: PILImage, label: str) -> PILImage:
    """``img`` as 8-bit RGB. Pillow's ``convert("RGB")`` clips 16- and 32-bit grey (PNG ``I;16``, TIFF ``I``)
    at 255, so nearly every pixel turns white: those are scaled by their real range instead (0..65535 to
    0..255; Pillow opens 16-bit data as ``I`` too), floats ``F`` from 0..1. Values outside those ranges have
    no one meaning as a colour: refused, saying what to do."""
    from PIL import Image

    if img.mode not in (*_SIXTEEN_BIT, "I", "F"):
        return img.convert("RGB")
    arr = np.asarray(img, dtype=np.float64)
    top = 1.0 if img.mode == "F" else 65535.0
    if arr.size and not (np.isfinite(arr).all() and arr.min() >= 0 and arr.max() <= top):
        raise UsageError(
            f"{label} is a {img.mode} image with values from {arr.min():g} to {arr.max():g}, "
            f"outside 0..{top:g}, which have no one meaning as a colour. Convert it to an 8- or 16-bit "
            "image (or floats in 0..1) first."
        )
    grey = np.rint(arr * (255.0 / top)).astype(np.uint8)
    return Image.fromarray(grey, mode="L").convert("RGB")


def load_image(path: str | Path, settings: ImageSettings) -> np.ndarray:
    """``[1, 3, size, size]`` float32 pixel values, or a UsageError when the file is not a decodable image."""
    path = Path(path)
    other = "Pass a JPEG, PNG or another format Pillow reads."
    if path.is_dir():
        raise UsageError(f"Image {path} is a directory; --image takes one image file. {other}")
    if not path.is_file():
        raise UsageError(
            f"Image {path} does not exist."
            if not path.exists()
            else f"Image {path} is not a regular file. {other}"
        )
    if path.stat().st_size == 0:
        raise UsageError(f"Image {path} is empty (0 bytes). {other}")
    return pixels_from_rgb(decode_image(path, f"Image {path}"), settings)


def decode_image(source: Path | BinaryIO, label: str) -> PILImage:
    """An RGB ``PIL.Image`` from a file or a binary stream; ``label`` names it in errors ("Image x.jpg")."""
    from PIL import Image, UnidentifiedImageError

    other = "Pass a JPEG, PNG or another format Pillow reads."
    try:
        with warnings.catch_warnings():
            # Pillow warns above MAX_IMAGE_PIXELS and raises above twice that: both are refusals here, because
            # decoding a "bomb" (a small file claiming a huge canvas) takes all the memory before it is
            # resized.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as img:
                img.load()
                return _as_rgb(img, label)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise UsageError(
            f"{label} is refused as a possible decompression bomb ({e}). Pass an image of at "
            f"most {Image.MAX_IMAGE_PIXELS} pixels (resize it first); it is resized to the "
            "artifact's input size anyway."
        ) from None
    except UnidentifiedImageError:
        raise UsageError(
            f"Cannot decode {label[0].lower()}{label[1:]}: not an image format Pillow recognises. {other}"
        ) from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:  # Pillow's ways of saying truncated / corrupt
        raise UsageError(
            f"Cannot decode {label[0].lower()}{label[1:]}: it is truncated or damaged ({brief(e)}); "
            f"re-save or re-download it. {other}"
        ) from None


def pixels_from_rgb(rgb: PILImage, settings: ImageSettings) -> np.ndarray:
    """An RGB ``PIL.Image`` -> ``[1, 3, size, size]`` float32: resize, rescale, normalise (the processor's
    steps)."""
    rgb = rgb.resize((settings.size, settings.size), resample=settings.resample)
    arr = np.asarray(rgb, dtype=np.float32) * np.float32(settings.rescale)
    arr = (arr - np.asarray(settings.mean, np.float32)) / np.asarray(settings.std, np.float32)
    return np.ascontiguousarray(arr.transpose(2, 0, 1)[None])
