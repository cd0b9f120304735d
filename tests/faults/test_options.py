"""Fault injection on options: every bad value fails up front (exit 2, one paragraph naming the option and its
valid range), and report paths that cannot be written fail before the benchmark or validation runs."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from cli_helpers import cli

from vlexport.cli import main

SEED = "0..2**32-1 (4294967295)"
HUGE = "99999999999999999999"


@pytest.fixture
def no_model_loads(monkeypatch) -> None:
    """Loading a model fails the test: these checks must come before any minutes of work."""

    def boom(*a: Any, **k: Any) -> None:
        raise AssertionError("a model was loaded before the bad option was refused")

    import vlexport.pipeline

    monkeypatch.setattr("vlexport.weights.load_model", boom)
    monkeypatch.setattr(vlexport.pipeline, "load_model", boom)


BENCH = ["bench", "bridgetower-tiny", "--random-weights", "--backends", "eager"]
RUN = ["run", "/nonexistent/artifact", "--image", "/nonexistent/i.png"]
REGRESS = ["regress", "/nonexistent/a.json", "/nonexistent/b.json"]
BAD_VALUES = [
    # (argv, option, the valid range the message must state)
    (["onnx", "bridgetower-tiny", "--random-weights", "--seed", HUGE], "--seed", SEED),
    (["onnx", "bridgetower-tiny", "--random-weights", "--seed", "-1"], "--seed", SEED),
    (["compile", "bridgetower-tiny", "--random-weights", "--seed", str(2**32)], "--seed", SEED),
    (["tensorrt", "bridgetower-tiny", "--random-weights", "--seed", "1e3"], "--seed", SEED),
    ([*BENCH, "--seed", HUGE], "--seed", SEED),
    (["dual-encoder", "v", "t", "-o", "o", "--seed", "-5"], "--seed", SEED),
    (["dual-encoder", "v", "t", "-o", "o", "--projection-dim", "0"], "--projection-dim", "1..65536"),
    ([*BENCH, "--batch-sizes", "0"], "--batch-sizes", "1..4096"),
    ([*BENCH, "--batch-sizes", "1,5000"], "--batch-sizes", "1..4096"),
    ([*BENCH, "--batch-sizes", ","], "--batch-sizes", "1..4096"),
    ([*BENCH, "--batch-sizes", "1,a"], "--batch-sizes", "1..4096"),
    ([*BENCH, "--iters", "0"], "--iters", "1..1000000"),
    ([*BENCH, "--iters", HUGE], "--iters", "1..1000000"),
    ([*BENCH, "--warmup", "-1"], "--warmup", "0..100000"),
    ([*BENCH, "--seq-len", "0"], "--seq-len", "1..65536"),
    ([*BENCH, "--new-tokens", "0"], "--new-tokens", "1..65536"),
    ([*BENCH, "--threads", "0"], "--threads", "1..1024"),
    ([*BENCH, "--threads", HUGE], "--threads", "1..1024"),
    ([*BENCH, "--compile-mode", "fastest"], "--compile-mode", "'default', 'reduce-overhead', 'max-autotune'"),
    ([*RUN, "--max-new-tokens", "0"], "--max-new-tokens", "1..65536"),
    ([*RUN, "--num-beams", "0"], "--num-beams", "1..256"),
    ([*RUN, "--num-beams", "100000"], "--num-beams", "1..256"),
    (
        [*REGRESS, "--max-slowdown", "nan"],
        "--max-slowdown",
        "finite fraction >= 0",
    ),  # nan: every check passes
    ([*REGRESS, "--max-slowdown", "inf"], "--max-slowdown", "finite fraction >= 0"),
    ([*REGRESS, "--max-slowdown", "-0.1"], "--max-slowdown", "finite fraction >= 0"),
    ([*REGRESS, "--max-slowdown", "ten"], "--max-slowdown", "finite fraction >= 0"),
    ([*REGRESS, "--absolute", "--abs-max-slowdown", "nan"], "--abs-max-slowdown", "finite fraction >= 0"),
]


@pytest.mark.parametrize(
    ("argv", "option", "valid"),
    BAD_VALUES,
    ids=[f"{argv[0]} {option} {argv[-1]}" for argv, option, _ in BAD_VALUES],
)
def test_bad_option_value(argv: list[str], option: str, valid: str, capsys, no_model_loads) -> None:
    start = time.perf_counter()
    code, err = cli(capsys, *argv)
    assert code == 2 and option in err and valid in err, err
    assert time.perf_counter() - start < 10  # parsed and refused, nothing loaded or exported


# ---------------------------------------------------------------- report paths, checked before the work
def _impossible(tmp_path: Path, kind: str) -> Path:
    if kind == "a directory":
        (tmp_path / "reports").mkdir()
        return tmp_path / "reports"
    if kind == "under a regular file":
        (tmp_path / "afile").write_text("x")
        return tmp_path / "afile" / "sub" / "r.out"
    ro = tmp_path / "ro"  # "an unwritable directory"
    ro.mkdir(mode=0o500)
    return ro / "r.out"


REPORT_CASES = [
    ("--json", "a directory", "is a directory"),
    ("--json", "under a regular file", "is a file, not a directory"),
    ("--json", "an unwritable directory", "is not writable"),
    ("--markdown", "a directory", "is a directory"),
    ("--markdown", "under a regular file", "is a file, not a directory"),
    ("--plot", "a directory", "is a directory"),
    ("--plot", "an unwritable directory", "is not writable"),
]


@pytest.mark.parametrize(("option", "kind", "message"), REPORT_CASES)
def test_bench_report_path_refused_before_any_work(
    option: str, kind: str, message: str, tmp_path: Path, capsys, monkeypatch, no_model_loads
) -> None:
    path = _impossible(tmp_path, kind)
    if kind == "an unwritable directory" and os.geteuid() == 0:
        # root may write anywhere: os.access says so; make it answer as for an ordinary user
        real = os.access
        monkeypatch.setattr(
            os, "access", lambda p, mode, **kw: Path(p) != path.parent and real(p, mode, **kw)
        )
    before = sorted(tmp_path.rglob("*"))
    start = time.perf_counter()
    code, err = cli(capsys, *BENCH, option, path)
    assert code == 2 and option in err and str(path) in err and message in err, err
    assert time.perf_counter() - start < 10
    assert sorted(tmp_path.rglob("*")) == before  # the check created nothing


def test_validate_json_refused_before_validation(exported, tmp_path: Path, capsys, monkeypatch) -> None:
    artifact = exported("bridgetower-tiny", "itm")  # read only: validation must not even start
    monkeypatch.setattr("vlexport.validate.validate_directory", lambda *a, **k: pytest.fail("validation ran"))
    code, err = cli(capsys, "validate", artifact, "--json", _impossible(tmp_path, "a directory"))
    assert code == 2 and "--json" in err and "is a directory" in err, err


def test_two_reports_on_one_file(tmp_path: Path, capsys, no_model_loads) -> None:
    code, err = cli(capsys, *BENCH, "--json", tmp_path / "r", "--markdown", tmp_path / "r")
    assert code == 2 and "--json and --markdown both name" in err and not (tmp_path / "r").exists()


def test_plot_without_matplotlib_refused_before_any_work(
    tmp_path: Path, capsys, monkeypatch, no_model_loads
) -> None:
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    code, err = cli(capsys, *BENCH, "--plot", tmp_path / "p.png")
    assert code == 2 and "--plot needs matplotlib" in err


def test_work_dir_that_is_a_file(tmp_path: Path, capsys, no_model_loads) -> None:
    (tmp_path / "w").write_text("x")
    code, err = cli(capsys, *BENCH, "--work-dir", tmp_path / "w")
    assert code == 2 and "--work-dir" in err and "is not a directory" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["bridgetower-tiny", "--suite", "ci-cpu"],
            "MODEL arguments or --suite, not both",
        ),  # MODEL was ignored
        (
            ["bridgetower-tiny", "--suite-file", "benchmarks/suites.toml"],
            "also give --suite NAME",
        ),  # so was this
    ],
)
def test_suite_options_that_would_be_ignored(argv: list[str], message: str, capsys, no_model_loads) -> None:
    code, err = cli(capsys, "bench", *argv)
    assert code == 2 and message in err


def test_dual_encoder_output_refused_before_the_encoders_load(tmp_path: Path, capsys, monkeypatch) -> None:
    import torch
    from transformers import BertConfig, BertModel, VisionTextDualEncoderModel, ViTConfig, ViTModel

    torch.manual_seed(0)
    common = {"hidden_size": 16, "num_attention_heads": 2, "intermediate_size": 32, "num_hidden_layers": 1}
    ViTModel(ViTConfig(image_size=16, patch_size=8, **common)).save_pretrained(tmp_path / "vit")
    BertModel(BertConfig(vocab_size=100, max_position_embeddings=16, **common)).save_pretrained(
        tmp_path / "bert"
    )
    monkeypatch.setattr(
        VisionTextDualEncoderModel,
        "from_vision_text_pretrained",
        classmethod(lambda *a, **k: pytest.fail("the encoders were loaded first")),
    )
    (tmp_path / "afile").write_text("x")
    code, err = cli(
        capsys, "dual-encoder", tmp_path / "vit", tmp_path / "bert", "-o", tmp_path / "afile" / "o"
    )
    assert code == 2 and "is a file, not a directory" in err


def test_regress_that_compared_nothing_says_how_to_pass(tmp_path: Path, capsys) -> None:
    from vlexport.bench.rows import BenchRow, write_rows

    eager = [BenchRow(model="m", task="t", backend="eager", precision="fp32", latency_p50_ms=1.0)]
    write_rows(tmp_path / "a.json", eager)  # eager rows only: no speed-up to compare
    code, err = cli(capsys, "regress", tmp_path / "a.json", tmp_path / "a.json")
    assert code == 1 and "Nothing was compared" in err and "--allow-empty" in err
    assert main(["regress", str(tmp_path / "a.json"), str(tmp_path / "a.json"), "--allow-empty"]) == 0


def test_valid_report_paths_are_written_whole(tmp_path: Path, capsys) -> None:
    """The control: paths that do not exist yet pass the checks, and every report is written, nothing else."""
    out = tmp_path / "new" / "dir"
    argv = [
        *BENCH,
        "--batch-sizes",
        "1",
        "--iters",
        "1",
        "--warmup",
        "0",
        "--seq-len",
        "8",
        "--json",
        out / "r.json",
        "--markdown",
        out / "r.md",
        "--plot",
        out / "r.png",
    ]
    assert main([str(a) for a in argv]) == 0, capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["r.json", "r.md", "r.png"]  # no partial files left
    assert (out / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "| eager |" in (
        out / "r.md"
    ).read_text()
