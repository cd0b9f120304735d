"""Declarative export specs: a family has tasks, a task has one or more components.

A component is what becomes one ONNX file (or one compiled package): a wrapper module that takes
its inputs positionally and returns a tuple of tensors, with named inputs/outputs and dynamic axes.
The export/validate/runtime mechanism lives once, outside the family modules.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from vlexport.models.inputs import InputShape

DynamicAxes = Mapping[str, Mapping[int, str]]


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


class OutputSelector(nn.Module):
    """Calls an HF model with keyword inputs and returns only the task's outputs, in order.

    Selecting outputs keeps exported graphs to what the task needs (BridgeTowerForImageAndTextRetrieval
    otherwise returns every hidden state and attention: 53 outputs).
    """

    def __init__(self, model: nn.Module, inputs: Sequence[str], outputs: Sequence[str],
                 call_kwargs: Mapping[str, Any] | None = None):
        super().__init__()
        self.model = model
        self.input_names = tuple(inputs)
        self.output_names = tuple(outputs)
        self.call_kwargs = dict(call_kwargs or {})

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model(**dict(zip(self.input_names, args)), **self.call_kwargs,
                         output_hidden_states=False, output_attentions=False, return_dict=True)
        return tuple(out[name] for name in self.output_names)


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
    # generative tasks: config -> GenerationRecipe (models/generative.py), what the runtime's decode loop follows
    generation: Callable[[PretrainedConfig], Any] | None = None

    def hf_class(self) -> type[PreTrainedModel]:
        return getattr(importlib.import_module("transformers"), self.hf_class_name)


@dataclass(frozen=True)
class FamilySpec:
    name: str
    model_types: tuple[str, ...]  # config.model_type values this family handles
    tasks: Mapping[str, TaskSpec]
    # HF architecture name -> the tasks such a checkpoint supports (first is the default)
    architectures: Mapping[str, tuple[str, ...]]

    def task(self, name: str) -> TaskSpec:
        return self.tasks[name]

    def tasks_for_architectures(self, architectures: Sequence[str]) -> tuple[str, ...]:
        for arch in architectures:
            if arch in self.architectures:
                return self.architectures[arch]
        return tuple(self.tasks)


def single_component(inputs: Sequence[str], outputs: Sequence[str], dynamic_axes: DynamicAxes,
                     call_kwargs: Mapping[str, Any] | None = None
                     ) -> Callable[[PretrainedConfig], tuple[ComponentSpec, ...]]:
    """Components for a non-generative task: one graph named ``model`` over the whole HF model."""
    spec = ComponentSpec("model", tuple(inputs), tuple(outputs), dynamic_axes,
                         lambda m: OutputSelector(m, inputs, outputs, call_kwargs))
    return lambda config: (spec,)
