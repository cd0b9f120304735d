"""Files the user did not hand over as the output are never deleted, rewritten or re-linked: hidden entries
and other files of a model repository, folders that are not repositories, the target of a symlinked -o, the
files of an artifact being read (reports written over them, served copies hard-linked to them, quantizer
scratch written beside them)."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest

from tests.faults.cli_helpers import cli

ITM = ("bridgetower-tiny", "itm")
FEATURES = ("altclip-tiny", "features")


def _tree(directory: Path) -> dict[str, str]:
    """Every entry under ``directory`` (links as links, with their target), with its content hash and mode."""
    out = {}
    for p in sorted(directory.rglob("*")):
        rel = str(p.relative_to(directory))
        if p.is_symlink():
            out[rel] = f"-> {os.readlink(p)}"
        elif p.is_file():
            out[rel] = f"{hashlib.sha1(p.read_bytes()).hexdigest()} {oct(p.stat().st_mode)}"
        else:
            out[rel] = f"dir {oct(p.stat().st_mode)}"
    return out


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


@pytest.fixture
def repo(exported, tmp_path: Path, capsys) -> Path:
    """A model repository as a user keeps it: one served model, a git checkout, a note and a link of
    theirs."""
    repo = tmp_path / "repo"
    from vlexport.cli import main

    assert main(["triton", str(exported(*ITM)), "-o", str(repo), "--name", "bt"]) == 0
    capsys.readouterr()
    (repo / ".git").mkdir()
    (repo / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (repo / ".gitignore").write_text("*.log\n")
    (repo / "README.md").write_text("my models\n")
    (repo / "README.md").chmod(0o600)
    (repo / "latest").symlink_to("bt")
    return repo


# ---------------------------------------------------------------- triton -o
def test_extending_a_repository_touches_nothing_it_held(repo: Path, exported, capsys) -> None:
    before = _tree(repo)
    from vlexport.cli import main

    assert main(["triton", str(exported(*FEATURES)), "-o", str(repo), "--name", "alt"]) == 0
    after = _tree(repo)
    assert {
        k: v for k, v in after.items() if not k.startswith("alt")
    } == before  # .git, links, modes as they were
    assert (repo / "alt" / "config.pbtxt").is_file() and _leftovers(repo.parent) == []


@pytest.mark.parametrize("force", [False, True])
def test_a_folder_that_is_not_a_repository_is_refused(exported, tmp_path: Path, capsys, force: bool) -> None:
    folder = tmp_path / "photos"
    (folder / "2024").mkdir(parents=True)
    (folder / "2024" / "a.jpg").write_bytes(b"\xff\xd8")
    (folder / "notes.txt").write_text("keep me")
    before = _tree(folder)
    rc, err = cli(capsys, "triton", exported(*ITM), "-o", folder, *(["--force"] if force else []))
    assert rc == 2 and f"-o {folder} is a folder that is not a Triton model repository" in err, err
    assert _tree(folder) == before and _leftovers(tmp_path) == []


def test_force_does_not_replace_a_repository_holding_other_entries(repo: Path, exported, capsys) -> None:
    before = _tree(repo)
    rc, err = cli(capsys, "triton", exported(*ITM), "-o", repo, "--name", "bt", "--force")
    assert rc == 2 and ".git" in err and "--force replaces the whole repository" in err, err
    assert _tree(repo) == before


@pytest.mark.parametrize("force", [False, True])
def test_a_symlinked_repository_is_written_through(exported, tmp_path: Path, capsys, force: bool) -> None:
    from vlexport.cli import main

    real = tmp_path / "store" / "repo"
    assert main(["triton", str(exported(*ITM)), "-o", str(real), "--name", "bt"]) == 0
    link = tmp_path / "repo-link"
    link.symlink_to(real)
    assert (
        main(
            [
                "triton",
                str(exported(*FEATURES)),
                "-o",
                str(link),
                "--name",
                "alt",
                *(["--force"] if force else []),
            ]
        )
        == 0
    )
    assert link.is_symlink() and os.readlink(link) == str(real)  # the link stays a link
    assert sorted(p.name for p in real.iterdir()) == (["alt"] if force else ["alt", "bt"])
    assert _leftovers(tmp_path) == [] and _leftovers(real.parent) == []  # no .old set aside for good


def test_served_files_are_copies_not_hard_links_to_the_artifact(exported, tmp_path: Path) -> None:
    from vlexport.cli import main

    art = exported(*ITM)
    assert main(["triton", str(art), "-o", str(tmp_path / "repo"), "--name", "bt"]) == 0
    served = tmp_path / "repo" / "bt" / "1" / "model.onnx"
    assert served.read_bytes() == (art / "model.onnx").read_bytes()
    assert not os.path.samefile(served, art / "model.onnx") and served.stat().st_nlink == 1
    source = (art / "model.onnx").read_bytes()
    with served.open("r+b") as f:  # a user patching the served model in place
        f.write(b"\0" * 16)
    assert (art / "model.onnx").read_bytes() == source


# ---------------------------------------------------------------- staging over a symlinked -o
def test_quantize_force_over_a_symlinked_output_updates_its_target(exported, tmp_path: Path, capsys) -> None:
    from vlexport.cli import main

    art = exported(*FEATURES)
    real = tmp_path / "real" / "q"
    assert main(["quantize", str(art), "-o", str(real), "--precision", "int8-dynamic"]) == 0
    (real / "stale.txt").write_text("from the first build")
    link = tmp_path / "q"
    link.symlink_to(real)
    assert main(["quantize", str(art), "-o", str(link), "--precision", "int8-dynamic", "--force"]) == 0
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert not (real / "stale.txt").exists() and (real / "manifest.json").is_file()  # the target was replaced
    assert _leftovers(tmp_path) == [] and _leftovers(real.parent) == []


def test_a_symlink_left_set_aside_by_an_older_version_is_cleaned(tmp_path: Path) -> None:
    from vlexport.artifact import staged_dir

    (tmp_path / "real").mkdir()
    (tmp_path / ".out.99999999-gone.old").symlink_to(tmp_path / "real")  # what the old _commit left behind
    (tmp_path / "out").mkdir()
    with staged_dir(tmp_path / "out", force=True) as tmp:
        (tmp / "x").write_text("new")
    assert _leftovers(tmp_path) == [] and (tmp_path / "real").is_dir()  # the link went, never its target
    assert (tmp_path / "out" / "x").read_text() == "new"


# ---------------------------------------------------------------- reports over inputs
def test_validate_report_never_overwrites_the_artifact(exported, tmp_path: Path, capsys) -> None:
    art = tmp_path / "art"
    shutil.copytree(exported(*FEATURES), art)
    before = _tree(art)
    rc, err = cli(capsys, "validate", art, "--json", art / "manifest.json")
    assert rc == 2 and f"--json {art / 'manifest.json'} is inside {art}" in err, err
    assert _tree(art) == before


@pytest.mark.parametrize("option", ["--json", "--markdown", "--plot"])
def test_bench_reports_never_land_inside_an_artifact_read(
    exported, tmp_path: Path, capsys, option: str
) -> None:
    art = tmp_path / "art"
    shutil.copytree(exported(*FEATURES), art)
    before = _tree(art)
    rc, err = cli(capsys, "bench", art, option, art / "config.json", "--iters", 1, "--warmup", 0)
    assert rc == 2 and f"{option} {art / 'config.json'} is inside {art}" in err, err
    assert _tree(art) == before


# ---------------------------------------------------------------- a source artifact is read, never written
def test_quantize_writes_no_scratch_beside_the_source(exported, tmp_path: Path, monkeypatch) -> None:
    import onnx.shape_inference

    from vlexport.cli import main

    src = tmp_path / "src"
    shutil.copytree(exported(*FEATURES), src)
    before = _tree(src)
    written: list[Path] = []
    real = onnx.shape_inference.infer_shapes_path

    def spy(model_path, output_path="", *args, **kwargs):
        written.append(Path(output_path or model_path))
        return real(model_path, output_path, *args, **kwargs)

    monkeypatch.setattr(onnx.shape_inference, "infer_shapes_path", spy)
    assert main(["quantize", str(src), "-o", str(tmp_path / "q"), "--precision", "int8-dynamic"]) == 0
    assert written and not [
        p for p in written if Path(os.path.abspath(p)).parent == src
    ]  # ORT's -inferred file
    assert _tree(src) == before
