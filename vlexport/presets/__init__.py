"""Shipped presets: a name -> family, tasks, upstream checkpoint id and a copy of its config.json.

The configs live in ``configs/<name>.json`` as package data, so the architecture of every supported
model can be built without the hub. Every full-size preset has a ``-tiny`` twin of the same family
(a few MB, same code paths) that the tests use.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from importlib import resources
from typing import Any

from vlexport.errors import UsageError


@dataclass(frozen=True)
class Preset:
    name: str
    family: str
    tasks: tuple[str, ...]
    checkpoint: str | None  # upstream hub id; None for tiny twins (no upstream checkpoint)
    tiny: str | None = None  # name of the tiny twin, for full-size presets
    summary: str = ""

    @property
    def default_task(self) -> str:
        return self.tasks[0]

    @property
    def is_tiny(self) -> bool:
        return self.name.endswith("-tiny")

    def config_dict(self) -> dict[str, Any]:
        text = resources.files(__name__).joinpath("configs", f"{self.name}.json").read_text()
        return json.loads(text)


_BT_ALL = ("itm", "itc", "mlm", "features")
_BLIP_ALL = ("itm", "itc", "features", "caption", "vqa")

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset("bridgetower-base", "bridgetower", ("features",), "BridgeTower/bridgetower-base",
               "bridgetower-tiny", "BridgeTower base: image/text/cross-modal features"),
        Preset("bridgetower-base-itm-mlm", "bridgetower", ("itm", "mlm", "features"),
               "BridgeTower/bridgetower-base-itm-mlm", "bridgetower-tiny",
               "BridgeTower base fine-tuned for image-text matching and masked LM"),
        Preset("bridgetower-large-itm-mlm-itc", "bridgetower", ("itm", "itc", "mlm", "features"),
               "BridgeTower/bridgetower-large-itm-mlm-itc", "bridgetower-tiny",
               "BridgeTower large: matching, contrastive and masked LM heads"),
        Preset("blip-itm-base-coco", "blip", ("itm", "itc", "features"), "Salesforce/blip-itm-base-coco",
               "blip-tiny", "BLIP image-text retrieval (ITM and ITC heads)"),
        Preset("blip-image-captioning-base", "blip", ("caption",), "Salesforce/blip-image-captioning-base",
               "blip-tiny", "BLIP image captioning"),
        Preset("blip-vqa-base", "blip", ("vqa",), "Salesforce/blip-vqa-base", "blip-tiny",
               "BLIP visual question answering"),
        Preset("blip2-opt-2.7b", "blip2", ("generate",), "Salesforce/blip2-opt-2.7b", "blip2-opt-tiny",
               "BLIP-2 with OPT-2.7b: captioning and prompted VQA"),
        Preset("blip2-flan-t5-xl", "blip2", ("generate",), "Salesforce/blip2-flan-t5-xl",
               "blip2-flan-t5-tiny", "BLIP-2 with Flan-T5-XL: captioning and prompted VQA"),
        Preset("altclip", "altclip", ("features",), "BAAI/AltCLIP", "altclip-tiny",
               "AltCLIP (XLM-R text tower, CLIP ViT-L/14 vision tower)"),
        Preset("vision-text-dual-encoder", "vision-text-dual-encoder", ("features",), None,
               "vision-text-dual-encoder-tiny",
               "VisionTextDualEncoder: ViT-base/16 vision + BERT-base text (untrained projection)"),
        # Tiny twins: same architecture code paths, a few MB, every task of the family.
        Preset("bridgetower-tiny", "bridgetower", _BT_ALL, None, None, "tiny BridgeTower (tests)"),
        Preset("blip-tiny", "blip", _BLIP_ALL, None, None, "tiny BLIP (tests)"),
        Preset("blip2-opt-tiny", "blip2", ("generate",), None, None, "tiny BLIP-2 with OPT (tests)"),
        Preset("blip2-flan-t5-tiny", "blip2", ("generate",), None, None, "tiny BLIP-2 with T5 (tests)"),
        Preset("altclip-tiny", "altclip", ("features",), None, None, "tiny AltCLIP (tests)"),
        Preset("vision-text-dual-encoder-tiny", "vision-text-dual-encoder", ("features",), None, None,
               "tiny VisionTextDualEncoder (tests)"),
    ]
}


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
