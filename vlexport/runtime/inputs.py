"""What the task objects (runtime/tasks.py) accept as images and texts, turned into arrays or clear errors.

Images: a path, encoded bytes, a ``PIL.Image``, an ``HxWxC`` (or ``HxW``) uint8 array, or already preprocessed
float pixel values (``[3, S, S]`` or ``[N, 3, S, S]`` at the artifact's size); one of them or a list. Decoded
images go through runtime/preprocess.py, the preprocessing `vlexport run` applies, so the same file gives the
same pixel values either way.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vlexport.errors import UsageError
from vlexport.runtime.preprocess import ImageSettings, decode_image, load_image, pixels_from_rgb

# str | Path | bytes | PIL.Image.Image | np.ndarray, or a list of them (PIL is not imported to say so)
ImageInput = str | Path | bytes | Any | np.ndarray
TextInput = str | Sequence[str]

_KINDS = (
    "a path, encoded image bytes, a PIL image, an HxWxC uint8 array or preprocessed float pixel values "
    "[N, 3, S, S]"
)


def is_single_image(images: Any) -> bool:
    """One image (results drop the image axis), or several."""
    if isinstance(images, np.ndarray):
        return not (images.ndim == 4 and images.dtype.kind == "f")
    return not isinstance(images, (list, tuple))


def image_pixels(images: ImageInput | Sequence[ImageInput], settings: ImageSettings) -> np.ndarray:
    """``[N, 3, S, S]`` float32 pixel values of one image or a list of them."""
    if isinstance(images, np.ndarray) and images.ndim == 4 and images.dtype.kind == "f":
        return _preprocessed(images, settings)
    items = [images] if is_single_image(images) else list(images)
    if not items:
        raise UsageError(f"No images given: pass one image or a non-empty list ({_KINDS}).")
    return np.concatenate([_one(item, i, settings) for i, item in enumerate(items)])


def _one(item: Any, index: int, settings: ImageSettings) -> np.ndarray:
    if isinstance(item, (str, Path)):
        return load_image(item, settings)
    if isinstance(item, (bytes, bytearray, memoryview)):
        if not len(item):
            raise UsageError(
                f"Image #{index} is empty bytes. Pass the bytes of a JPEG, PNG or another format Pillow "
                "reads."
            )
        return pixels_from_rgb(decode_image(io.BytesIO(bytes(item)), f"Image #{index} (bytes)"), settings)
    if isinstance(item, np.ndarray):
        if item.dtype.kind == "f" and item.ndim == 3 and item.shape[0] == 3:
            return _preprocessed(item[None], settings)
        if (
            item.dtype != np.uint8
            or item.ndim not in (2, 3)
            or (item.ndim == 3 and item.shape[2] not in (1, 3, 4))
        ):
            raise UsageError(
                f"Image #{index} is an array of shape {item.shape} and dtype {item.dtype}: pass HxWxC "
                "uint8 pixels (C = 1, 3 or 4) or preprocessed float pixel values [3, S, S]."
            )
        from PIL import Image

        return pixels_from_rgb(
            Image.fromarray(item[..., 0] if item.ndim == 3 and item.shape[2] == 1 else item).convert("RGB"),
            settings,
        )
    if _is_pil(item):
        return pixels_from_rgb(item.convert("RGB"), settings)
    raise UsageError(f"Image #{index} is {type(item).__name__}; pass {_KINDS}.")


def _is_pil(item: Any) -> bool:
    try:
        from PIL import Image
    except ImportError:
        return False
    return isinstance(item, Image.Image)


def _preprocessed(pixels: np.ndarray, settings: ImageSettings) -> np.ndarray:
    if pixels.shape[1:] != (3, settings.size, settings.size):
        raise UsageError(
            f"Preprocessed pixel values must be [N, 3, {settings.size}, {settings.size}] for this "
            f"artifact; got {list(pixels.shape)}. Pass the decoded image instead and it is resized."
        )
    if not len(pixels):
        raise UsageError("No images given: the pixel values hold 0 images.")
    if not np.isfinite(pixels).all():
        raise UsageError("The pixel values hold NaN or infinity; pass finite, normalised values.")
    return np.ascontiguousarray(pixels, dtype=np.float32)


def text_list(texts: Any, what: str = "texts") -> tuple[list[str], bool]:
    """(texts as a list, whether one str was given)."""
    if isinstance(texts, str):
        return [texts], True
    if isinstance(texts, (list, tuple)) and texts and all(isinstance(t, str) for t in texts):
        return list(texts), False
    if isinstance(texts, (list, tuple)) and not texts:
        raise UsageError(f"No {what} given: pass a str or a non-empty list of str.")
    raise UsageError(
        f"{what} must be a str or a list of str; got {type(texts).__name__}"
        + (
            f" holding {type(next(t for t in texts if not isinstance(t, str))).__name__}"
            if isinstance(texts, (list, tuple))
            else ""
        )
        + "."
    )


def broadcast(n_images: int, n_texts: int, what: str = "texts") -> int:
    """Pairs of a zipped call: one side of length 1 repeats, otherwise the lengths must agree."""
    if n_images == n_texts or n_texts == 1 or n_images == 1:
        return max(n_images, n_texts)
    raise UsageError(
        f"{n_images} images and {n_texts} {what}: pass one of either, or as many {what} as images "
        "(they are paired in order)."
    )
