"""The serving runtime `vlexport triton` writes into a repository: vlexport's own torch-free modules, copied.

A python model of a repository imports only numpy, pillow, tokenizers and (``--backend python-onnxruntime``)
onnxruntime: its ``model.py`` puts the copy of the modules below (beside it, under ``vlexport/``) first on
``sys.path``, so the server's Python needs no torch, no transformers and no installed vlexport, only
``REPO/requirements.txt``. The copies are the files `vlexport run` itself runs (one copy of the logic,
versioned with the repository); tests/triton/test_repository.py imports each of them with torch and
transformers blocked.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import vlexport

SOURCE = Path(vlexport.__file__).resolve().parent
# vlexport modules a served python model may import (directly or through each other); the host-side
# modules of every family (models/host/*.py) are added by ``serving_modules``.
_MODULES = (
    "vlexport",
    "vlexport.errors",
    "vlexport.cpu",
    "vlexport.userdata",
    "vlexport.contracts.manifest",
    "vlexport.artifact",
    "vlexport.artifact.locks",
    "vlexport.artifact.staging",
    "vlexport.artifact.output_paths",
    "vlexport.contracts",
    "vlexport.contracts.precision",
    "vlexport.models.scores",
    "vlexport.runtime.batching",
    "vlexport.runtime.decode",
    "vlexport.runtime.decoder_session",
    "vlexport.runtime.generate",
    "vlexport.runtime.loading",
    "vlexport.runtime.preprocess",
    "vlexport.runtime.tokenizer",
    "vlexport.runtime.onnx_session",
    "vlexport.serve",
    "vlexport.serve.py_common",
    "vlexport.serve.py_component",
    "vlexport.serve.py_generate",
    "vlexport.serve.py_preprocess",
    "vlexport.serve.py_postprocess",
)
# packages whose own __init__ imports torch: the copy gets an empty marker instead
_MARKERS = ("vlexport.models", "vlexport.runtime")

# requirement name -> (the line REPO/requirements.txt holds, the module a python model imports); the lines
# are serve/requirements.txt's, which scripts/tritonserver_env.sh installs as they are
_IMPORTS = {"numpy": "numpy", "pillow": "PIL", "tokenizers": "tokenizers", "onnxruntime": "onnxruntime"}


def _requirements() -> dict[str, tuple[str, str]]:
    lines = [
        line.strip()
        for line in (SOURCE / "serve" / "requirements.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    out = {re.split(r"[<>=!~ ]", line)[0]: line for line in lines}
    reqs = {name: (line, _IMPORTS[name]) for name, line in out.items()}
    reqs["onnxruntime-gpu"] = (out["onnxruntime"].replace("onnxruntime", "onnxruntime-gpu", 1), "onnxruntime")
    return reqs


REQUIREMENTS = _requirements()
# what each python model imports, besides the copied modules
NEEDS = {
    "vlexport.serve.py_component": ("numpy", "onnxruntime"),
    "vlexport.serve.py_preprocess": ("numpy", "pillow", "tokenizers"),
    "vlexport.serve.py_postprocess": ("numpy",),
    # onnxruntime: its ONNX decoder runs in the model (a TensorRT decoder stays a Triton model: not needed)
    "vlexport.serve.py_generate": ("numpy", "pillow", "tokenizers", "onnxruntime"),
}


def serving_modules() -> tuple[str, ...]:
    host = sorted(
        f"vlexport.models.host.{p.stem}"
        for p in (SOURCE / "models" / "host").glob("*.py")
        if p.stem != "__init__"
    )
    return (*_MODULES, "vlexport.models.host", *host)


def _path(module: str) -> Path:
    rel = Path(*module.split(".")[1:])
    package = SOURCE / rel / "__init__.py"
    return package if package.is_file() else SOURCE / rel.with_suffix(".py")


def runtime_texts() -> dict[str, str]:
    """Path inside a python model's version folder -> contents: the copied modules and package markers."""
    out = {str(_path(m).relative_to(SOURCE.parent)): _path(m).read_text() for m in serving_modules()}
    for marker in _MARKERS:
        out[str(Path(*marker.split("."), "__init__.py"))] = (
            f'"""{marker} as copied into a Triton repository: only the torch-free modules beside this '
            'file."""\n'
        )
    return out


def packages(module: str, kind: str, needs: Sequence[str] | None = None) -> tuple[str, ...]:
    """What a python model of ``module`` imports (``needs`` where the plan knows better: a generation model
    imports onnxruntime only when it runs an ONNX decoder itself), onnxruntime-gpu on ``--kind gpu``."""
    needs = NEEDS[module] if needs is None else needs
    return tuple("onnxruntime-gpu" if p == "onnxruntime" and kind == "gpu" else p for p in needs)


def shim(module: str, needs: Sequence[str]) -> str:
    imports = tuple(dict.fromkeys(REQUIREMENTS[p][1] for p in needs))
    return f'''"""Written by `vlexport triton` {vlexport.__version__}: the code is the copy of vlexport's
serving runtime beside this file (vlexport/, {module}); the server's Python needs only
REPO/requirements.txt."""

import importlib
import os
import sys

# this copy first, before any installed vlexport
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
for _module in {imports!r}:
    try:
        importlib.import_module(_module)
    except ImportError as _e:
        raise ImportError(f"this model needs the Python package that provides {{_module!r}}, which the "
                          f"server's Python lacks ({{_e}}): pip install -r requirements.txt (in the model "
                          "repository) into it") from None

from {module} import TritonPythonModel  # noqa: E402,F401
'''


def requirements_text(needed: Iterable[str], existing: str = "") -> str:
    """REPO/requirements.txt: what every python model of the repository imports (an extended repository keeps
    the lines it had)."""
    lines = {
        re.split(r"[<>=!~ ]", line.strip())[0]: line.strip()
        for line in existing.splitlines()
        if line.strip() and not line.startswith("#")
    }
    lines.update({p: REQUIREMENTS[p][0] for p in needed})
    head = "# What the python models of this Triton repository import (written by `vlexport triton`).\n"
    return head + "".join(f"{lines[k]}\n" for k in sorted(lines))
