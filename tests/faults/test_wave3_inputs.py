"""Bad input on the newer verbs, third wave: the wrong device, values beyond what a consumer reads, text that
is not UTF-8, a block size ONNX Runtime does not run. Each is a usage error (exit 2), one paragraph, before
work."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.faults.cli_helpers import cli

FEATURES = ("altclip-tiny", "features")
ITM = ("bridgetower-tiny", "itm")


@pytest.fixture
def image(tmp_path: Path) -> Path:
    from PIL import Image

    Image.new("RGB", (32, 32), (10, 200, 30)).save(tmp_path / "x.png")
    return tmp_path / "x.png"


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks a machine without a GPU")
@pytest.mark.parametrize("verb", ["run", "validate"])
def test_device_cuda_without_a_gpu_is_a_usage_error_up_front(
    exported, image: Path, capsys, monkeypatch, verb: str
) -> None:
    import vlexport.weights

    loads: list[str] = []
    monkeypatch.setattr(vlexport.weights, "load_model", lambda *a, **k: loads.append("eager") or 1 / 0)
    extra = ["--image", image, "--text", "a cat"] if verb == "run" else []
    rc, err = cli(capsys, verb, exported(*FEATURES), *extra, "--device", "cuda")
    assert rc == 2 and "--device cuda was given, but no CUDA GPU is usable here" in err, err
    assert loads == []  # refused before the eager references were computed


@pytest.mark.parametrize(
    ("option", "value", "limit"),
    [
        ("--max-batch-size", "10000000000", "2147483647"),
        ("--instances", "3000000000", "2147483647"),
        ("--version", str(2**64), "9223372036854775807"),
        ("--max-queue-delay-us", str(2**70), "9223372036854775807"),
    ],
)
def test_triton_values_beyond_what_triton_reads(
    exported, tmp_path: Path, capsys, option: str, value: str, limit: str
) -> None:
    rc, err = cli(capsys, "triton", exported(*ITM), "-o", tmp_path / "repo", option, value)
    assert rc == 2 and f"{option} {value} is beyond what Triton reads there (at most {limit})" in err, err
    assert not (tmp_path / "repo").exists()


def test_block_size_beyond_onnx_runtimes_kernels(exported, tmp_path: Path, capsys) -> None:
    rc, err = cli(
        capsys,
        "quantize",
        exported(*FEATURES),
        "-o",
        tmp_path / "q",
        "--precision",
        "int8-weight",
        "--block-size",
        512,
    )
    assert rc == 2 and "block_size must be a power of two from 16 to 256" in err and "512" in err, err
    assert not (tmp_path / "q").exists()


def test_non_utf8_text_is_a_usage_error(exported, image: Path, capsys) -> None:
    text = os.fsdecode(b"a caf\xe9 photo")  # what Python makes of a Latin-1 argv on a UTF-8 system
    rc, err = cli(capsys, "run", exported(*ITM), "--image", image, "--text", text)
    assert rc == 2 and "is not valid UTF-8 text" in err and "caf\\xe9" in err, err


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--max-batch", 4, "--max-batch 4 < 12 decoder rows (batch x beams)"),
        ("--max-length", 16, "--max-length 16 <"),
    ],
)
def test_compile_limits_validation_cannot_meet_are_refused_before_loading(
    tmp_path: Path, capsys, monkeypatch, option: str, value: int, message: str
) -> None:
    import vlexport.pipeline

    # no model loads, nothing compiles
    monkeypatch.setattr(vlexport.pipeline, "load_model", lambda *a, **k: 1 / 0)
    rc, err = cli(
        capsys,
        "compile",
        "blip-tiny",
        "--task",
        "caption",
        "--random-weights",
        option,
        value,
        "-o",
        tmp_path / "pkg",
    )
    assert rc == 2 and message in err and "Nothing was compiled" in err and "--no-validate" in err, err
    assert not (tmp_path / "pkg").exists()


def test_quantize_fp32_is_not_a_variant(exported, tmp_path: Path, capsys) -> None:
    rc, err = cli(capsys, "quantize", exported(*FEATURES), "-o", tmp_path / "q", "--precision", "fp32")
    assert rc == 2 and "--precision fp32 is what `quantize` starts from, not a variant" in err, err
    assert "safetensors" not in err and not (tmp_path / "q").exists()


def test_quantize_of_a_compiled_package_names_the_way_that_works(exported, tmp_path: Path, capsys) -> None:
    import json
    import shutil

    pkg = tmp_path / "pkg"
    shutil.copytree(exported(*FEATURES), pkg)
    m = json.loads((pkg / "manifest.json").read_text())
    m["backend"] = "aoti"  # the manifest is all `quantize` reads before it refuses
    (pkg / "manifest.json").write_text(json.dumps(m))
    rc, err = cli(capsys, "quantize", pkg, "-o", tmp_path / "q", "--precision", "fp16")
    assert (
        rc == 2
        and "has no fp16 pass for aoti artifacts" in err
        and "`vlexport compile MODEL --precision fp16`" in err
        and "safetensors" not in err
    ), err


def test_a_report_path_where_no_file_can_be_made_is_refused_before_work(exported, capsys) -> None:
    rc, err = cli(capsys, "validate", exported(*FEATURES), "--json", "/proc/vlexport-report.json")
    assert (
        rc == 2 and "Cannot write --json /proc/vlexport-report.json: files cannot be created in /proc" in err
    ), err
