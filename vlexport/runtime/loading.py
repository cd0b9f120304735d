"""How a component comes to be in memory: loaded on first use (``LazyComponent``, for one-shot runs) and
checked against its manifest entry when it loads (``check_component``). Torch-free: Triton's python models
carry it (serve/embedded.py)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from vlexport.errors import CheckError

if TYPE_CHECKING:
    from vlexport.contracts.manifest import Manifest

ComponentFn = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


class LazyComponent:
    """A component that loads on first use (a call or an attribute such as ``input_names``) and can be
    released: the memory of a graph that has done its part (BLIP-2's vision tower once the prompt is
    encoded) goes back before the next one loads. A released component loads again if used again."""

    def __init__(self, load: Callable[[], ComponentFn]):
        self._load = load
        self._loaded: ComponentFn | None = None
        self._lock = threading.Lock()  # two first calls from two threads load it once

    @property
    def loaded(self) -> bool:
        return self._loaded is not None

    def _get(self) -> ComponentFn:
        loaded = self._loaded
        if loaded is None:
            with self._lock:
                if self._loaded is None:
                    self._loaded = self._load()
                loaded = self._loaded
        return loaded

    def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self._get()(inputs)

    def __getattr__(self, name: str) -> object:  # only for what this class lacks: the loaded callable's
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._get(), name)

    def release(self) -> None:
        self._loaded = None


def check_component(directory: Path, name: str, manifest: Manifest, loaded: object) -> None:
    """A loaded graph must declare the inputs / outputs its manifest entry records (swapped files fail here,
    not at a feed deep in a run). Callables that do not list their names (compiled packages) pass."""
    if not hasattr(loaded, "input_names"):
        return
    comp = manifest.components[name]
    recorded_in = {t.name for t in comp.inputs}
    recorded_out = [t.name for t in comp.outputs]
    got_in, got_out = set(loaded.input_names), list(loaded.output_names)
    if not got_in <= recorded_in or got_out != recorded_out:
        raise CheckError(
            f"{directory}: component {name!r} ({comp.file}) declares inputs {sorted(got_in)} and outputs "
            f"{got_out}, but the manifest records {sorted(recorded_in)} and {recorded_out}: the manifest "
            "does not match its files. Export the artifact again."
        )
