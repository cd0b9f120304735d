"""Shared fixtures: seeded RNGs, and tiny-preset artifacts exported once per session."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

# Two cores: keep intra-op threads fixed so timings and numerics do not depend on the machine's load.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed_everything() -> None:
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def exported(tmp_path_factory: pytest.TempPathFactory):
    """``exported(preset, task, **job_kwargs) -> Path``: export once per session, reuse across tests."""
    from vlexport.pipeline import ExportJob, run_export

    cache: dict[tuple, Path] = {}

    def get(preset: str, task: str, **kwargs) -> Path:
        key = (preset, task, tuple(sorted(kwargs.items())))
        if key not in cache:
            out = tmp_path_factory.mktemp("artifacts") / f"{preset}-{task}"
            run_export(ExportJob(preset, out, task=task, random_weights=True, **kwargs))
            cache[key] = out
        return cache[key]

    return get
