"""Shape checks that hold for concrete and symbolic (torch.export / torch.compile) shapes alike."""

from __future__ import annotations

from typing import Any

from torch.fx.experimental.symbolic_shapes import statically_known_true


def known_ne(a: Any, b: Any) -> bool:
    """True only when ``a != b`` is certain: symbolic sizes are never guarded on (that would specialise
    a dynamic dim while exporting), so a mismatch between symbolic sizes surfaces at run time instead."""
    return statically_known_true(a != b)


def broadcast_mismatch(shape: tuple[Any, ...], target: tuple[Any, ...]) -> bool:
    """Whether ``shape`` certainly does not broadcast to ``target`` (right-aligned, no new dims in target)."""
    if len(shape) > len(target):
        return True
    return any(known_ne(s, 1) and known_ne(s, t) for s, t in zip(reversed(shape), reversed(target)))
