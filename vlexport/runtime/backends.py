"""Loaders for non-ONNX backends (AOTInductor packages, TensorRT engines), registered by their modules."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

LOADERS: dict[str, Callable[..., Any]] = {}
