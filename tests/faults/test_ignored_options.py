"""Options that would do nothing are usage errors (exit 2) before any work, not silently ignored: `triton
--ensemble` on a generative artifact, `bench --backends / --precision` when every MODEL is an artifact."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.faults.cli_helpers import cli


def test_triton_ensemble_on_a_generative_artifact(exported, tmp_path: Path, capsys) -> None:
    rc, err = cli(
        capsys,
        "triton",
        exported("blip-tiny", "caption"),
        "-o",
        tmp_path / "repo",
        "--name",
        "cap",
        "--ensemble",
    )
    assert rc == 2 and "is a generative artifact: its model `cap` already takes image bytes" in err, err
    assert "Drop --ensemble" in err and not (tmp_path / "repo").exists()


@pytest.mark.parametrize(
    ("options", "named"),
    [
        (["--backends", "eager,aoti"], "--backends eager,aoti would be ignored"),
        (["--precision", "fp16"], "--precision fp16 would be ignored"),
    ],
)
def test_bench_variant_options_given_only_artifacts(
    exported, capsys, monkeypatch, options: list[str], named: str
) -> None:
    from vlexport.bench import harness

    monkeypatch.setattr(harness, "build_variant", lambda *a, **k: 1 / 0)  # refused before anything runs
    monkeypatch.setattr(harness, "given_artifact_variant", lambda *a, **k: 1 / 0)
    rc, err = cli(
        capsys, "bench", exported("altclip-tiny", "features"), *options, "--iters", 1, "--warmup", 0
    )
    assert rc == 2 and named in err and "(onnx fp32)" in err, err


def test_compile_reduce_overhead_on_cpu(tmp_path: Path, capsys, monkeypatch) -> None:
    import vlexport.pipeline

    monkeypatch.setattr(vlexport.pipeline, "load_model", lambda *a, **k: 1 / 0)  # refused before loading
    rc, err = cli(
        capsys,
        "compile",
        "blip-tiny",
        "--task",
        "caption",
        "--random-weights",
        "-o",
        tmp_path / "pkg",
        "--mode",
        "reduce-overhead",
    )
    assert rc == 2 and "--mode reduce-overhead captures the decode step in CUDA graphs" in err, err
    assert not (tmp_path / "pkg").exists()
