"""The static-KV-cache decoder (export/static_cache.py) against the ONNX-path decoder, eagerly (no AOT
compile).

Both wrappers are driven through the runtime's own steps (runtime/static_step.py and decoder_session.py) on
the same encoder outputs: greedy and beam search over a padded batch must give the same tokens and per-step
logits, for every generative task. Seconds per task, so every task's wiring is checked in CI; the compiled
packages are checked against HF generate() in test_compile_generation.py.
"""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

from vlexport.contracts.manifest import Component, TensorSpec
from vlexport.export.static_cache import SlotLayer, static_decoder
from vlexport.models.base import with_axis_limits
from vlexport.models.generative import CachedDecoder
from vlexport.models.inputs import EXPORT_SHAPE, InputShape
from vlexport.runtime.generate import Generator
from vlexport.weights import load_model, resolve

MAX_LENGTH = 24


class _Eager:
    """A torch module as a component callable (what AotiComponent offers: names, call_tensors, numpy call)."""

    def __init__(self, module: torch.nn.Module, inputs: tuple[str, ...], outputs: tuple[str, ...]):
        self.module, self.input_names, self.output_names = module, list(inputs), list(outputs)
        self.device, self.metadata = "cpu", {}

    def call_tensors(self, *tensors: torch.Tensor):
        with torch.no_grad():
            return self.module(*tensors)

    def __call__(self, feeds):
        outs = self.call_tensors(
            *(torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in self.input_names)
        )
        return {n: o.numpy() for n, o in zip(self.output_names, outs)}


def _generator(model, task, static: bool) -> Generator:
    components, specs = {}, {}
    for spec in task.components(model.config):
        spec = with_axis_limits(spec, model.config)
        example = spec.example_inputs(model, EXPORT_SHAPE, 0)
        module = spec.build(model).eval()
        if static and isinstance(module, CachedDecoder):
            module, spec, example = static_decoder(module, spec, example, max_length=MAX_LENGTH, max_batch=8)
        components[spec.name] = _Eager(module, spec.inputs, spec.outputs)
        specs[spec.name] = Component(
            spec.name,
            spec.name,
            [
                TensorSpec(
                    n,
                    str(example[n].dtype).removeprefix("torch."),
                    [spec.dynamic_axes.get(n, {}).get(i, d) for i, d in enumerate(example[n].shape)],
                )
                for n in spec.inputs
            ],
            [TensorSpec(n, "float32", []) for n in spec.outputs],
        )
    manifest = types.SimpleNamespace(
        components=specs,
        precision="fp32",
        task=task.name,
        family="",
        image_size=None,
        generation=task.generation(model.config).settings(model),
    )
    return Generator(
        types.SimpleNamespace(task_spec=task, manifest=manifest, components=components, directory="-"),
        config=model.config,
    )


@pytest.mark.parametrize(
    ("preset", "task"),
    [
        ("blip-tiny", "caption"),
        ("blip-tiny", "vqa"),
        ("blip2-opt-tiny", "generate"),
        ("blip2-flan-t5-tiny", "generate"),
    ],
    ids=["caption", "vqa", "blip2-opt", "blip2-t5"],
)
def test_static_cache_decoder_matches_the_dynamic_one(preset: str, task: str) -> None:
    source = resolve(preset, random_weights=True)
    model = load_model(source, task)
    spec = source.family.task(task)
    inputs = {k: v.numpy() for k, v in spec.make_inputs(model.config, InputShape(3, 5), 11).items()}
    dynamic, static = _generator(model, spec, static=False), _generator(model, spec, static=True)
    for beams in (1, 2):
        a = dynamic.generate(**inputs, max_new_tokens=6, num_beams=beams, output_logits=True)
        b = static.generate(**inputs, max_new_tokens=6, num_beams=beams, output_logits=True)
        np.testing.assert_array_equal(b.sequences, a.sequences)
        assert len(a.logits) == len(b.logits) >= 2
        for x, y in zip(a.logits, b.logits):
            np.testing.assert_allclose(y, x, atol=2e-5, rtol=1e-5)
        assert np.ptp(np.stack(a.logits)) > 0.1  # the logits move: the comparison checks something


def test_slot_layer_writes_in_place_and_returns_every_slot() -> None:
    keys, values = torch.zeros(2, 1, 6, 3), torch.zeros(2, 1, 6, 3)
    layer = SlotLayer(keys, values, torch.tensor([2, 3]))
    new = torch.arange(12.0).reshape(2, 1, 2, 3)
    k, v = layer.update(new, -new)
    assert k is keys and v is values  # the caller's buffers, updated in place
    assert torch.equal(keys[:, :, 2:4], new) and torch.equal(values[:, :, 2:4], -new)
    assert keys[:, :, [0, 1, 4, 5]].abs().sum() == 0
    assert int(layer.get_seq_length()) == 2 and layer.get_mask_sizes(2) == (6, 0)
