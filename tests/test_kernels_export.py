"""Export with --kernels attention,bridge: every tiny preset x task exports, validates against the
un-injected eager model, and its ONNX graphs hold one fused node per kernel call.

Acceptance (issue 5): injection + export + validation pass for every tiny preset with
``--kernels attention,bridge``; the exported graphs contain the fused ops (counted here) and validate.
One task per preset runs by default, every task with ``--full`` (tests/conftest.py).
"""

from __future__ import annotations

import collections
from pathlib import Path

import onnx
import pytest
import torch
from test_inject import OpCalls, expected_calls, expected_modules

from vlexport.contracts.manifest import Manifest
from vlexport.inject import inject
from vlexport.models import get_family
from vlexport.models.inputs import EXPORT_SHAPE
from vlexport.presets import PRESETS
from vlexport.weights import load_model, resolve

KERNELS = ("attention", "bridge")


def _default_task(preset, family) -> str:
    """The case per tiny preset that runs by default: a generative task where there is one (it reaches most of
    the family's injected modules: vision encoder, the decoder's self and cross attention), else the preset's
    default task. The other tasks only change the head; they run with --full."""
    generative = [t for t in preset.tasks if family.task(t).generation is not None]
    return (generative or [preset.default_task])[0]


def _tiny_cases() -> list:
    """Every tiny preset x task: a family module that fails to import fails collection, and a task it does not
    declare fails its test; nothing drops out silently (a new family's preset gets a default case by rule)."""
    cases = []
    for name, preset in PRESETS.items():
        if preset.is_tiny:
            default = _default_task(preset, get_family(preset.family))
            cases += [
                pytest.param(
                    name, task, id=f"{name}-{task}", marks=() if task == default else pytest.mark.exhaustive
                )
                for task in preset.tasks
            ]
    return cases


CASES = _tiny_cases()

# ONNX nodes each kernel becomes (onnx_translation_table): (domain, op_type) sets.
FUSED_OPS = {
    "attention": {("com.microsoft", "MultiHeadAttention")},
    "bridge": {("com.microsoft", "SkipLayerNormalization")},
}


def fused_node_counts(path: Path) -> dict[str, int]:
    graph = onnx.load(str(path), load_external_data=False).graph
    ops = collections.Counter((node.domain or "", node.op_type) for node in graph.node)
    return {kernel: sum(ops[op] for op in wanted) for kernel, wanted in FUSED_OPS.items()}


def expected_graph_nodes(config, task: str) -> dict[str, int]:
    """Fused nodes of a non-generative task's graph: one per kernel call whose result reaches an output."""
    n = expected_calls(config, task)
    if config.model_type == "bridgetower" and task == "mlm":
        # MLM reads the text side only: the last image-side cross-modal layer (self + cross attention,
        # their two SelfOutputs and an Output) feeds no output, and the exporter drops it.
        n = {"attention": n["attention"] - 2, "bridge": n["bridge"] - 3}
    return n


def traced_calls(preset: str, task: str) -> dict[str, dict[str, int]]:
    """Kernel calls per component on its export example: the number of fused nodes its graph must hold."""
    source = resolve(preset, random_weights=True)
    model = load_model(source, task)
    spec = source.family.task(task)
    calls = {}
    with torch.no_grad(), inject(model, source.family.injection):
        for component in spec.components(model.config):
            example = (
                component.example_inputs(model, EXPORT_SHAPE, 0)
                if component.example_inputs
                else spec.make_inputs(model.config, EXPORT_SHAPE, 0)
            )
            with OpCalls() as ops:
                component.build(model)(*(example[name] for name in component.inputs))
            calls[component.name] = ops.kernel_calls()
    return calls


@pytest.mark.parametrize(("preset", "task"), CASES)
def test_export_with_kernels_validates_and_holds_fused_ops(exported, preset: str, task: str) -> None:
    out = exported(preset, task, kernels=KERNELS)
    manifest = Manifest.read(out)
    assert manifest.validation.passed is True  # against the eager model without kernels

    config = resolve(preset, random_weights=True).config
    replaced = expected_modules(config, manifest.hf_class)
    assert manifest.kernels == [f"{k}:{replaced[k]}" for k in KERNELS]

    fused = {name: fused_node_counts(out / c.file) for name, c in manifest.components.items()}
    if not get_family(manifest.family).task(task).generative:
        assert fused == {"model": expected_graph_nodes(config, task)}  # from the config
    else:  # several graphs (vision, decoder with past, ...): one fused node per kernel call in each
        assert fused == traced_calls(preset, task)
    assert sum(c["attention"] for c in fused.values()) > 0 and sum(c["bridge"] for c in fused.values()) > 0


def test_plain_export_has_no_fused_ops(exported) -> None:
    out = exported("vision-text-dual-encoder-tiny", "features")  # shared with test_export_onnx in a full run
    assert fused_node_counts(out / "model.onnx") == {"attention": 0, "bridge": 0}
    assert Manifest.read(out).kernels == []


def test_cli_kernels_flag(tmp_path: Path, capsys) -> None:
    from vlexport.cli import main

    out = tmp_path / "altclip"
    code = main(["onnx", "altclip-tiny", "--random-weights", "--kernels", "attention,bridge", "-o", str(out)])
    assert code == 0, capsys.readouterr().err
    manifest = Manifest.read(out)
    assert manifest.kernels == ["attention:4", "bridge:4"] and manifest.validation.passed is True
    assert fused_node_counts(out / "model.onnx") == {"attention": 4, "bridge": 4}
