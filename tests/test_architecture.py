"""The layering docs/ARCHITECTURE.md describes, checked on the source: every vlexport module belongs to one
layer, no import (module-level or inside a function) runs from a layer to one below it, and there is no cycle.

The lists of what must obey come from the registries, not from hand-typed names: family names and model types
from the family registry, backend modules from ``contracts.backends.BUILTIN``, pass modules from
``contracts.passes.BUILTIN``. New code is covered the day it lands.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from vlexport.contracts import backends as backend_registry
from vlexport.contracts import passes as pass_registry
from vlexport.models import family_names, get_family

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "vlexport"

# Top to bottom: a module imports modules of its own layer or of layers above it, never below.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "contracts",
        (
            "vlexport",
            "vlexport.errors",
            "vlexport.cpu",
            "vlexport.memory",
            "vlexport.userdata",
            "vlexport.artifact",
            "vlexport.contracts.manifest",
            "vlexport.support_files",
            "vlexport.contracts",
            "vlexport.callables",
        ),
    ),
    ("injection", ("vlexport.inject",)),  # the mechanism; the families declare its rules
    ("families", ("vlexport.models", "vlexport.presets")),
    ("model plumbing", ("vlexport.weights", "vlexport.compose")),
    ("runtime", ("vlexport.runtime",)),
    ("backends", ("vlexport.export", "vlexport.quantize")),
    ("validation", ("vlexport.validate",)),
    ("serving", ("vlexport.serve",)),
    ("orchestration", ("vlexport.pipeline",)),
    ("benchmarks", ("vlexport.bench",)),
    ("entry points", ("vlexport.cli", "vlexport.display", "vlexport.api", "vlexport.hf")),
)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def layer_of(module: str) -> int:
    """Index in LAYERS of the longest prefix that names ``module`` (a package or the module itself)."""
    best, found = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            inside = module == prefix or (prefix != "vlexport" and module.startswith(prefix + "."))
            if inside and len(prefix) > best:
                best, found = len(prefix), i
    if found is None:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS and docs/ARCHITECTURE.md")
    return found


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    """ids of the nodes under ``if TYPE_CHECKING:``: annotations only, never executed."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            skip |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return skip


def _imports(name: str, path: Path) -> set[str]:
    """Every vlexport module ``name`` imports, at module level or inside functions (a lazy import is still a
    dependency: it only moves the cycle from import time to call time); ``TYPE_CHECKING`` blocks excluded."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    skip = _type_checking_nodes(tree)
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: climb level - 1 packages up from this module's package
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            # `from pkg import sub` imports the submodule when there is one
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        found |= {t for t in targets if t in MODULES and t != name}
    return found


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _reaches(start: str, goal: str) -> list[str] | None:
    stack, seen = [(start, [start])], set()
    while stack:
        node, trail = stack.pop()
        for nxt in GRAPH[node]:
            if nxt == goal:
                return trail + [nxt]
            if nxt not in seen:
                seen.add(nxt)
                stack.append((nxt, trail + [nxt]))
    return None


def test_no_import_cycle() -> None:
    cycles = [trail for name in GRAPH if (trail := _reaches(name, name))]
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles[:5])


def test_every_module_has_a_layer_and_no_import_runs_up() -> None:
    upward = [
        f"{a} ({LAYERS[layer_of(a)][0]}) -> {b} ({LAYERS[layer_of(b)][0]})"
        for a, imported in GRAPH.items()
        for b in imported
        if layer_of(b) > layer_of(a)
    ]
    assert not upward, "imports from a layer to one below it:\n" + "\n".join(sorted(upward))


def test_the_layer_check_sees_function_level_imports(tmp_path: Path) -> None:
    """A lazy import counts (the check would otherwise miss the arrows that used to run back up)."""
    probe = tmp_path / "vlexport" / "contracts" / "probe.py"
    probe.parent.mkdir(parents=True)
    probe.write_text("def f():\n    from vlexport.pipeline import run_export\n")
    assert "vlexport.pipeline" in _imports("vlexport.contracts.probe", probe)
    guarded = tmp_path / "guarded.py"
    guarded.write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from vlexport.pipeline import x\n"
    )
    assert _imports("vlexport.contracts.guarded", guarded) == set()


def _registered_modules() -> list[str]:
    return sorted({*backend_registry.BUILTIN.values(), *pass_registry.pass_modules()})


@pytest.mark.parametrize("module", _registered_modules())
def test_registered_modules_are_backends_below_the_contracts(module: str) -> None:
    """Every backend and pass module the registries name sits in the backends layer and never reaches the
    orchestrator, the bench or the CLI (they call it, not the other way round)."""
    assert module in MODULES, f"registry names {module}, which does not exist"
    assert LAYERS[layer_of(module)][0] == "backends"
    for above in ("vlexport.pipeline", "vlexport.bench", "vlexport.cli"):
        assert _reaches(module, above) is None, f"{module} reaches {above}"


def test_runtime_never_imports_validation_or_export_backends() -> None:
    for name, imported in GRAPH.items():
        if name.startswith("vlexport.runtime"):
            assert not {
                m
                for m in imported
                if m.startswith(("vlexport.validate", "vlexport.export", "vlexport.quantize"))
            }, name


def test_family_modules_are_the_only_place_that_names_a_family() -> None:
    # Code outside models/ and presets/ keys nothing on a family name or model type (new families touch their
    # module only). The names come from the family registry, so a new family is covered at once.
    families = set(family_names())
    names = families | {t for f in families for t in get_family(f).model_types}
    assert {"blip", "blip-2", "bridgetower"} <= names  # the registry is what it should be
    offenders = []
    for name, path in MODULES.items():
        if name.startswith(("vlexport.models", "vlexport.presets")):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names:
                offenders.append(f"{name}: {node.value!r}")
    assert not offenders, offenders
