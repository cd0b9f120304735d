"""A backend registered through the registry alone is exported, validated, loaded and benchmarked.

The throwaway backend ``onnx-noopt`` is ONNX Runtime with every graph optimization off: derived from
``onnx`` (its files are the parent's, copied), loaded with ``GraphOptimizationLevel.ORT_DISABLE_ALL``.
Nothing else is patched: if the orchestrator, validation, the runtime or the benchmark had a per-backend
branch, this backend would miss it.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from vlexport.bench import BenchPlan, run_bench
from vlexport.contracts.backends import (
    LOAD_DEFAULTS,
    BackendBase,
    DeriveContext,
    Derived,
    ExportJob,
    LoadOptions,
    backend_names,
    get_backend,
    register_backend,
    unregister_backend,
)
from vlexport.display import listing
from vlexport.errors import UsageError
from vlexport.pipeline import run_export
from vlexport.runtime import load_artifact
from vlexport.validate import validate_directory

NAME = "onnx-noopt"


class NoOptSession:
    """One ONNX graph on ONNX Runtime without graph optimizations: named numpy arrays in and out."""

    def __init__(self, path: Path, *, threads: int | None, interleaved: bool):
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        if threads:
            opts.intra_op_num_threads = threads
        if interleaved:
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.options = opts
        self.session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def __call__(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        feed = {n: np.ascontiguousarray(inputs[n]) for n in self.input_names}
        return dict(zip(self.output_names, self.session.run(None, feed)))


class OnnxNoOptBackend(BackendBase):
    name = NAME
    suffix = ".onnx"
    parent = "onnx"
    description = "ONNX graphs on ONNX Runtime with graph optimizations disabled (test-only)"
    precisions = ("fp32",)  # declared by the backend: the precision configs name only the built-ins

    def __init__(self) -> None:
        self.derived = 0

    def derive(self, ctx: DeriveContext) -> Derived:
        self.derived += 1
        for comp in ctx.parent.components.values():
            for rel in filter(None, (comp.file, comp.external_data)):
                shutil.copy2(ctx.parent_dir / rel, ctx.out_dir / rel)
        return Derived(dict(ctx.parent.components))

    def load(self, path: Path, options: LoadOptions = LOAD_DEFAULTS) -> Any:
        return NoOptSession(path, threads=options.threads, interleaved=options.interleaved)


@pytest.fixture
def noopt() -> Iterator[OnnxNoOptBackend]:
    """The backend, registered for one test and removed afterwards, whatever the test did."""
    backend = register_backend(OnnxNoOptBackend())
    try:
        yield backend
    finally:
        unregister_backend(NAME)


def test_registered_backend_runs_everywhere(noopt: OnnxNoOptBackend, exported, tmp_path: Path) -> None:
    assert get_backend(NAME) is noopt and NAME in backend_names()
    listed = {b["name"]: b for b in listing()["backends"]}  # `vlexport list` reads the registry
    assert listed[NAME]["precisions"] == ["fp32"] and listed[NAME]["derived_from"] == "onnx"
    out = tmp_path / "noopt"
    # derived from an ONNX artifact (from a model: the bench below)
    parent = exported("bridgetower-tiny", "itm")
    manifest = run_export(ExportJob(str(parent), out, backend=NAME))
    assert noopt.derived == 1
    assert manifest.backend == NAME and manifest.derived_from == {
        "backend": "onnx",
        "precision": "fp32",
        "path": str(parent.resolve()),
    }
    assert manifest.validation.passed is True
    assert 0 < manifest.validation.max_abs_error["logits"] < 1e-4

    report = validate_directory(out)  # from the directory alone: the manifest names the backend
    assert report.passed is True and 0 < report.max_abs_error["logits"] < 1e-4

    artifact = load_artifact(out, device="cpu", threads=1)
    (component,) = artifact.components.values()
    assert isinstance(component, NoOptSession)
    assert component.options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_DISABLE_ALL

    # The bench builds what the plan names from the model; its ONNX parent is already in the work dir
    # (same weights, task, precision: reused), so the derive step runs through the registry there too.
    shutil.copytree(parent, tmp_path / "work" / "bridgetower-tiny-itm-onnx")
    rows = run_bench(
        BenchPlan(
            ("bridgetower-tiny",),
            backends=("eager", NAME),
            task="itm",
            random_weights=True,
            batch_sizes=(2,),
            warmup=0,
            iters=2,
            device="cpu",
            threads=1,
            work_dir=tmp_path / "work",
        )
    )
    assert noopt.derived == 2
    assert [(r.backend, r.batch) for r in rows] == [("eager", 2), (NAME, 2)]
    row = rows[1]
    assert row.ok and row.precision == "fp32" and row.latency_p50_ms > 0 and row.build_s > 0
    assert 0 < row.parity["logits"]["max_abs"] < 1e-4
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == [
        "bridgetower-tiny-itm-onnx",
        f"bridgetower-tiny-itm-{NAME}",
    ]


def test_an_unregistered_backend_is_gone() -> None:
    """The fixture's cleanup ran (whatever the order): the name is unknown again everywhere."""
    assert NAME not in backend_names()
    with pytest.raises(UsageError, match="Unknown backend"):
        get_backend(NAME)
