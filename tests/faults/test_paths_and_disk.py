"""Output paths refused before any work, naming the user's path (never an internal one); a full disk is a
CheckError naming the output and the size it needs, checked up front where it can be, and leaves nothing."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from collections import namedtuple
from pathlib import Path

import pytest

from vlexport.artifact import describe_partial
from vlexport.cli import main

PRESET = "altclip-tiny"
WEIGHTS = "870.4 KiB"  # its parameters x 4 bytes: the size estimate (the ONNX file is 1.5 MiB)
Usage = namedtuple("Usage", "total used free")


def _run(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, " ".join(capsys.readouterr().err.split())


def _tree(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha1(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


# ---------------------------------------------------------------- the current directory
@pytest.mark.parametrize("force", [False, True])
@pytest.mark.parametrize("target", [".", "..", "CWD"])
def test_current_directory_or_above_is_refused(
    tmp_path: Path, monkeypatch, capsys, target: str, force: bool
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    monkeypatch.chdir(work)
    out = str(work) if target == "CWD" else target
    rc, err = _run(capsys, "onnx", PRESET, "--random-weights", "-o", out, *(["--force"] if force else []))
    assert rc == 2 and f"-o {out} is the current directory" in err, err
    # no lock file, nothing staged
    assert sorted(p.name for p in tmp_path.rglob("*")) == [
        "notes.txt",
        "work",
    ]


# ---------------------------------------------------------------- the source model directory
@pytest.fixture
def source(tmp_path: Path) -> Path:
    """A save_pretrained directory of the tiny model, as a user would export it."""
    from vlexport.weights import load_model, resolve

    model = load_model(resolve(PRESET, random_weights=True), "features")
    model.save_pretrained(tmp_path / "model")
    return tmp_path / "model"


@pytest.mark.parametrize(
    ("where", "force", "how"),
    [
        ("model", False, "is"),
        ("model", True, "is"),  # today --force deleted the weights being exported
        ("model/sub", False, "is inside"),
        (".", True, "contains"),
    ],
)
def test_source_directory_is_never_the_output(
    source: Path, capsys, where: str, force: bool, how: str
) -> None:
    before = _tree(source)
    out = source.parent / where
    rc, err = _run(capsys, "onnx", str(source), "-o", str(out), *(["--force"] if force else []))
    assert rc == 2 and f"-o {out} {how} the source model directory {source}" in err, err
    assert _tree(source) == before and sorted(p.name for p in source.parent.iterdir()) == ["model"]


def test_a_derived_backend_never_writes_over_its_parent_artifact(exported, tmp_path: Path, capsys) -> None:
    parent = tmp_path / "onnx"
    shutil.copytree(exported(PRESET, "features"), parent)
    before = _tree(parent)
    rc, err = _run(capsys, "onnx", "--optimize", str(parent), "-o", str(parent), "--force")
    assert rc == 2 and f"-o {parent} is the source model directory {parent}" in err, err
    assert _tree(parent) == before and sorted(p.name for p in tmp_path.iterdir()) == ["onnx"]


def test_dual_encoder_output_is_never_an_input(tmp_path: Path, capsys) -> None:
    from transformers import BertConfig, BertModel, ViTConfig, ViTModel

    common = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 37}
    ViTModel(ViTConfig(image_size=32, patch_size=8, **common)).save_pretrained(tmp_path / "vit")
    BertModel(BertConfig(vocab_size=200, max_position_embeddings=32, **common)).save_pretrained(
        tmp_path / "bert"
    )
    before = _tree(tmp_path)
    rc, err = _run(
        capsys,
        "dual-encoder",
        str(tmp_path / "vit"),
        str(tmp_path / "bert"),
        "-o",
        str(tmp_path / "bert"),
        "--force",
    )
    assert rc == 2 and f"is the source model directory {tmp_path / 'bert'}" in err, err
    assert _tree(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["bert", "vit"]


# ---------------------------------------------------------------- files and unwritable places
@pytest.mark.parametrize("force", [False, True])
def test_output_that_is_a_file(tmp_path: Path, capsys, force: bool) -> None:
    (tmp_path / "afile").write_text("x")
    rc, err = _run(
        capsys,
        "onnx",
        PRESET,
        "--random-weights",
        "-o",
        str(tmp_path / "afile"),
        *(["--force"] if force else []),
    )
    # --force cannot help
    assert rc == 2 and "is a file, not a directory" in err and "--force" not in err, err
    assert (tmp_path / "afile").read_text() == "x" and sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_output_under_a_file(tmp_path: Path, capsys) -> None:
    (tmp_path / "afile").write_text("x")
    out = tmp_path / "afile" / "sub" / "o"
    rc, err = _run(capsys, "onnx", PRESET, "--random-weights", "-o", str(out))
    assert rc == 2 and f"Cannot write to {out}: {tmp_path / 'afile'} is a file, not a directory" in err, err


@pytest.fixture
def mount(tmp_path: Path):
    """``mount(options) -> Path``: a tmpfs of our own (root only; skipped where mounting is not allowed)."""
    mounted: list[Path] = []

    def make(options: str) -> Path:
        where = tmp_path / f"fs{len(mounted)}"
        where.mkdir()
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN): {done.stderr.strip()}")
        mounted.append(where)
        return where

    yield make
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_read_only_place(mount, capsys) -> None:
    ro = mount("ro,size=1m")  # not writable even for root (os.access says so: EROFS)
    rc, err = _run(capsys, "onnx", PRESET, "--random-weights", "-o", str(ro / "o"))
    assert rc == 2 and f"Cannot write to {ro / 'o'}: {ro} is not writable" in err, err


# ---------------------------------------------------------------- disk full
def test_not_enough_space_is_found_before_exporting(mount, capsys) -> None:
    fs = mount("size=512k")  # the weights alone are 870 KiB
    out = fs / "nested" / "o"
    rc, err = _run(capsys, "onnx", PRESET, "--random-weights", "-o", str(out))
    assert (
        rc == 1 and f"Not enough space for {out}: the artifact needs at least {WEIGHTS} (its weights" in err
    ), err
    assert re.search(r"its filesystem has 50\d\.\d KiB free", err), err  # 512 KiB less the lock file's page
    assert list(fs.iterdir()) == []  # neither the parent it created, nor a lock file, nor a partial


@pytest.mark.parametrize("verb", [["onnx"], ["onnx", "--optimize"]], ids=["onnx", "onnx-opt"])
def test_disk_filling_up_during_the_export(mount, monkeypatch, capsys, verb: list[str]) -> None:
    """The free space looked enough (another writer fills the disk meanwhile): ENOSPC mid-write, named
    clearly. onnx-opt builds its onnx parent in a scratch dir first: the message still names the user's -o."""
    fs = mount("size=1m")  # more than the weights (870 KiB), less than the ONNX file (1.5 MiB)
    real = shutil.disk_usage
    monkeypatch.setattr(
        shutil, "disk_usage", lambda p: Usage(*real(p)[:2], 10**9) if str(p).startswith(str(fs)) else real(p)
    )
    out = fs / "o"
    rc, err = _run(capsys, *verb, PRESET, "--random-weights", "-o", str(out))
    assert rc == 1 and f"No space left on the filesystem of {out} while writing the artifact" in err, err
    assert (
        f"it needs at least {WEIGHTS} (its weights alone)" in err
        and "had been written when the disk filled" in err
    )
    assert "partial" not in err and "Traceback" not in err
    assert list(fs.iterdir()) == []


def test_free_space_check_names_both_numbers(tmp_path: Path, monkeypatch, capsys) -> None:
    asked: list[str] = []

    def usage(path: str | os.PathLike[str]) -> Usage:
        asked.append(str(path))
        return Usage(10**9, 10**9 - 1000, 1000)

    monkeypatch.setattr(shutil, "disk_usage", usage)
    # base backend, and derived one (parent + derived estimate)
    for verb in (
        ["onnx"],
        ["onnx", "--optimize"],
    ):
        rc, err = _run(capsys, *verb, PRESET, "--random-weights", "-o", str(tmp_path / "o"))
        assert rc == 1 and f"Not enough space for {tmp_path / 'o'}: the artifact needs at least" in err, err
        assert "1000 bytes free" in err and ".partial" not in err
    assert asked and all(a == str(tmp_path) for a in asked)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- a partial is never taken for an artifact
def test_a_staging_directory_says_what_it_is(tmp_path: Path) -> None:
    host = os.uname().nodename
    dead = tmp_path / f".o.{2**22 + 7}-{host}.abcd1234.partial"  # a pid above Linux's default pid_max
    assert "unfinished staging directory for" in describe_partial(dead) and "gone" in describe_partial(dead)
    live = tmp_path / f".o.{os.getpid()}-{host}.abcd1234.parent.partial"
    assert "still running" in describe_partial(live) and str(tmp_path / "o") in describe_partial(live)
    assert "an earlier vlexport" in describe_partial(tmp_path / ".o.abcd1234.partial")
    assert describe_partial(tmp_path / "o") is None and describe_partial(tmp_path / ".o.lock") is None
