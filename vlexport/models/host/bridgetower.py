"""BridgeTower's extra run-time inputs, numpy only."""

from __future__ import annotations

import numpy as np


def run_inputs(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`vlexport run`: a whole (unpadded) image per row, as the processor's pixel_mask says for one image."""
    batch, *_, height, width = feeds["pixel_values"].shape
    return {**feeds, "pixel_mask": np.ones((batch, height, width), dtype=np.int64)}
