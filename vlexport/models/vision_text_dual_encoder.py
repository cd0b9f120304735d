"""VisionTextDualEncoder: any vision encoder + any text encoder joined by two projections."""

from vlexport.models.base import FamilySpec
from vlexport.models.dual_encoder_tasks import features_task

FAMILY = FamilySpec(
    name="vision-text-dual-encoder",
    model_types=("vision-text-dual-encoder",),
    tasks={"features": features_task("VisionTextDualEncoderModel")},
    architectures={"VisionTextDualEncoderModel": ("features",)},
)
