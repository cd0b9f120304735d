"""Model families: one declarative module each; the registry maps names and model types to them."""

from __future__ import annotations

import importlib

from vlexport.errors import UsageError
from vlexport.models.base import ComponentSpec, FamilySpec, OutputSelector, TaskSpec  # noqa: F401

_FAMILY_MODULES = {
    "bridgetower": "vlexport.models.bridgetower",
    "blip": "vlexport.models.blip",
    "blip2": "vlexport.models.blip2",
    "altclip": "vlexport.models.altclip",
    "vision-text-dual-encoder": "vlexport.models.vision_text_dual_encoder",
}
_MODEL_TYPES = {
    "bridgetower": "bridgetower",
    "blip": "blip",
    "blip-2": "blip2",
    "altclip": "altclip",
    "vision-text-dual-encoder": "vision-text-dual-encoder",
}


def family_names() -> tuple[str, ...]:
    return tuple(_FAMILY_MODULES)


def get_family(name: str) -> FamilySpec:
    return importlib.import_module(_FAMILY_MODULES[name]).FAMILY


def family_for_model_type(model_type: str, *, where: str = "") -> FamilySpec:
    try:
        return get_family(_MODEL_TYPES[model_type])
    except KeyError:
        raise UsageError(
            f"{where + ': ' if where else ''}model_type {model_type!r} is not supported. vlexport supports "
            f"{', '.join(sorted(_MODEL_TYPES))} (BridgeTower, BLIP, BLIP-2, AltCLIP, VisionTextDualEncoder); "
            "run `vlexport list` for the presets."
        ) from None
