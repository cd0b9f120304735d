"""What a generative artifact carries besides its graphs: generation settings and a tokenizer.

Called by the export pipeline for generative tasks. Settings are read off the eager model (the
generation config its ``generate()`` really uses), so the artifact directory alone reproduces it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformers import PreTrainedModel

from vlexport.contracts.manifest import Manifest
from vlexport.errors import UsageError
from vlexport.runtime.tokenizer import PLACEHOLDER_NOTE, write_placeholder

if TYPE_CHECKING:
    from vlexport.weights import ModelSource


# GenerationConfig fields whose non-default values would change generate()'s tokens in ways the runtime
# loop does not implement: an export that meets one fails rather than generating something else.
_UNSUPPORTED = {
    "do_sample": False,
    "repetition_penalty": 1.0,
    "encoder_repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0,
    "bad_words_ids": None,
    "force_words_ids": None,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "min_length": 0,
    "num_beam_groups": 1,
    "diversity_penalty": 0.0,
    "exponential_decay_length_penalty": None,
    "sequence_bias": None,
    "renormalize_logits": False,
    "constraints": None,
}


def reference_generation_config(model: PreTrainedModel) -> Any:
    """The generation config the task's generate() hands to its inner decode loop."""
    for attr in ("text_decoder", "language_model"):
        inner = getattr(model, attr, None)
        if inner is not None and getattr(inner, "generation_config", None) is not None:
            return inner.generation_config
    return model.generation_config


def unsupported_options(gen_config: Any) -> dict[str, Any]:
    out = {}
    for key, default in _UNSUPPORTED.items():
        value = getattr(gen_config, key, default)
        if value not in (default, None) and not (isinstance(value, (list, tuple)) and not value):
            out[key] = value
    return out


def write_generation_files(
    model: PreTrainedModel, source: ModelSource, manifest: Manifest, tmp_dir: Path
) -> None:
    """Record generation settings in ``manifest.generation``; write a placeholder tokenizer when needed."""
    task = source.family.task(manifest.task)
    recipe = task.generation(model.config)
    gen_config = reference_generation_config(model)
    bad = unsupported_options(gen_config)
    if bad:
        raise UsageError(
            f"The model's generation config sets {bad}, which vlexport's generation runtime does not "
            "implement "
            "(greedy and beam search with eos/pad, max/min new tokens); its output would differ from "
            "model.generate(). Export a checkpoint whose generation_config.json leaves them at their "
            "defaults."
        )
    settings = recipe.settings(model)
    settings["default_num_beams"] = int(gen_config.num_beams or 1)
    if gen_config.max_new_tokens is not None:
        settings["default_max_new_tokens"] = int(gen_config.max_new_tokens)
    if recipe.prompt_template:
        settings["prompt_template"] = recipe.prompt_template
    manifest.generation = settings
    if manifest.tokenizer.get("kind") in (None, "none"):
        if source.origin.get("kind") != "random":
            return  # real weights without tokenizer files: `run` says how to get them; ids still work
        files = write_placeholder(tmp_dir, settings["vocab_size"], settings, recipe.tokenizer_template)
        manifest.files = [*manifest.files, *files]
        manifest.tokenizer = {
            "kind": "placeholder",
            "files": files,
            "vocab_size": settings["vocab_size"],
            "note": PLACEHOLDER_NOTE,
        }
