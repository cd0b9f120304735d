"""Two writers, one target: the second fails at once naming the first (with or without --force), the first's
artifact is whole and validates; lock files never outlive their writer's directory, stale ones are reused."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from vlexport.artifact import check_output_dir, lock_path, output_scope, staged_dir
from vlexport.cli import main
from vlexport.errors import UsageError

PRESET = "altclip-tiny"


def _start(out: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "vlexport.cli", "onnx", PRESET, "--random-weights", "-o", str(out), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for_staging(proc: subprocess.Popen[str], parent: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not list(parent.glob(".o.*.partial")):
        if proc.poll() is not None:
            pytest.fail(
                f"the first export ended (rc {proc.returncode}) before staging: {proc.stderr.read()[-2000:]}"
            )
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("timed out waiting for the first export to stage")
        time.sleep(0.01)


def _race(tmp_path: Path, *extra: str) -> tuple[subprocess.Popen[str], str, str]:
    """A starts and holds the lock (stopped mid-export so that it certainly still does), then B starts."""
    out = tmp_path / "o"
    first = _start(out, *extra)
    try:
        _wait_for_staging(first, tmp_path)
        first.send_signal(signal.SIGSTOP)
        second = _start(out, *extra)
        second_out, second_err = second.communicate(timeout=300)
        assert second.returncode == 2, second_err
    finally:
        first.send_signal(signal.SIGCONT)
    _, first_err = first.communicate(timeout=300)
    assert first.returncode == 0, first_err
    return first, second_err, second_out


def _assert_valid(out: Path, capsys) -> None:
    assert main(["validate", str(out)]) == 0
    assert "validation passed" in capsys.readouterr().out


def test_second_writer_fails_at_once_and_the_first_wins(tmp_path: Path, capsys) -> None:
    first, err, _ = _race(tmp_path)
    message = " ".join(err.split())
    assert f"Another vlexport process (pid {first.pid} on " in message, err
    assert f"is writing {tmp_path / 'o'}; wait for it or choose another -o" in message
    assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]  # no partial, no lock file
    _assert_valid(tmp_path / "o", capsys)


def test_force_does_not_wait_for_or_replace_a_running_writer(exported, tmp_path: Path, capsys) -> None:
    """--force replaces a finished artifact, never one another process is writing: the second fails at
    once."""
    shutil.copytree(exported(PRESET, "features"), tmp_path / "o")
    previous = (tmp_path / "o" / "manifest.json").read_text()
    first, err, _ = _race(tmp_path, "--force")
    assert f"(pid {first.pid} on " in err and "is writing" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]
    assert (tmp_path / "o" / "manifest.json").read_text() != previous  # the first writer's, whole
    _assert_valid(tmp_path / "o", capsys)


def test_the_lock_holds_across_threads_of_one_process(tmp_path: Path) -> None:
    out = tmp_path / "o"
    failures: list[BaseException] = []

    def second_writer() -> None:
        try:
            with staged_dir(out):
                pass
        except UsageError as e:
            failures.append(e)

    with output_scope():
        check_output_dir(out, force=False)
        assert lock_path(out).is_file()
        worker = threading.Thread(target=second_writer)
        worker.start()
        worker.join()
    assert len(failures) == 1 and "this process" in str(failures[0]) and str(out) in str(failures[0])
    assert list(tmp_path.iterdir()) == []  # the lock file went with the scope


def test_a_lock_file_left_by_a_killed_writer_is_reused_and_removed(tmp_path: Path) -> None:
    out = tmp_path / "o"
    lock_path(out).write_text("pid 1234 on elsewhere\n")  # its flock died with its process
    with staged_dir(out) as tmp:
        (tmp / "f").write_text("x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]


def test_nested_writers_of_one_target_share_the_lock(tmp_path: Path) -> None:
    """run_export takes the lock at check_output_dir time and staged_dir re-enters it in the same thread."""
    out = tmp_path / "o"
    with output_scope():
        check_output_dir(out, force=False)
        with staged_dir(out) as tmp:
            (tmp / "f").write_text("x")
        assert lock_path(out).is_file()  # still held: the outer scope has not ended
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]
