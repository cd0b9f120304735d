"""`vlexport compile`: an AOTInductor package that validates against eager, loads by itself, and benches.

One AOT compile of the tiny model takes ~40-60 s on 2 cores (C++ compile of the wrapper and kernels),
so the package is built once per run (the shared ``exported`` fixture), whichever worker needs it first.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from vlexport.bench import BenchPlan, run_bench
from vlexport.cli import main
from vlexport.errors import UsageError
from vlexport.export.aoti import inductor_configs
from vlexport.models.inputs import InputShape
from vlexport.runtime import load_artifact
from vlexport.weights import load_model, resolve

# The tests of one package on one worker (--dist loadgroup): the others would wait, idle, on its compile lock.
ONE_WORKER = pytest.mark.xdist_group("aoti-bridgetower-itm")


@pytest.fixture
def package(exported) -> Path:
    # what `vlexport compile ... --task itm` builds
    return exported("bridgetower-tiny", "itm", backend="aoti")


@ONE_WORKER
def test_compile_manifest_and_validation(package: Path) -> None:
    manifest = json.loads((package / "manifest.json").read_text())
    assert manifest["backend"] == "aoti" and manifest["precision"] == "fp32" and manifest["opset"] is None
    v = manifest["validation"]
    assert v["passed"] is True and len(v["shapes"]) >= 3
    assert 0 < v["max_abs_error"]["logits"] <= 1e-4
    comp = manifest["components"]["model"]
    assert comp["file"] == "model.pt2" and (package / "model.pt2").stat().st_size == comp["size_bytes"]
    shapes = {t["name"]: t["shape"] for t in comp["inputs"]}
    # The ONNX spec's dynamic axes, under the same names.
    assert shapes == {
        "input_ids": ["batch", "sequence"],
        "attention_mask": ["batch", "sequence"],
        "pixel_values": ["batch", 3, 64, 64],
        "pixel_mask": ["batch", 64, 64],
    }
    assert comp["outputs"] == [{"name": "logits", "dtype": "float32", "shape": ["batch", 2]}]
    assert manifest["timings"]["export"] > 0


@ONE_WORKER
def test_package_runs_alone_at_new_shapes(package: Path) -> None:
    artifact = load_artifact(package, device="cpu")
    model = load_model(resolve("bridgetower-tiny", random_weights=True), "itm")
    (spec,) = artifact.task_spec.components(model.config)
    reference = spec.build(model).eval()
    for shape in (InputShape(1, 3), InputShape(5, 29)):  # batch 1 and a batch/sequence never seen
        inputs = artifact.task_spec.make_inputs(model.config, shape, 7)
        got = artifact.run({k: v.numpy() for k, v in inputs.items()})["logits"]
        with torch.no_grad():
            (ref,) = reference(*(inputs[n] for n in spec.inputs))
        assert got.shape == (shape.batch, 2)
        np.testing.assert_allclose(got, ref.numpy(), atol=1e-4, rtol=1e-4)
    assert main(["validate", str(package)]) == 0  # the loader is registered for `validate` too


@ONE_WORKER
def test_bench_measures_the_package(package: Path) -> None:
    rows = run_bench(BenchPlan((str(package),), batch_sizes=(2,), warmup=1, iters=3))
    assert [(r.backend, r.batch) for r in rows] == [("eager", 2), ("aoti", 2)]
    aoti = rows[1]
    assert aoti.ok and 0 < aoti.parity["logits"]["max_abs"] <= 1e-4 and aoti.speedup_vs_eager > 0
    assert aoti.build_s > 1  # the recorded compile time, not the load time


def test_compile_usage_errors(tmp_path: Path, capsys) -> None:
    with pytest.raises(UsageError, match="mode"):
        inductor_configs("fastest")
    cuda = inductor_configs("max-autotune", "cuda")
    assert cuda["max_autotune"] is True and "freezing" not in cuda
    # CPU GEMM templates need the weights as constants: without freezing max-autotune changes no matmul
    assert inductor_configs("max-autotune", "cpu")["freezing"] is True
    if not torch.cuda.is_available():
        code = main(
            ["compile", "bridgetower-tiny", "--random-weights", "--device", "cuda", "-o", str(tmp_path / "x")]
        )
        assert code == 2 and "CUDA" in capsys.readouterr().err
        assert not (tmp_path / "x").exists()  # nothing half-written


def test_dual_encoder_compiles_with_its_position_limit(tmp_path: Path) -> None:
    """torch.export guards the text axis at max_position_embeddings (a learned position table): the
    component declares that bound instead of failing with "Constraints violated (sequence)"."""
    out = tmp_path / "vtde"
    assert main(["compile", "vision-text-dual-encoder-tiny", "--random-weights", "-o", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["validation"]["passed"] is True
    assert max(manifest["validation"]["max_abs_error"].values()) <= 1e-4


def test_with_axis_limits_bounds_token_axes_only() -> None:
    from vlexport.models.base import with_axis_limits

    source = resolve("blip-tiny", random_weights=True)
    (spec,) = source.family.task("itm").components(source.config)
    bounded = with_axis_limits(spec, source.config)
    limit = source.config.text_config.max_position_embeddings
    assert bounded.axis_max == {"sequence": limit} and spec.axis_max == {}
    t5 = resolve("blip2-flan-t5-tiny", random_weights=True)
    decoder = t5.family.task("generate").components(t5.config)[-1]
    assert with_axis_limits(decoder, t5.config).axis_max == {}  # relative positions: no table, no bound


def test_compile_errors_name_the_cause_not_the_compiler(monkeypatch) -> None:
    from vlexport.export import aoti

    err = RuntimeError(
        'Constraints violated (sequence)! For more information, run with TORCH_LOGS="+dynamic".\n'
        "  - Not all values of sequence satisfy the generated guard sequence <= 64\n"
        "Suggested fixes:\n  sequence = Dim('sequence', max=64)\n"
    )
    text = aoti.explain_compile_error(err)
    assert "guard sequence <= 64" in text and "Dim('sequence', max=64)" in text and "compiler" not in text
    monkeypatch.setenv("CXX", "no-such-compiler-here")
    assert "needs no-such-compiler-here on the PATH" in aoti.explain_compile_error(err)
