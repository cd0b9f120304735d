"""The CLI as a user meets it: exit codes, one-paragraph errors, nothing half-written."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vlexport.cli import main


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_list_json(capsys) -> None:
    code, out, _ = _run(capsys, "list", "--json")
    assert code == 0
    presets = {p["preset"]: p for p in json.loads(out)["presets"]}
    assert presets["bridgetower-base"]["tasks"] == {"features": "BridgeTowerModel"}
    assert presets["bridgetower-base"]["tiny"] == "bridgetower-tiny"
    assert presets["blip-itm-base-coco"]["tasks"]["itm"] == "BlipForImageTextRetrieval"


def test_list_reads_the_backend_registry_and_precision_configs(capsys) -> None:
    from vlexport.contracts.backends import backend_names
    from vlexport.contracts.precision import PRECISIONS

    code, out, _ = _run(capsys, "list", "--json")
    assert code == 0
    data = json.loads(out)
    backends = {b["name"]: b for b in data["backends"]}
    assert list(backends) == list(backend_names()) and "trt" not in backends
    assert backends["tensorrt"]["derived_from"] == "onnx"
    assert backends["tensorrt"]["precisions"] == ["fp32", "fp16", "int8-static"]
    # all but fp32: precision passes (quantize/)
    assert backends["onnx"]["precisions"] == [
        "fp32",
        "fp16",
        "int8-dynamic",
        "int8-static",
        "int8-weight",
        "int4-weight",
    ]
    assert list(data["precisions"]) == list(PRECISIONS)
    assert data["precisions"]["fp32"]["tolerance"] == {"atol": 1e-4, "rtol": 1e-4}


def test_help_advertises_only_verbs_that_exist(capsys) -> None:
    from vlexport.cli import COMMANDS, build_parser

    verbs = {c.name for c in COMMANDS}
    for argv in (["--help"], *([v, "--help"] for v in sorted(verbs))):
        with pytest.raises(SystemExit):
            build_parser().parse_args(argv)
        text = " ".join(capsys.readouterr().out.split())
        mentioned = set(re.findall(r"`vlexport ([a-z][a-z-]*)", text))
        assert not mentioned - verbs, argv  # every `vlexport VERB` the help names exists


def test_list_table(capsys) -> None:
    code, out, _ = _run(capsys, "list")
    assert code == 0 and "bridgetower-large-itm-mlm-itc" in out and "blip2-flan-t5-tiny" in out


@pytest.mark.parametrize(
    ("argv", "code", "message"),
    [
        (["onnx", "bridgetower-bse", "--random-weights"], 2, "Did you mean 'bridgetower-base'"),
        (["onnx", "altclip-tiny", "--random-weights", "--task", "mlm"], 2, "Supported tasks: features"),
        (["onnx", "bridgetower-tiny", "--random-weights", "--kernels", "flash"], 2, "Unknown kernel"),
        (["validate", "/nonexistent/artifact"], 2, "is not a directory"),
        # Checked before any work (the exporter silently falls back to 18 below 17: LayerNormalization).
        (["onnx", "bridgetower-tiny", "--random-weights", "--opset", "7"], 2, "at ONNX opsets 17.."),
        (["onnx", "bridgetower-tiny", "--random-weights", "--opset", "99"], 2, "at ONNX opsets 17.."),
    ],
)
def test_usage_errors(capsys, argv, code: int, message: str) -> None:
    rc, _, err = _run(capsys, *argv)
    assert rc == code
    assert message in " ".join(err.split())
    assert "Traceback" not in err


def test_no_weights_exit_2(capsys, monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rc, _, err = _run(capsys, "onnx", "bridgetower-base", "-o", str(tmp_path / "o"))
    assert rc == 2 and "--random-weights" in err
    assert not (tmp_path / "o").exists()


def test_existing_output_needs_force(capsys, tmp_path: Path) -> None:
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    rc, _, err = _run(capsys, "onnx", "altclip-tiny", "--random-weights", "-o", str(out))
    assert rc == 2 and "--force" in err
    assert (out / "keep.txt").read_text() == "mine"


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_output(capsys, tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    rc, _, err = _run(capsys, "onnx", "altclip-tiny", "--random-weights", "-o", str(ro / "o"))
    assert rc == 2 and "not writable" in err


def test_unwritable_output_under_a_file(capsys, tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")
    rc, _, err = _run(capsys, "onnx", "altclip-tiny", "--random-weights", "-o", str(tmp_path / "afile" / "o"))
    assert rc == 2 and "is a file, not a directory" in err


def test_export_then_validate(capsys, tmp_path: Path) -> None:
    out = tmp_path / "vt"
    rc, stdout, _ = _run(capsys, "onnx", "vision-text-dual-encoder-tiny", "--random-weights", "-o", str(out))
    assert rc == 0 and "validation passed" in stdout
    rc, stdout, _ = _run(capsys, "validate", str(out))
    assert rc == 0 and "validation passed" in stdout
    # A damaged artifact is a failed check (exit 1), named clearly.
    (out / "model.onnx").write_bytes((out / "model.onnx").read_bytes()[:1000])
    rc, _, err = _run(capsys, "validate", str(out))
    assert rc == 1 and "truncated" in err


def test_ctrl_c_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "o"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "vlexport.cli",
            "onnx",
            "bridgetower-tiny",
            "--random-weights",
            "-o",
            str(out),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while time.time() < deadline and not list(tmp_path.glob(".o.*.partial")):
        time.sleep(0.05)
    assert list(tmp_path.glob(".o.*.partial")), "export never started staging"
    time.sleep(0.5)  # inside torch.onnx.export
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    # 130 exactly: never -2 (CPython re-raising SIGINT on itself at exit; the CLI exits with os._exit instead)
    assert proc.returncode == 130, err
    assert "interrupted (SIGINT): nothing was written (partial output removed)." in err.splitlines(), err
    assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # no partial, no lock file


def test_an_unanticipated_library_error_is_one_paragraph(capsys, monkeypatch) -> None:
    # onnx's checker raises its own ValidationError (no ValueError), ONNX Runtime RuntimeErrors: the CLI
    # still answers with one paragraph and exit 1, and VLEXPORT_DEBUG=1 gives the traceback
    import vlexport.display

    class CheckerError(Exception):
        pass

    def broken() -> None:
        raise CheckerError("Data of TensorProto should be stored in x.data, but it is a symbolic link")

    monkeypatch.setattr(vlexport.display, "listing", broken)
    code, out, err = _run(capsys, "list")
    text = " ".join((out + err).split())
    assert code == 1 and "Traceback" not in out + err
    assert "error: CheckerError: Data of TensorProto" in text and "VLEXPORT_DEBUG=1" in text
    monkeypatch.setenv("VLEXPORT_DEBUG", "1")
    with pytest.raises(CheckerError):
        main(["list"])


def test_a_torch_error_is_reported_without_its_cpp_backtrace(capsys, monkeypatch) -> None:
    # what an AOTI package that Inductor miscompiled raises when it runs (torch 2.13, CPU max-autotune)
    import vlexport.display

    said = (
        "Error: aoti_torch_cpu_bmm_out(buf20, ...) API call failed at model.wrapper.cpp, line 2697\n"
        "Expected size for first two dimensions of batch2 tensor to be: [4, 32] but got: [8, 32].\n"
        "Exception raised from common_checks_baddbmm_bmm at LinearAlgebra.cpp:301 (most recent call first):\n"
        + "".join(f"frame #{i}: <unknown function> + 0x3d2825 (0x7f in libtorch_cpu.so)\n" for i in range(40))
    )

    def broken() -> None:
        raise RuntimeError(said)

    monkeypatch.setattr(vlexport.display, "listing", broken)
    code, out, err = _run(capsys, "list")
    text = " ".join((out + err).split())
    assert code == 1 and "frame #" not in text and "Exception raised from" not in text
    assert "API call failed at model.wrapper.cpp, line 2697 Expected size for first two dimensions" in text
