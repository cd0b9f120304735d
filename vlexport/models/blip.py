"""BLIP: ViT vision encoder + BERT text encoder/decoder with cross-attention to the image."""

from __future__ import annotations

from vlexport.models import dual_encoder_tasks
from vlexport.models.base import FamilySpec, TaskSpec, single_component

_ITM_OUTPUTS = ("itm_score",)


def _retrieval_task(name: str, use_itm_head: bool, axes: dict, description: str) -> TaskSpec:
    return TaskSpec(
        name, "BlipForImageTextRetrieval",
        single_component(dual_encoder_tasks.INPUTS, _ITM_OUTPUTS, {**dual_encoder_tasks.AXES, **axes},
                         call_kwargs={"use_itm_head": use_itm_head}),
        dual_encoder_tasks.make_inputs, agreement={"itm_score": "argmax"}, description=description,
    )


TASKS: dict[str, TaskSpec] = {
    "itm": _retrieval_task("itm", True, {"itm_score": {0: "batch"}}, "image-text matching scores (no/yes)"),
    "itc": _retrieval_task("itc", False, {"itm_score": {0: "batch", 1: "batch"}},
                           "image-text cosine similarity matrix (contrastive head)"),
    "features": dual_encoder_tasks.features_task("BlipModel"),
}

FAMILY = FamilySpec(
    name="blip",
    model_types=("blip",),
    tasks=TASKS,
    architectures={
        "BlipForImageTextRetrieval": ("itm", "itc", "features"),
        "BlipForConditionalGeneration": ("caption",),
        "BlipForQuestionAnswering": ("vqa",),
        "BlipModel": ("features",),
    },
)
