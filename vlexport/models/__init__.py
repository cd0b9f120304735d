"""Model families: one declarative module each; the registry maps names and model types to them.

A family is any module of this package that defines ``FAMILY = FamilySpec(...)``: adding a family is
adding its module (and its preset config JSONs), nothing else (docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import pkgutil

from vlexport.contracts.family import ComponentSpec, FamilySpec, Preset, TaskSpec  # noqa: F401
from vlexport.errors import UsageError
from vlexport.models.base import OutputSelector  # noqa: F401


@functools.cache
def _families() -> dict[str, FamilySpec]:
    """name -> family, from every module here that defines FAMILY (imports them all, once, on first use)."""
    found: dict[str, FamilySpec] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        family = getattr(importlib.import_module(f"{__name__}.{info.name}"), "FAMILY", None)
        if isinstance(family, FamilySpec):
            if family.name in found:
                raise RuntimeError(f"family {family.name!r} is declared twice (models/{info.name}.py)")
            found[family.name] = family
    return found


@functools.cache
def _model_types() -> dict[str, FamilySpec]:
    """config.model_type -> family, from every family's ``model_types``."""
    by_type: dict[str, FamilySpec] = {}
    for family in _families().values():
        for model_type in family.model_types:
            if model_type in by_type:
                raise RuntimeError(
                    f"model_type {model_type!r} is claimed by {by_type[model_type].name} and {family.name}"
                )
            by_type[model_type] = family
    return by_type


def family_names() -> tuple[str, ...]:
    return tuple(_families())


def get_family(name: str) -> FamilySpec:
    # The module named after the family first: loading an artifact imports its own family only (a compiled
    # artifact generates without transformers, which the other family modules import).
    module = f"{__name__}.{name.replace('-', '_')}"
    if name.replace("-", "_").isidentifier() and importlib.util.find_spec(module) is not None:
        family = getattr(importlib.import_module(module), "FAMILY", None)
        if isinstance(family, FamilySpec) and family.name == name:
            return family
    try:
        return _families()[name]
    except KeyError:
        raise UsageError(f"Unknown model family {name!r}: vlexport has {', '.join(_families())}.") from None


def family_for_model_type(model_type: str, *, where: str = "") -> FamilySpec:
    try:
        return _model_types()[model_type]
    except KeyError:
        supported = ", ".join(f"{t} ({f.title or f.name})" for t, f in sorted(_model_types().items()))
        raise UsageError(
            f"{where + ': ' if where else ''}model_type {model_type!r} is not supported. vlexport supports "
            f"{supported}; run `vlexport list` for the presets."
        ) from None
