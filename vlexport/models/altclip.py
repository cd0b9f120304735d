"""AltCLIP: XLM-RoBERTa text tower + CLIP ViT vision tower."""

from vlexport.models.base import FamilySpec
from vlexport.models.dual_encoder_tasks import features_task

FAMILY = FamilySpec(
    name="altclip",
    model_types=("altclip",),
    tasks={"features": features_task("AltCLIPModel")},
    architectures={"AltCLIPModel": ("features",)},
)
