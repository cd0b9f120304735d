"""The layering docs/ARCHITECTURE.md describes, checked on the source: no import cycles, backends never
import the orchestrator, the runtime never imports validation, files stay small."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "vlexport"
MAX_LINES = 400


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(name: str, path: Path) -> set[str]:
    """Every vlexport module ``name`` imports, at module level or inside functions (a lazy import is still a
    dependency: it only moves the cycle from import time to call time)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
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


@pytest.mark.parametrize("backend", ["vlexport.export.onnx", "vlexport.export.onnx_optimized",
                                     "vlexport.export.compile", "vlexport.export.tensorrt"])
def test_backends_never_import_the_orchestrator(backend: str) -> None:
    assert _reaches(backend, "vlexport.pipeline") is None


def test_runtime_never_imports_validation_or_export_backends() -> None:
    for name, imported in GRAPH.items():
        if name.startswith("vlexport.runtime"):
            assert not {m for m in imported if m.startswith("vlexport.validate")}, name
            backends = {m for m in imported if m.startswith("vlexport.export.") and m != "vlexport.export.backend"}
            assert not backends, name


def test_family_modules_are_the_only_place_that_names_a_family() -> None:
    # Code outside models/ and presets/ keys nothing on a family name (new families touch their module only).
    families = ("bridgetower", "blip2", "altclip", "vision-text-dual-encoder", "blip-2")
    offenders = []
    for name, path in MODULES.items():
        if name.startswith(("vlexport.models", "vlexport.presets")):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in families:
                offenders.append(f"{name}: {node.value!r}")
    assert not offenders, offenders


def test_no_file_over_the_limit() -> None:
    big = {name: n for name, p in MODULES.items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not big, f"modules over {MAX_LINES} lines: {big}"
