"""AltCLIP: XLM-RoBERTa text tower + CLIP ViT vision tower."""

from vlexport.contracts.family import FamilySpec, Preset
from vlexport.inject import interface, post_norm
from vlexport.models.base import roberta_position_offset
from vlexport.models.dual_encoder_tasks import features_task

PRESETS = (
    Preset(
        "altclip",
        "altclip",
        ("features",),
        "BAAI/AltCLIP",
        "altclip-tiny",
        "AltCLIP (XLM-R text tower, CLIP ViT-L/14 vision tower)",
    ),
    Preset("altclip-tiny", "altclip", ("features",), None, None, "tiny AltCLIP (tests)"),
)

FAMILY = FamilySpec(
    name="altclip",
    model_types=("altclip",),
    tasks={"features": features_task("AltCLIPModel")},
    architectures={"AltCLIPModel": ("features",)},
    injection=(
        interface(
            "altclip.modeling_altclip.AltRobertaSelfAttention", "altclip.modeling_altclip.AltCLIPAttention"
        ),
        post_norm(
            "altclip.modeling_altclip.AltRobertaSelfOutput", "altclip.modeling_altclip.AltRobertaOutput"
        ),
    ),
    ort_model_type="bert",  # XLM-R and CLIP-ViT encoder blocks: what ORT's "bert" fusions match
    title="AltCLIP",
    position_offset=roberta_position_offset,
    presets=PRESETS,
)
