"""``vlexport run``: an artifact directory + an image (+ texts) -> caption / answer, or ITM/ITC scores.

Generative artifacts: the prompt is tokenised with the artifact's tokenizer (BLIP-2: wrapped in the
"Question: ... Answer:" template and preceded by num_query_tokens image tokens, as its processor does),
then generated with runtime.generate. Other artifacts: each text is scored against the image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vlexport.errors import UsageError
from vlexport.manifest import Manifest
from vlexport.models import get_family
from vlexport.runtime import load_artifact
from vlexport.runtime.preprocess import image_settings, load_image
from vlexport.runtime.tokenizer import ArtifactTokenizer, build_placeholder, pad_batch


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


def run_artifact(directory: str | Path, image: str | Path, texts: Sequence[str] = (), *,
                 max_new_tokens: int | None = None, num_beams: int | None = None, device: str = "auto",
                 raw_prompt: bool = False) -> RunResult:
    directory = Path(directory)
    manifest = Manifest.read(directory)  # missing files / size mismatches fail here, before any work
    if max_new_tokens is not None and max_new_tokens <= 0:
        raise UsageError(f"--max-new-tokens must be a positive integer, got {max_new_tokens}.")
    if num_beams is not None and num_beams < 1:
        raise UsageError(f"--num-beams must be >= 1, got {num_beams}.")
    _check_options(directory, manifest, max_new_tokens=max_new_tokens, num_beams=num_beams, raw_prompt=raw_prompt)
    pixels = load_image(image, image_settings(directory, manifest))
    artifact = load_artifact(directory, manifest=manifest, device=device)
    if artifact.task_spec.generative:
        return _generate(artifact, pixels, texts, max_new_tokens, num_beams, raw_prompt)
    return _scores(artifact, pixels, texts)


def _check_options(directory: Path, manifest: Manifest, *, max_new_tokens: int | None, num_beams: int | None,
                   raw_prompt: bool) -> None:
    """Options that do not apply to the artifact are an error, not silently ignored (before anything loads)."""
    what = f"{directory} holds a {manifest.family} {manifest.task} artifact"
    if not get_family(manifest.family).task(manifest.task).generative:
        given = [name for name, value in (("--num-beams", num_beams), ("--max-new-tokens", max_new_tokens),
                                          ("--raw-prompt", raw_prompt or None)) if value is not None]
        if given:
            raise UsageError(f"{' and '.join(given)} appl{'ies' if len(given) == 1 else 'y'} to generative artifacts "
                             f"(caption, vqa, generate); {what}, which generates no text (it scores or embeds its "
                             "inputs). Drop the option.")
    elif raw_prompt and "{}" not in (manifest.generation.get("prompt_template") or ""):
        raise UsageError(f"--raw-prompt turns off the prompt template (BLIP-2's 'Question: {{}} Answer:'); {what}, "
                         "whose recipe has none, so --text is already used as is. Drop --raw-prompt.")


def _generate(artifact: Any, pixels: np.ndarray, texts: Sequence[str], max_new_tokens: int | None,
              num_beams: int | None, raw_prompt: bool) -> RunResult:
    from vlexport.runtime.generate import Generator, prompt_ids

    gen = Generator(artifact)
    s, recipe = gen.settings, gen.recipe
    notes = []
    tokenizer = None
    if artifact.manifest.tokenizer.get("kind", "none") != "none":
        tokenizer = ArtifactTokenizer(artifact.directory, artifact.manifest)
        if tokenizer.kind == "placeholder":
            notes.append("random weights: the text comes from a placeholder tokenizer and is not meaningful")
    elif texts:
        raise UsageError(f"{artifact.directory} has no tokenizer to encode --text with (the export source had none). "
                         "Export from a checkpoint directory that includes its tokenizer files.")
    prompts: list[str | None] = list(texts) or [None]
    lines = []
    for text in prompts:
        ids = prompt_ids(text, tokenizer, s, recipe, raw_prompt)
        out = gen.generate(pixels, ids, None if ids is None else np.ones_like(ids),
                           max_new_tokens=max_new_tokens or int(s.get("default_max_new_tokens", 20)),
                           num_beams=num_beams or int(s.get("default_num_beams", 1)))
        seq = out.sequences[0]
        shown = seq if recipe.continues_prompt else seq[out.prompt_length:]
        lines.append(RunLine(text, tokenizer.decode(shown) if tokenizer else None, seq.tolist()))
    if tokenizer is None:
        notes.append("the artifact has no tokenizer: showing token ids only")
    return RunResult("generate", artifact.manifest.task, lines, notes)


# ---------------------------------------------------------------- ITM / ITC scores
def _scores(artifact: Any, pixels: np.ndarray, texts: Sequence[str]) -> RunResult:
    spec, manifest = artifact.task_spec, artifact.manifest
    if spec.scores is None:  # e.g. masked-LM logits or plain features
        raise UsageError(f"`vlexport run` has no image-text scores for {manifest.family} {manifest.task} (its outputs "
                         "are not a matching or similarity score); use the runtime API for this task.")
    if not texts:
        raise UsageError(f"{manifest.family} {manifest.task} scores texts against the image: give one or more --text.")
    if len(artifact.components) != 1:
        raise UsageError(f"{artifact.directory} has components {sorted(artifact.components)}; scoring needs one.")
    (component,) = artifact.components.values()
    notes = []
    if manifest.tokenizer.get("kind", "none") != "none":
        tokenizer: Any = ArtifactTokenizer(artifact.directory, manifest)
        ids, mask = tokenizer.batch(texts)
    else:
        ids, mask = _placeholder_batch(artifact.directory, texts)
        notes.append("no tokenizer in the artifact (random weights): texts encoded with a byte-level placeholder")
    limit = token_limit(artifact.directory, manifest)
    if limit is not None and ids.shape[1] > limit:
        longest = int(np.argmax(mask.sum(axis=1)))
        raise UsageError(f"--text {texts[longest][:40]!r} is {ids.shape[1]} tokens, more than the {limit} this model's "
                         "position table holds; shorten it.")
    n = len(texts)  # the image is repeated once per text
    feeds = spec.run_inputs({"input_ids": ids, "attention_mask": mask, "pixel_values": np.repeat(pixels, n, axis=0)})
    names = getattr(component, "input_names", list(feeds))
    scores = spec.scores(component({k: feeds[k] for k in names if k in feeds}), n)
    lines = [RunLine(t, ids=ids[i][mask[i] == 1].tolist(), score={k: float(v[i]) for k, v in scores.items()})
             for i, t in enumerate(texts)]
    return RunResult("scores", manifest.task, lines, notes)


def token_limit(directory: Path, manifest: Manifest) -> int | None:
    """The longest token sequence the artifact's graphs take (its position table), None when unbounded."""
    from vlexport.models.base import with_axis_limits
    from vlexport.runtime.generate import artifact_config

    family, config = get_family(manifest.family), artifact_config(directory)
    offset = family.position_offset(config)
    limits = [with_axis_limits(spec, config, offset).axis_max.get("sequence")
              for spec in family.task(manifest.task).components(config)]
    return min((n for n in limits if n), default=None)


def placeholder_text_tokenizer(directory: Path) -> tuple[Any, int]:
    """The byte-level placeholder (a ``tokenizers.Tokenizer``) and pad id that encode ITM/ITC texts when the
    artifact has no tokenizer (random weights); `vlexport triton` writes it as the served tokenizer.json."""
    from vlexport.runtime.generate import artifact_config

    text = artifact_config(directory).text_config
    settings = {"pad_token_id": text.pad_token_id, "bos_token_id": getattr(text, "bos_token_id", None),
                "eos_token_id": [text.eos_token_id] if getattr(text, "eos_token_id", None) is not None else []}
    keys = (tuple(k for k in ("bos_token_id",) if settings[k] is not None),
            tuple(k for k in ("eos_token_id",) if settings[k]))
    return build_placeholder(text.vocab_size, settings, keys), text.pad_token_id or 0


def _placeholder_batch(directory: Path, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    tok, pad = placeholder_text_tokenizer(directory)
    return pad_batch([tok.encode(t).ids for t in texts], pad)
