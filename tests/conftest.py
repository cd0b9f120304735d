"""Shared fixtures: seeded RNGs, and tiny-preset artifacts exported once per session."""

from __future__ import annotations

import fcntl
import os
import random
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

# pytest-xdist workers share the machine's cores: one intra-op thread each, so that two workers on two
# cores do not oversubscribe them; alone, two threads. Fixed either way, so numerics do not follow the load.
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))

# triton decides at decoration time (when it and vlexport_kernels are imported) whether kernels run in its
# CPU interpreter: import both under TRITON_INTERPRET=1 here, before any test module can import them,
# whatever order the directories are collected in (tests/kernels/conftest.py explains the two moments).
_saved_interpret = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"
try:
    import vlexport_kernels  # noqa: F401
finally:
    if _saved_interpret is None:
        del os.environ["TRITON_INTERPRET"]
    else:
        os.environ["TRITON_INTERPRET"] = _saved_interpret
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1) // WORKERS))
_LOCK = (
    Path(tempfile.gettempdir()) / f"vlexport-tests-{os.environ.get('PYTEST_XDIST_TESTRUNUID', 'solo')}.lock"
)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    """Tests marked ``timing`` (speed ratios judged against a baseline) run with the other workers idle.

    Every test holds a shared lock on one file for its whole protocol (fixture setup included), a timing
    test an exclusive one: it waits for the running tests to end, and the others wait for it.
    """
    if WORKERS == 1:
        yield
        return
    with _LOCK.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX if item.get_closest_marker("timing") else fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@pytest.fixture(autouse=True)
def _seed_everything() -> None:
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def exported(tmp_path_factory: pytest.TempPathFactory):
    """``exported(preset, task, **job_kwargs) -> Path``: export once per test run, reuse across tests.

    Under pytest-xdist the artifacts live in the run's shared temp root, one lock per artifact: the first
    worker that needs one exports it, the others wait and reuse it. Tests copy an artifact before
    changing it.
    """
    import hashlib

    from vlexport.pipeline import ExportJob, run_export

    root = tmp_path_factory.getbasetemp()
    root = (root.parent if WORKERS > 1 else root) / "shared-artifacts"
    root.mkdir(exist_ok=True)

    def get(preset: str, task: str, **kwargs) -> Path:
        key = repr((preset, task, sorted(kwargs.items())))
        out = root / f"{preset}-{task}-{hashlib.sha1(key.encode()).hexdigest()[:8]}"
        with (root / f"{out.name}.lock").open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (out / "manifest.json").is_file():
                run_export(ExportJob(preset, out, task=task, random_weights=True, force=True, **kwargs))
        return out

    return get


# The longest tests (seconds on 2 cores) start first, so that no worker is left running one alone at the end.
SLOW_FIRST = (
    "test_full_size.py",
    "test_compile_generation.py",
    "test_compile.py",
    "test_backend_registry.py",
    "test_kernels_export.py",
)


# The default run (CI's) holds one case of every mechanism per family; ``--full`` adds the rest of the
# matrices (marked ``exhaustive``: preset x task, signal x point). Same assertions, more cases.


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--full",
        action="store_true",
        default=os.environ.get("VLEXPORT_FULL_TESTS") == "1",
        help="also run the rest of the exhaustive test matrices (VLEXPORT_FULL_TESTS=1 does the same)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not config.getoption("--full"):
        extra = [item for item in items if item.get_closest_marker("exhaustive")]
        if extra:
            config.hook.pytest_deselected(items=extra)
            items[:] = [item for item in items if not item.get_closest_marker("exhaustive")]
    if WORKERS > 1:
        rank = {name: i for i, name in enumerate(SLOW_FIRST)}
        items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FIRST)))
