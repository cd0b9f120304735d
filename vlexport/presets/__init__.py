"""Shipped presets: a name -> family, tasks, upstream checkpoint id and a copy of its config.json.

The configs live in ``configs/<name>.json`` as package data, so the architecture of every supported
model can be built without the hub; the declarations live in the family modules (models/). Every
full-size preset has a ``-tiny`` twin of the same family (a few MB, same code paths) that the tests use.
"""

from __future__ import annotations

import difflib

from vlexport.contracts.family import Preset
from vlexport.errors import UsageError
from vlexport.models import family_names, get_family

__all__ = ["PRESETS", "Preset", "get_preset"]


# Every family module declares its presets (FamilySpec.presets): a new family touches its module and its
# config JSONs only.
PRESETS: dict[str, Preset] = {p.name: p for name in family_names() for p in get_family(name).presets}


def get_preset(name: str) -> Preset:
    """Look a preset up by name; an unknown name is a usage error that suggests close names."""
    try:
        return PRESETS[name]
    except KeyError:
        close = difflib.get_close_matches(name, PRESETS, n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise UsageError(
            f"Unknown model {name!r}: it is neither a preset nor a local directory.{hint} "
            "Run `vlexport list` to see the presets, or pass a directory written by save_pretrained "
            "(config.json + *.safetensors)."
        ) from None
