"""Load an artifact directory as callables, whatever backend wrote it (the backend registry loads each
file)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vlexport.contracts.backends import LoadOptions, get_backend
from vlexport.contracts.manifest import Manifest
from vlexport.errors import CheckError, UsageError
from vlexport.models import TaskSpec, get_family
from vlexport.models.host import DECODER
from vlexport.runtime.loading import ComponentFn, LazyComponent, check_component

# Files a backend loads as native code (a compiled package's shared library, a TensorRT engine): loaded only
# after their content hash matched the manifest's, always: a changed byte there is a crash or silent wrong
# code.
NATIVE_SUFFIXES = (".pt2", ".plan", ".engine")


@dataclass
class Artifact:
    directory: Path
    manifest: Manifest
    task_spec: TaskSpec
    components: dict[str, ComponentFn]

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run a single-component artifact (encoders); generative artifacts go through runtime.generate."""
        if len(self.components) != 1:
            raise CheckError(
                f"{self.directory} has components {sorted(self.components)}; use the generation runtime."
            )
        return next(iter(self.components.values()))(inputs)


def check_device(device: str) -> None:
    """``--device cuda`` on a machine without a usable GPU is a usage error up front (exit 2), never a silent
    run on the CPU nor a failure after minutes of eager references."""
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UsageError(
                "--device cuda was given, but no CUDA GPU is usable here (torch.cuda.is_available() is "
                "False). Use --device cpu (or auto), or run on a machine with a GPU."
            )


def check_int8_weights(directory: Path, manifest: Manifest, device: str) -> None:
    """Refuse 8-bit int8-dynamic / int8-static weights on a CPU whose u8 x s8 multiply saturates them
    (cpu.py): ONNX Runtime would run them and answer wrong (tiny BridgeTower ITM: cosine 0.974 where 7-bit
    weights keep 0.9996)."""
    if device == "cuda" or (manifest.precision_knobs or {}).get("reduce_range") is not False:
        return
    from vlexport.cpu import exact_int8_dot

    if exact_int8_dot():
        return
    raise CheckError(
        f"{directory} holds int8 weights with all 8 bits (built with --no-reduce-range, or on a CPU with "
        "VNNI / AMX, which multiplies them exactly), but this CPU has no VNNI or AMX: ONNX Runtime's int8 "
        "MatMuls here add u8 x s8 products in saturating 16-bit registers, and its outputs would be wrong. "
        f"Build the variant for this machine: `vlexport quantize PARENT -o OUT --precision "
        f"{manifest.precision} --reduce-range` (or `--recipe {directory}/manifest.json --reduce-range`)."
    )


def load_artifact(
    directory: str | Path,
    *,
    manifest: Manifest | None = None,
    device: str = "auto",
    threads: int | None = None,
    interleaved: bool = False,
    verify: str = "native",
    lazy: bool = False,
) -> Artifact:
    """Every component of an artifact as a callable, loaded by the backend the manifest names.

    ``interleaved``: the caller alternates the artifact with other work on the same cores (the benchmark).
    ``verify``: ``native`` (default) checks the content hash of native-code files (.pt2, .plan) before loading
    them, ``full`` of every file, ``none`` nothing (the caller has just checked them). ONNX files are parsed
    and checked by ONNX Runtime, which runs only the operators it knows, so hashing GBs of them at every start
    is left to `validate`, `triton` and `run --verify`.
    ``lazy``: each component loads on first use and may be released after (``LazyComponent``): a one-shot
    generation (`vlexport run`) then never holds its encoders and its decoder at once.
    """
    check_device(device)
    directory = Path(directory)
    manifest = manifest or Manifest.read(directory)
    check_int8_weights(directory, manifest, device)
    if verify != "none":
        manifest.verify_hashes(directory, suffixes=None if verify == "full" else NATIVE_SUFFIXES)
    task_spec = get_family(manifest.family).task(manifest.task)
    try:
        backend = get_backend(manifest.backend)
    except UsageError:
        raise CheckError(
            f"{directory}: backend {manifest.backend!r} cannot be loaded by this vlexport version "
            "(`vlexport list` shows the backends it has)."
        ) from None

    def loader(name: str) -> Callable[[], ComponentFn]:
        def load() -> ComponentFn:
            comp = manifest.components[name]
            options = LoadOptions(device, threads, interleaved, task_spec.generative and name == DECODER)
            loaded = backend.load(directory / comp.file, options)
            check_component(directory, name, manifest, loaded)
            return loaded

        return load

    components: dict[str, ComponentFn] = {
        name: LazyComponent(loader(name)) if lazy else loader(name)() for name in manifest.components
    }
    return Artifact(directory, manifest, task_spec, components)
