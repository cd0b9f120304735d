"""Helpers the family modules declare with: position-table limits, the output selector, one-graph tasks.

The schema they fill in (ComponentSpec, TaskSpec, FamilySpec, Preset) is contracts/family.py; the
export/validate/runtime mechanism lives once, outside the family modules.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from vlexport.contracts.family import ComponentSpec, DynamicAxes

if TYPE_CHECKING:  # annotations only: compiled artifacts generate without transformers
    from transformers import PretrainedConfig

# Token axes bounded by the text model's learned position table.
_POSITION_AXES = ("sequence", "past_sequence", "total_sequence")


def with_axis_limits(spec: ComponentSpec, config: PretrainedConfig, offset: int = 0) -> ComponentSpec:
    """``spec`` with its token axes bounded by ``max_position_embeddings`` of the (text) config.

    Models with a learned position table slice ``position_ids[:, :seq_len]``: torch.export then guards
    ``seq_len <= max_position_embeddings`` and refuses an unbounded dynamic dim ("Constraints violated
    (sequence)"). Declaring the bound the model really has exports the same graph, and states its limit.
    Relative-position models (T5) have no such table and keep unbounded axes. ``offset``: table rows the
    model skips before its first token (``FamilySpec.position_offset``; RoBERTa-style embeddings start at
    ``pad_token_id + 1``), so longer texts are refused up front instead of indexing past the table.
    """
    text = getattr(config, "text_config", None) or config
    limit = getattr(text, "max_position_embeddings", None)
    names = {name for axes in spec.dynamic_axes.values() for name in axes.values()}
    if not isinstance(limit, int) or not names & set(_POSITION_AXES):
        return spec
    limit -= offset
    return dataclasses.replace(
        spec, axis_max={**spec.axis_max, **{a: limit for a in _POSITION_AXES if a in names}}
    )


def roberta_position_offset(config: PretrainedConfig) -> int:
    """RoBERTa-style text embeddings number positions from ``pad_token_id + 1`` (BridgeTower, AltCLIP)."""
    text = getattr(config, "text_config", None) or config
    return int(getattr(text, "pad_token_id", None) or 0) + 1


class OutputSelector(nn.Module):
    """Calls an HF model with keyword inputs and returns only the task's outputs, in order.

    Selecting outputs keeps exported graphs to what the task needs (BridgeTowerForImageAndTextRetrieval
    otherwise returns every hidden state and attention: 53 outputs).
    """

    def __init__(
        self,
        model: nn.Module,
        inputs: Sequence[str],
        outputs: Sequence[str],
        call_kwargs: Mapping[str, Any] | None = None,
    ):
        super().__init__()
        self.model = model
        self.input_names = tuple(inputs)
        self.output_names = tuple(outputs)
        self.call_kwargs = dict(call_kwargs or {})

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model(
            **dict(zip(self.input_names, args)),
            **self.call_kwargs,
            output_hidden_states=False,
            output_attentions=False,
            return_dict=True,
        )
        return tuple(out[name] for name in self.output_names)


def single_component(
    inputs: Sequence[str],
    outputs: Sequence[str],
    dynamic_axes: DynamicAxes,
    call_kwargs: Mapping[str, Any] | None = None,
) -> Callable[[PretrainedConfig], tuple[ComponentSpec, ...]]:
    """Components for a non-generative task: one graph named ``model`` over the whole HF model."""
    spec = ComponentSpec(
        "model",
        tuple(inputs),
        tuple(outputs),
        dynamic_axes,
        lambda m: OutputSelector(m, inputs, outputs, call_kwargs),
    )
    return lambda config: (spec,)
