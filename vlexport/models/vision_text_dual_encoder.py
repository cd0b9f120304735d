"""VisionTextDualEncoder: any vision encoder + any text encoder joined by two projections."""

from vlexport.contracts.family import FamilySpec, Preset
from vlexport.inject import BERT_LIKE, VIT_LIKE
from vlexport.models.dual_encoder_tasks import features_task

PRESETS = (
    Preset(
        "vision-text-dual-encoder",
        "vision-text-dual-encoder",
        ("features",),
        None,
        "vision-text-dual-encoder-tiny",
        "VisionTextDualEncoder: ViT-base/16 vision + BERT-base text (untrained projection)",
    ),
    Preset(
        "vision-text-dual-encoder-tiny",
        "vision-text-dual-encoder",
        ("features",),
        None,
        None,
        "tiny VisionTextDualEncoder (tests)",
    ),
)

FAMILY = FamilySpec(
    name="vision-text-dual-encoder",
    model_types=("vision-text-dual-encoder",),
    tasks={"features": features_task("VisionTextDualEncoderModel")},
    architectures={"VisionTextDualEncoderModel": ("features",)},
    injection=(*BERT_LIKE, *VIT_LIKE),  # the encoders it is usually built from
    # BERT/RoBERTa text and ViT/CLIP vision encoder blocks: what ORT's "bert" fusions match
    ort_model_type="bert",
    title="VisionTextDualEncoder",
    presets=PRESETS,
    image_stats=((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),  # ViTImageProcessor's defaults
)
