"""Limits checked before the work: `compile --max-length / --max-batch` values that validation's own requests
exceed are refused before anything is compiled (naming the smallest values that pass), and decoder limits
given for a task without a decoder are refused rather than ignored."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.faults.cli_helpers import cli


@pytest.fixture
def no_compile(monkeypatch) -> list[str]:
    """Fails the test if anything is exported or loaded: the refusal must come first."""
    import vlexport.pipeline

    calls: list[str] = []
    monkeypatch.setattr(vlexport.pipeline, "load_model", lambda *a, **k: calls.append("load") or 1 / 0)
    return calls


@pytest.mark.parametrize(
    ("preset", "task", "options", "needed"),
    [
        # caption: a 6-token text prompt + 12 new tokens; 4 samples x beam 3 rows
        ("blip-tiny", "caption", ["--max-length", "17"], "--max-length 17 < 18 cache slots"),
        ("blip-tiny", "caption", ["--max-batch", "11"], "--max-batch 11 < 12 decoder rows"),
        # BLIP-2 OPT: the prompt holds num_query_tokens image tokens before the text (14 tokens on the tiny
        # preset)
        (
            "blip2-opt-tiny",
            "generate",
            ["--max-length", "25", "--max-batch", "4"],
            "--max-batch 4 < 12 decoder rows (batch x beams); --max-length 25 < 26 cache slots",
        ),
    ],
)
def test_compile_limits_validation_cannot_meet_are_refused_up_front(
    tmp_path: Path, capsys, no_compile: list[str], preset: str, task: str, options: list[str], needed: str
) -> None:
    out = tmp_path / "pkg"
    rc, err = cli(capsys, "compile", preset, "--task", task, "--random-weights", "-o", out, *options)
    assert rc == 2 and needed in err and "Nothing was compiled" in err, err
    assert "--max-new-tokens" not in err  # advice names only options `compile` takes
    assert no_compile == [] and not out.exists() and not [p for p in tmp_path.iterdir()]


def test_limits_fit_exactly_what_validation_needs() -> None:
    """The bounds are exact, not guesses: the smallest values pass the runtime's own slot and row checks."""
    from vlexport.validate.generation import decoder_needs
    from vlexport.weights import resolve

    needs = {}
    for preset, task in (
        ("blip-tiny", "caption"),
        ("blip-tiny", "vqa"),
        ("blip2-opt-tiny", "generate"),
        ("blip2-flan-t5-tiny", "generate"),
    ):
        source = resolve(preset, random_weights=True)
        needs[(preset, task)] = decoder_needs(source.family.task(task), source.config)
    # VQA's question and T5's prompt go to an encoder: the decoder starts from one token
    assert needs == {
        ("blip-tiny", "caption"): (12, 18),
        ("blip-tiny", "vqa"): (12, 13),
        ("blip2-opt-tiny", "generate"): (12, 26),
        ("blip2-flan-t5-tiny", "generate"): (12, 13),
    }


@pytest.mark.parametrize("option", ["--max-length", "--max-batch"])
def test_decoder_limits_on_a_task_without_a_decoder_are_refused(
    tmp_path: Path, capsys, no_compile: list[str], option: str
) -> None:
    out = tmp_path / "pkg"
    rc, err = cli(capsys, "compile", "altclip-tiny", "--random-weights", "-o", out, option, "32")
    assert rc == 2 and f"{option} bounds the decoder of a generative task; features has none" in err, err
    assert no_compile == [] and not out.exists()
