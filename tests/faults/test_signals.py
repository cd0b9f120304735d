"""Signals during a write: SIGINT / SIGTERM / SIGHUP leave nothing behind (or, under --force, the previous
artifact byte for byte), exit 130 / 143 / 129 with one line and no traceback; what SIGKILL leaves, the next
run cleans."""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from vlexport import cli
from vlexport.artifact import check_output_dir, describe_partial, lock_path, output_scope, staged_dir
from vlexport.cli import main
from vlexport.errors import Interrupted, interrupts_as_exceptions

PRESET = "altclip-tiny"  # the fastest export (~7 s alone)
CODES = {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGHUP: 129}


def _start(out: Path, *extra: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """The child as a terminal starts it. A suite run under `nohup` (or as a background job, which ignores
    SIGINT) would hand it SIG_IGN, which vlexport keeps on purpose, and the signal would do nothing: a
    handler of ours here instead, which exec resets to the default in the child."""
    sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    ours = {sig: signal.signal(sig, lambda *_: None) for sig in sigs}
    try:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "vlexport.cli",
                "onnx",
                PRESET,
                "--random-weights",
                "-o",
                str(out),
                *extra,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
    finally:
        for sig, previous in ours.items():
            signal.signal(sig, previous)


def _partials(parent: Path, name: str = "o") -> list[Path]:
    return list(parent.glob(f".{name}.*.partial"))


def _wait_for(
    proc: subprocess.Popen[str], ready: Callable[[], bool], what: str, timeout: float = 300
) -> None:
    """Poll the filesystem (no fixed sleeps: the time to each point depends on the load)."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            pytest.fail(
                f"the export ended (rc {proc.returncode}) before {what}: {proc.stderr.read()[-2000:]}"
            )
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.01)


POINTS: dict[str, Callable[[Path], bool]] = {
    "staging": lambda d: bool(_partials(d)),
    # a component file exists, the process is still writing (config, manifest) or about to validate
    "component": lambda d: any(list(p.glob("*.onnx")) for p in _partials(d)),
    # _validate writes the manifest into the partial first, then loads the artifact and compares it with eager
    "validation": lambda d: any((p / "manifest.json").is_file() for p in _partials(d)),
}


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()
    }


def _assert_interrupted(proc: subprocess.Popen[str], sig: int) -> None:
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == CODES[sig], err
    name = signal.Signals(sig).name
    lines = [line for line in err.splitlines() if "interrupted" in line]
    assert lines == [f"interrupted ({name}): nothing was written (partial output removed)."], err
    assert "Traceback" not in err


def _id(value: object) -> str:
    return value.name if isinstance(value, signal.Signals) else str(value)


@pytest.mark.parametrize(
    ("sig", "point"),
    [
        # every signal at staging in a real process with --full; each signal's handler in-process below,
        # always
        (signal.SIGINT, "staging"),
        pytest.param(signal.SIGTERM, "staging", marks=pytest.mark.exhaustive),
        pytest.param(signal.SIGHUP, "staging", marks=pytest.mark.exhaustive),
        (signal.SIGTERM, "component"),
        (signal.SIGTERM, "validation"),
    ],
    ids=_id,
)
def test_signal_leaves_nothing(tmp_path: Path, sig: int, point: str) -> None:
    out = tmp_path / "o"
    proc = _start(out)
    _wait_for(proc, lambda: POINTS[point](tmp_path), point)
    proc.send_signal(sig)
    _assert_interrupted(proc, sig)
    assert list(tmp_path.iterdir()) == []  # no artifact, no .partial, no .o.lock


# CPython's `python -m` kills itself with SIGINT at exit (returncode -2, whatever sys.exit said) when the last
# C-level PyRun_* call it made ended in a KeyboardInterrupt, even one caught later: the old flake of this test
# and of test_cli.py::test_ctrl_c_leaves_nothing. An atexit hook (they run before that check) makes it certain
# here.
SET_CPYTHON_SIGINT_FLAG = """
import atexit, ctypes

def _flag():
    run = ctypes.pythonapi.PyRun_String
    run.restype = ctypes.py_object
    run.argtypes = [ctypes.c_char_p, ctypes.c_int, ctypes.py_object, ctypes.py_object]
    try:
        run(b"raise KeyboardInterrupt", 257, {}, {})  # 257: Py_file_input
    except KeyboardInterrupt:
        pass

atexit.register(_flag)
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=_id)
def test_exit_code_survives_cpythons_sigint_at_exit(tmp_path: Path, sig: int) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SET_CPYTHON_SIGINT_FLAG)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(site), *filter(None, [os.environ.get("PYTHONPATH")])]),
    }
    proc = _start(tmp_path / "o", env=env)
    _wait_for(proc, lambda: POINTS["staging"](tmp_path), "staging")
    proc.send_signal(sig)
    _assert_interrupted(proc, sig)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["site"]


@pytest.mark.parametrize(
    ("sig", "point"), [(signal.SIGTERM, "validation"), (signal.SIGHUP, "component")], ids=_id
)
def test_signal_under_force_keeps_the_previous_artifact(
    exported, tmp_path: Path, sig: int, point: str
) -> None:
    out = tmp_path / "o"
    shutil.copytree(exported(PRESET, "features"), out)
    before = _snapshot(out)
    proc = _start(out, "--force")
    _wait_for(proc, lambda: POINTS[point](tmp_path), point)
    proc.send_signal(sig)
    _assert_interrupted(proc, sig)
    assert list(tmp_path.iterdir()) == [out]
    assert _snapshot(out) == before


def test_sigkill_leftovers_are_named_and_cleaned_by_the_next_run(tmp_path: Path, capsys) -> None:
    out = tmp_path / "o"
    proc = _start(out)
    _wait_for(proc, lambda: POINTS["component"](tmp_path), "a component file")
    proc.kill()  # SIGKILL: no handler runs
    proc.communicate(timeout=60)
    [partial] = _partials(tmp_path)
    assert lock_path(out).exists()  # the file stays; its flock died with the process
    note = describe_partial(partial)
    assert (
        note
        and "not an artifact" in note
        and str(out) in note
        and f"pid {proc.pid}" in note
        and "gone" in note
    )

    assert main(["onnx", PRESET, "--random-weights", "-o", str(out)]) == 0, capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]  # stale partial and lock file gone
    assert (out / "manifest.json").is_file() and not _partials(tmp_path)


def test_stale_set_aside_artifact_comes_back(tmp_path: Path) -> None:
    """Killed between its two renames, a --force run leaves the previous artifact in `.o.<pid>-<host>.old`."""
    out = tmp_path / "o"
    old = tmp_path / f".o.{2**22 + 7}-{os.uname().nodename}.old"  # a pid above Linux's default pid_max
    old.mkdir()
    (old / "manifest.json").write_text("{}")
    with output_scope(), pytest.raises(Exception, match="already exists"):
        check_output_dir(out, force=False)
    assert (out / "manifest.json").read_text() == "{}" and not old.exists()


# ---------------------------------------------------------------- in-process: the signal -> exception
# machinery
@pytest.fixture
def default_handlers():
    """The handlers a fresh process has (pytest or a plugin may have set others); restored afterwards."""
    saved = {s: signal.getsignal(s) for s in CODES}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


def _ours(sig: int) -> bool:
    return signal.getsignal(sig) not in (signal.SIG_DFL, signal.SIG_IGN, signal.default_int_handler)


@pytest.mark.parametrize("sig", list(CODES), ids=_id)
def test_staged_dir_turns_a_signal_into_cleanup(default_handlers, tmp_path: Path, sig: int) -> None:
    out = tmp_path / "o"
    with pytest.raises(Interrupted) as caught, staged_dir(out) as tmp:
        (tmp / "model.onnx").write_bytes(b"half")
        assert _ours(sig)  # else raise_signal would kill this test process
        signal.raise_signal(sig)
    assert (
        caught.value.signum == sig and caught.value.exit_code == CODES[sig] and caught.value.committed is None
    )
    assert isinstance(caught.value, KeyboardInterrupt)
    assert list(tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # restored


@pytest.mark.parametrize("make", ["staged_dir", "scratch_dir"])
def test_a_signal_right_after_the_staging_dir_appears_removes_it(
    default_handlers, tmp_path: Path, monkeypatch, make: str
) -> None:
    """The real-process SIGINT test once left a partial under load: the signal landed between mkdtemp and the
    code that cleans up. Deterministic here: the signal is raised inside mkdtemp, right after the dir exists.
    """
    from vlexport.artifact import staging as artifact

    real_mkdtemp = artifact.tempfile.mkdtemp

    def mkdtemp_then_signal(*args, **kwargs) -> str:
        made = real_mkdtemp(*args, **kwargs)
        assert _ours(signal.SIGINT)
        signal.raise_signal(signal.SIGINT)
        return made

    monkeypatch.setattr(artifact.tempfile, "mkdtemp", mkdtemp_then_signal)
    context = staged_dir(tmp_path / "o") if make == "staged_dir" else _scratch_in_scope(tmp_path / "o")
    with pytest.raises(Interrupted), context:
        pytest.fail("the body must not run: the signal arrived before it")
    assert list(tmp_path.iterdir()) == []


@contextlib.contextmanager
def _scratch_in_scope(out: Path) -> Iterator[Path]:
    from vlexport.artifact import scratch_dir

    with output_scope(), scratch_dir(out) as scratch:
        yield scratch


def test_a_signal_during_the_commit_waits_for_both_renames(
    default_handlers, tmp_path: Path, monkeypatch
) -> None:
    out = tmp_path / "o"
    out.mkdir()
    (out / "v").write_text("old")
    real_rename = Path.rename

    def rename_then_signal(self: Path, target: Path) -> Path:
        done = real_rename(self, target)
        if self == out:  # between moving the old artifact aside and moving the new one in
            assert _ours(signal.SIGTERM)
            signal.raise_signal(signal.SIGTERM)
        return done

    monkeypatch.setattr(Path, "rename", rename_then_signal)
    with pytest.raises(Interrupted) as caught, staged_dir(out, force=True) as tmp:
        (tmp / "v").write_text("new")
    assert caught.value.committed == out  # the CLI then says it was written, not "nothing was written"
    assert (out / "v").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["o"]


def test_a_report_is_written_whole_or_not_at_all(default_handlers, tmp_path: Path, monkeypatch) -> None:
    """bench --json / --markdown / --plot and validate --json go through atomic_write_*: SIGTERM mid-write
    keeps the previous report and leaves no temp file."""
    import os

    from vlexport.artifact import staging as artifact

    report = tmp_path / "bench.json"
    report.write_text("previous")

    def chmod_then_signal(path: str, mode: int) -> None:  # between writing the temp file and renaming it
        assert _ours(signal.SIGTERM)
        signal.raise_signal(signal.SIGTERM)

    monkeypatch.setattr(os, "chmod", chmod_then_signal)
    with pytest.raises(Interrupted):
        artifact.atomic_write_text(report, "new rows")
    assert report.read_text() == "previous" and sorted(p.name for p in tmp_path.iterdir()) == ["bench.json"]


def test_dual_encoder_sigterm_mid_save(default_handlers, tmp_path: Path, monkeypatch, capsys) -> None:
    from transformers import BertConfig, BertModel, VisionTextDualEncoderModel, ViTConfig, ViTModel

    common = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 37}
    ViTModel(ViTConfig(image_size=32, patch_size=8, **common)).save_pretrained(tmp_path / "vit")
    BertModel(BertConfig(vocab_size=200, max_position_embeddings=32, **common)).save_pretrained(
        tmp_path / "bert"
    )
    real_save = VisionTextDualEncoderModel.save_pretrained

    def save_then_signal(self: VisionTextDualEncoderModel, directory: Path, **kwargs: object) -> None:
        real_save(self, directory, **kwargs)
        assert _ours(signal.SIGTERM)
        signal.raise_signal(signal.SIGTERM)

    monkeypatch.setattr(VisionTextDualEncoderModel, "save_pretrained", save_then_signal)
    assert (
        main(["dual-encoder", str(tmp_path / "vit"), str(tmp_path / "bert"), "-o", str(tmp_path / "o")])
        == 143
    )
    assert "interrupted (SIGTERM): nothing was written" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bert", "vit"]


def test_guards_nest_restore_and_leave_ignored_signals_alone(default_handlers) -> None:
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # nohup
    with interrupts_as_exceptions():
        inner = signal.getsignal(signal.SIGTERM)
        assert _ours(signal.SIGTERM) and signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
        with interrupts_as_exceptions():
            assert signal.getsignal(signal.SIGTERM) is inner
        assert signal.getsignal(signal.SIGTERM) is inner
        errors: list[BaseException] = []
        worker = threading.Thread(target=lambda: _in_thread(errors))
        worker.start()
        worker.join()
        assert not errors
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def _in_thread(errors: list[BaseException]) -> None:
    try:
        with interrupts_as_exceptions():  # signal.signal would raise ValueError outside the main thread
            pass
    except BaseException as e:  # noqa: BLE001 - reported to the main thread
        errors.append(e)


def test_cli_message_for_a_signal_after_the_commit(
    default_handlers, tmp_path: Path, monkeypatch, capsys
) -> None:
    def export_then_signal(args: argparse.Namespace) -> int:
        with staged_dir(tmp_path / "o") as tmp:
            (tmp / "f").write_text("x")
        assert _ours(signal.SIGHUP)
        signal.raise_signal(signal.SIGHUP)  # after the rename, inside the command
        return 0

    class Parser:
        def parse_args(self, argv: list[str]) -> argparse.Namespace:
            return argparse.Namespace(func=export_then_signal)

    monkeypatch.setattr(cli, "build_parser", Parser)
    assert main(["anything"]) == 129
    lines = [line for line in capsys.readouterr().err.splitlines() if "interrupted" in line]
    assert lines == [f"interrupted (SIGHUP): {tmp_path / 'o'} had been written."]


def test_a_signal_during_a_finalizer_is_not_lost() -> None:
    # CPython drops an exception raised inside __del__; CI once sent SIGINT while a regex object was being
    # collected, and the export went on to the end as if nothing had come
    class Finalized:
        def __del__(self) -> None:
            signal.raise_signal(signal.SIGINT)  # the handler runs here, inside the finalizer

    caught = None
    with interrupts_as_exceptions():
        try:
            Finalized()  # collected at once: its __del__ takes the signal
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                time.sleep(0.01)
        except Interrupted as e:
            caught = e
    assert caught is not None and caught.signum == signal.SIGINT
