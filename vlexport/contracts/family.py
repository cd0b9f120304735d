"""The family schema: what a family module declares and every stage reads (export, validation, runtime).

A family has tasks, a task has one or more components. A component is what becomes one ONNX file (or one
compiled package): a wrapper module that takes its inputs positionally and returns a tuple of tensors, with
named inputs/outputs and dynamic axes; a family's kernel-injection ``Rule``s are what inject.py applies.
The declarations live in ``models/<family>.py``; the helpers that build
them in ``models/base.py``. Annotations only name torch, numpy and transformers types, so the served
runtime's torch-free modules may import this schema.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeAlias

if TYPE_CHECKING:
    import numpy as np
    import torch
    from torch import nn
    from transformers import PretrainedConfig, PreTrainedModel

    from vlexport.contracts.precision import PrecisionConfig

DynamicAxes = Mapping[str, Mapping[int, str]]
# The image statistics of CLIP's processor, which the BLIP, BLIP-2, BridgeTower and AltCLIP checkpoints use.
CLIP_IMAGE_STATS = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
# (outputs of one run over n texts, n) -> per-text scores by name (models/scores.py has the shared readers)
ScoreReader: TypeAlias = "Callable[[Mapping[str, np.ndarray], int], dict[str, np.ndarray]]"


@dataclass(frozen=True)
class Rule:
    """Module classes (``<transformers.models sub-path>.<Class>``) that one kernel takes over, and how.

    ``replacement`` None: the classes call ALL_ATTENTION_FUNCTIONS, so switching their config routes them.
    Otherwise ``method`` of every instance is replaced by ``replacement(module, original, *args)``, where
    ``original`` is the bound method it replaces (the fallback for training / requested attentions).
    ``check`` returns why a module cannot be taken over (a layout the replacement does not know), or None.
    """

    kernel: str  # "attention" | "bridge"
    classes: tuple[str, ...]
    replacement: Callable[..., Any] | None = None
    method: str = "forward"
    check: Callable[[nn.Module], str | None] = lambda module: None


@dataclass(frozen=True)
class InputShape:
    batch: int
    seq_len: int

    def __str__(self) -> str:
        return f"b{self.batch}s{self.seq_len}"


@dataclass(frozen=True)
class ComponentSpec:
    """One exported graph: ``build(model)`` returns a module with ``forward(*inputs) -> tuple(outputs)``."""

    name: str  # file stem, e.g. "model", "vision_encoder", "decoder_with_past"
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    dynamic_axes: DynamicAxes
    build: Callable[[PreTrainedModel], nn.Module]
    # (model, shape, seed) -> example inputs of this component; None: the task's make_inputs
    example_inputs: Callable[[PreTrainedModel, InputShape, int], dict[str, torch.Tensor]] | None = None
    # Largest size per dynamic axis name (with_axis_limits): what the model's own tables allow
    axis_max: Mapping[str, int] = field(default_factory=dict)


def _no_mixes(config: PretrainedConfig) -> tuple[Mapping[str, PrecisionConfig], ...]:
    return ()


@dataclass(frozen=True)
class TaskSpec:
    """A task of a family: which HF class, which components, which inputs, which task-level checks."""

    name: str
    hf_class_name: str
    # config -> components (generative tasks name one input/output per cache layer, so they need it)
    components: Callable[[PretrainedConfig], tuple[ComponentSpec, ...]]
    # (config, shape, seed) -> named example inputs for the whole task
    make_inputs: Callable[[PretrainedConfig, InputShape, int], dict[str, torch.Tensor]]
    generative: bool = False
    # task-level agreement checks on outputs for reduced precisions: output name -> kind
    # ("argmax": per-row argmax over the last dim; "ranking": argsort of scores)
    agreement: Mapping[str, str] = field(default_factory=dict)
    description: str = ""
    load_kwargs: Callable[[PretrainedConfig], dict[str, Any]] = lambda config: {}
    prepare: Callable[[PreTrainedModel], None] = lambda model: None
    # generative tasks: config -> GenerationRecipe (models/generative.py), what the runtime's decode loop
    # follows
    generation: Callable[[PretrainedConfig], Any] | None = None
    # `vlexport run`: the base feed (input_ids, attention_mask, pixel_values; numpy) -> the component's feed,
    # with the family's extra inputs added (BridgeTower's pixel_mask)
    run_inputs: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]] = lambda feeds: feeds
    # `vlexport run`: how per-text scores are read off the outputs; None: the task has no image-text score
    scores: ScoreReader | None = None
    # generative tasks: config -> per-component precision recipes (component -> config; unnamed ones fp32)
    # that `vlexport tune` builds beside the whole-model precisions (`quantize --components` by hand)
    component_mixes: Callable[[PretrainedConfig], tuple[Mapping[str, PrecisionConfig], ...]] = _no_mixes

    def hf_class(self) -> type[PreTrainedModel]:
        return getattr(importlib.import_module("transformers"), self.hf_class_name)


@dataclass(frozen=True)
class Preset:
    """A shipped model name: its family, tasks, upstream checkpoint id and a copy of its config.json.

    Declared in the family module (``FamilySpec.presets``); the config lives in
    ``vlexport/presets/configs/<name>.json`` so the architecture builds without the hub. Every full-size
    preset names a ``-tiny`` twin of the same family (a few MB, same code paths) that the tests use.
    """

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
        from importlib import resources

        text = resources.files("vlexport.presets").joinpath("configs", f"{self.name}.json").read_text()
        return json.loads(text)


@dataclass(frozen=True)
class FamilySpec:
    name: str
    model_types: tuple[str, ...]  # config.model_type values this family handles (the registry reads them)
    tasks: Mapping[str, TaskSpec]
    # HF architecture name -> the tasks such a checkpoint supports (first is the default)
    architectures: Mapping[str, tuple[str, ...]]
    # --kernels: which module classes vlexport.inject takes over, and how (empty: the family has no kernels)
    injection: tuple[Rule, ...] = ()
    # --random-weights: fixes a seeded random-init model needs beyond the config (called after construction)
    random_init: Callable[[PreTrainedModel], None] = lambda model: None
    # --optimize: the model_type ONNX Runtime's transformer optimizer fuses the graphs as
    ort_model_type: str = "bert"
    title: str = ""  # how users write the family's name (messages): "BridgeTower", "BLIP-2", ...
    presets: tuple[Preset, ...] = ()  # the shipped names (vlexport/presets builds its table from these)
    # `vlexport run` without a preprocessor_config.json: the family's processor mean / std per channel
    image_stats: tuple[tuple[float, ...], tuple[float, ...]] = CLIP_IMAGE_STATS
    # config -> {precision: why this model cannot take it}: refused before any work, with the reason
    precision_limits: Callable[[PretrainedConfig], Mapping[str, str]] = lambda config: {}
    # config -> rows of the learned position table before the first token's (models/base.py with_axis_limits)
    position_offset: Callable[[PretrainedConfig], int] = lambda config: 0

    def task(self, name: str) -> TaskSpec:
        return self.tasks[name]

    def tasks_for_architectures(self, architectures: Sequence[str]) -> tuple[str, ...]:
        for arch in architectures:
            if arch in self.architectures:
                return self.architectures[arch]
        return tuple(self.tasks)
