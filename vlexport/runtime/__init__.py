"""Load an artifact directory as callables, whatever backend wrote it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
import numpy as np

from vlexport.errors import CheckError
from vlexport.manifest import Manifest
from vlexport.models import TaskSpec, get_family

ComponentFn = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


@dataclass
class Artifact:
    directory: Path
    manifest: Manifest
    task_spec: TaskSpec
    components: dict[str, ComponentFn]

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run a single-component artifact (encoders); generative artifacts go through runtime.generate."""
        if len(self.components) != 1:
            raise CheckError(f"{self.directory} has components {sorted(self.components)}; use the generation runtime.")
        return next(iter(self.components.values()))(inputs)


def load_artifact(directory: str | Path, *, manifest: Manifest | None = None, device: str = "auto",
                  threads: int | None = None) -> Artifact:
    directory = Path(directory)
    manifest = manifest or Manifest.read(directory)
    task_spec = get_family(manifest.family).task(manifest.task)
    loaders: dict[str, Callable[..., ComponentFn]] = {"onnx": _onnx_loader}
    if manifest.backend not in loaders:
        from vlexport.runtime import backends

        loaders.update(backends.LOADERS)
    if manifest.backend not in loaders:
        raise CheckError(f"{directory}: backend {manifest.backend!r} cannot be loaded by this vlexport version.")
    load = loaders[manifest.backend]
    components = {name: load(directory / comp.file, device=device, threads=threads)
                  for name, comp in manifest.components.items()}
    return Artifact(directory, manifest, task_spec, components)


def _onnx_loader(path: Path, *, device: str, threads: int | None) -> ComponentFn:
    from vlexport.runtime.onnx_session import OnnxComponent, available_providers

    return OnnxComponent(path, providers=available_providers(device), threads=threads)

