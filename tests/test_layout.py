"""Nothing in the repository root may shadow an installed distribution.

`python -m pytest`, `python -m vlexport.cli` or any script started from the root puts the root first on
sys.path, so a root folder with an ``__init__.py`` (or a root ``*.py`` module) named like an installed
distribution's top-level import replaces that distribution for every library that imports it. It happened:
transformers 5.25 imports Hugging Face's ``kernels`` package at start-up, and this repository's ``kernels/``
was a regular package. Folders without ``__init__.py`` (``kernels/``, ``benchmarks/``, ``tests/``,
``scripts/``) are at most namespace portions, which lose to any regular package of the same name; the second
test checks that the interpreter really resolves every clashing name outside the repository.
"""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _root_entries() -> dict[str, Path]:
    """Top-level names Python could import from the root: folders and ``*.py`` modules."""
    entries = {}
    for path in ROOT.iterdir():
        if path.is_dir() and path.name.isidentifier():
            entries[path.name] = path
        elif path.is_file() and path.suffix == ".py" and path.stem.isidentifier():
            entries[path.stem] = path
    return entries


def _regular_imports(entries: dict[str, Path]) -> dict[str, Path]:
    """The entries that are regular packages or modules: these win over anything later on sys.path."""
    return {
        name: path
        for name, path in entries.items()
        if path.suffix == ".py" or (path / "__init__.py").is_file()
    }


def test_no_root_package_or_module_has_an_installed_distributions_name() -> None:
    installed = importlib.metadata.packages_distributions()  # {top-level import: [distribution, ...]}
    ours = set(_regular_imports(_root_entries())) - {"vlexport"}  # our own package is the one installed
    clashes = {name: installed[name] for name in ours if name in installed}
    assert not clashes, (
        f"root packages/modules shadow installed distributions when run from the root: {clashes}; "
        "move them into a source folder without __init__.py (see kernels/vlexport_kernels)"
    )


def test_clashing_names_resolve_outside_the_repository() -> None:
    """A root folder that shares an installed distribution's name must not be what `import NAME` finds when
    the root is first on sys.path (as with `python -m pytest` from the root)."""
    installed = importlib.metadata.packages_distributions()
    names = sorted(n for n in _root_entries() if n in installed and n != "vlexport")
    script = (
        "import importlib.util, json, sys\n"
        "found = {}\n"
        "for name in sys.argv[1:]:\n"
        "    spec = importlib.util.find_spec(name)\n"
        "    found[name] = [spec.origin] + list(spec.submodule_search_locations or [])\n"
        "print(json.dumps(found))\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", script, *names],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    found = json.loads(run.stdout)
    inside = {
        name: places
        for name, places in found.items()
        if any(p and Path(p).resolve().is_relative_to(ROOT) for p in places)
    }
    assert not inside, f"these imports resolve into the repository, not the installed distribution: {inside}"


def test_vlexport_kernels_is_the_source_folder_package() -> None:
    """The kernels package is built from kernels/vlexport_kernels (pyproject's package-dir), and the folder
    above it is not a package."""
    import vlexport_kernels

    assert not (ROOT / "kernels" / "__init__.py").exists()
    here = Path(vlexport_kernels.__file__).resolve().parent
    if here.is_relative_to(ROOT):  # an editable install or a PYTHONPATH checkout, not a wheel
        assert here == ROOT / "kernels" / "vlexport_kernels"
