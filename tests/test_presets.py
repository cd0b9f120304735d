"""Every preset is usable and tested: tiny twins exist, tasks exist, every tiny task has an export test."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from vlexport.models import family_names, get_family
from vlexport.presets import PRESETS

TESTS = Path(__file__).parent


def test_every_family_has_a_tiny_preset() -> None:
    tiny_families = {p.family for p in PRESETS.values() if p.is_tiny}
    assert tiny_families == set(family_names())


@pytest.mark.parametrize("name", [n for n, p in PRESETS.items() if not p.is_tiny])
def test_full_preset_has_tiny_twin_covering_its_tasks(name: str) -> None:
    preset = PRESETS[name]
    twin = PRESETS[preset.tiny]
    assert twin.is_tiny and twin.family == preset.family
    assert set(preset.tasks) <= set(twin.tasks)


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_tasks_are_declared_by_family(name: str) -> None:
    preset = PRESETS[name]
    family = get_family(preset.family)
    assert set(preset.tasks) <= set(family.tasks), set(preset.tasks) - set(family.tasks)


def test_every_tiny_generative_task_has_an_export_test() -> None:
    # Encoder tasks are parametrised over PRESETS in test_export_onnx.py; generative ones have their own
    # modules, which must name each tiny preset (optimum's test_all_models_tested, in spirit).
    text = "\n".join(p.read_text() for p in TESTS.glob("test_generation*.py"))
    for name, preset in PRESETS.items():
        family = get_family(preset.family)
        for task in preset.tasks:
            if preset.is_tiny and family.task(task).generative:
                assert re.search(rf"[\"']{re.escape(name)}[\"']", text) and task in text, (name, task)
