"""Every preset is usable and tested: tiny twins exist, tasks exist, every tiny task has an export test."""

from __future__ import annotations

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


# The export test each tiny (preset, task) must have: generative tasks in test_generation.py, the others in
# test_export_onnx.py (optimum's test_all_models_tested, in spirit).
EXPORT_TESTS = {
    True: ("test_generation.py", "test_tiny_generative_export_validates_token_exact"),
    False: ("test_export_onnx.py", "test_tiny_export_validates_against_eager"),
}


def tiny_tasks(generative: bool) -> set[tuple[str, str]]:
    return {
        (name, task)
        for name, p in PRESETS.items()
        if p.is_tiny
        for task in p.tasks
        if get_family(p.family).task(task).generative == generative
    }


def collected_export_cases(
    request: pytest.FixtureRequest, module: str, function: str
) -> set[tuple[str, str]]:
    """(preset, task) of every test item pytest itself collects for ``function`` in ``module``.

    pytest's collection, not the source text or a list beside the test: a case counts only when a test item
    with those parameters exists and exports (requests the ``exported`` fixture).
    """
    stack: list[pytest.Item | pytest.Collector] = [
        pytest.Module.from_parent(request.session, path=TESTS / module)
    ]
    cases: set[tuple[str, str]] = set()
    while stack:
        node = stack.pop()
        if isinstance(node, pytest.Collector):
            stack.extend(node.collect())
        elif (
            isinstance(node, pytest.Function)
            and node.originalname == function
            and "exported" in node.fixturenames
        ):
            params = node.callspec.params if hasattr(node, "callspec") else {}
            cases.add((params.get("preset"), params.get("task")))
    return cases


@pytest.mark.parametrize("generative", [True, False], ids=["generative", "encoder"])
def test_every_tiny_task_has_an_export_test(request: pytest.FixtureRequest, generative: bool) -> None:
    module, function = EXPORT_TESTS[generative]
    wanted = tiny_tasks(generative)
    assert wanted, "no tiny preset declares such a task: the check would be vacuous"
    missing = wanted - collected_export_cases(request, module, function)
    assert not missing, f"{module}::{function} collects no export test for {sorted(missing)}"
