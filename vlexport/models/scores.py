"""Per-text image-text scores read from a task's outputs, for `vlexport run` (``TaskSpec.scores``).

`run` repeats the image once per text, so row i of every output belongs to text i. Numpy only (copied into
Triton repositories, see models/host): each reader is a ``functools.partial`` of a module-level function, so
a repository records it as data.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from vlexport.contracts.family import ScoreReader


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def itm(name: str) -> ScoreReader:
    """A two-class matching head ``name`` of shape (texts, 2): (no match, match)."""
    return functools.partial(read_itm, name)


def read_itm(name: str, out: Mapping[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
    x = out[name]
    return {"match_probability": _softmax(x)[:, 1], "match_logit": x[:, 1] - x[:, 0]}


def similarity_row(name: str) -> ScoreReader:
    """A similarity matrix ``name`` of every image copy to every text (texts, texts): its first row."""
    return functools.partial(read_similarity_row, name)


def read_similarity_row(name: str, out: Mapping[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
    row = out[name][0]
    return {"similarity": row, "probability_over_texts": _softmax(row)}


def cosine(text: str, image: str) -> ScoreReader:
    """Cosine similarity of each text embedding with its image embedding (row by row)."""
    return functools.partial(read_cosine, text, image)


def read_cosine(text: str, image: str, out: Mapping[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
    t, i = out[text], out[image]
    cos = (t * i).sum(-1) / np.maximum(np.linalg.norm(t, axis=-1) * np.linalg.norm(i, axis=-1), 1e-12)
    return {"cosine": cos}
