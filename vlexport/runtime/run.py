"""``vlexport run``: an artifact directory + an image (+ texts) -> caption / answer, or ITM/ITC scores.

Generative artifacts: the prompt is tokenised with the artifact's tokenizer (BLIP-2: wrapped in the
"Question: ... Answer:" template and preceded by num_query_tokens image tokens, as its processor does),
then generated with runtime.generate. Other artifacts: each text is scored against the image. Both go through
the task objects of runtime/tasks.py (``vlexport.load``): the CLI prints what the API returns.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from vlexport.contracts.manifest import Manifest
from vlexport.errors import UsageError
from vlexport.runtime import check_device
from vlexport.runtime.preprocess import image_settings, load_image
from vlexport.runtime.tasks import EncoderTask, GenerateTask, load
from vlexport.runtime.texts import check_options


@dataclass
class RunLine:
    text: str | None  # the prompt / the scored text (None: no prompt)
    output: str | None = None  # caption / answer (None when the artifact has no tokenizer)
    ids: list[int] = field(default_factory=list)
    score: dict[str, float] = field(default_factory=dict)


@dataclass
class RunResult:
    kind: str  # "generate" | "scores"
    task: str
    lines: list[RunLine]
    notes: list[str] = field(default_factory=list)


def run_artifact(
    directory: str | Path,
    image: str | Path,
    texts: Sequence[str] = (),
    *,
    max_new_tokens: int | None = None,
    num_beams: int | None = None,
    device: str = "auto",
    raw_prompt: bool = False,
    verify: bool = False,
) -> RunResult:
    check_device(device)
    for (
        text
    ) in texts:  # a non-UTF-8 argument arrives as lone surrogates: the tokenizer would raise deep inside
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise UsageError(
                f"--text {text.encode('utf-8', 'surrogateescape')!r:.60} is not valid UTF-8 text; "
                "pass it in UTF-8 (check the terminal's or the script's encoding)."
            ) from None
    directory = Path(directory)
    manifest = Manifest.read(directory)  # missing files / size mismatches fail here, before any work
    if max_new_tokens is not None and max_new_tokens <= 0:
        raise UsageError(f"--max-new-tokens must be a positive integer, got {max_new_tokens}.")
    if num_beams is not None and num_beams < 1:
        raise UsageError(f"--num-beams must be >= 1, got {num_beams}.")
    check_options(
        directory, manifest, max_new_tokens=max_new_tokens, num_beams=num_beams, raw_prompt=raw_prompt
    )
    pixels = load_image(image, image_settings(directory, manifest))[0]  # a bad image fails before loading
    task = load(directory, device=device, verify=verify, one_shot=True)  # one encoder or decoder at a time
    if isinstance(task, GenerateTask):
        records = task.generate(
            pixels,
            list(texts) if texts else None,
            max_new_tokens=max_new_tokens,
            num_beams=num_beams,
            return_ids=True,
            raw_prompt=raw_prompt,
        )
        records = [records] if not texts else records
        lines = [RunLine(r.prompt, r.text, r.ids) for r in records]
        return RunResult("generate", manifest.task, lines, list(task.notes))
    assert isinstance(task, EncoderTask)
    if task.spec.scores is None:  # e.g. masked-LM logits or plain features
        raise UsageError(
            f"`vlexport run` has no image-text scores for {manifest.family} {manifest.task} (its outputs "
            "are not a matching or similarity score); use the Python API for this task "
            "(`vlexport.load(dir).outputs(images, texts)`, docs/api.md)."
        )
    if not texts:
        raise UsageError(
            f"{manifest.family} {manifest.task} scores texts against the image: give one or more --text."
        )
    lines = [RunLine(s.text, ids=s.ids, score=s.scores) for s in task.scores(pixels, list(texts))]
    return RunResult("scores", manifest.task, lines, list(task.notes))
