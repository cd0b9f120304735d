"""The host side of generation and scoring: numpy glue the runtime runs around the exported graphs.

Torch- and transformers-free by rule (tests/triton/test_repository.py imports it with both blocked): these
modules are copied verbatim into Triton repositories (serve/triton_repo.py ``SERVING_SOURCES``), so the
served models run the same prompt rules, recipes and extra inputs as `vlexport run`. Family-specific pieces
live in ``host/<family>.py``, beside the family's module of the same name.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def past_name(present: str) -> str:
    """``present.3.encoder.key`` -> ``past_key_values.3.encoder.key``: an output feeds the next call's
    input."""
    return "past_key_values." + present.removeprefix("present.")


# ---------------------------------------------------------------- how the runtime generates for a task
HostStage = Callable[[dict[str, np.ndarray], Mapping[str, Any]], dict[str, np.ndarray]]
DECODER = "decoder"  # the component the decode loop calls once per new token


@dataclass(frozen=True)
class GenerationRecipe:
    """What HF ``generate()`` does for a task before its decode loop, as data the runtime follows.

    ``stages`` run once per request, in order, over a dict of named arrays that starts as the request
    (``pixel_values``, ``input_ids``, ``attention_mask``): a string runs that component (inputs and outputs
    wired by name), a function is host-side glue (prompt rules, placing image queries). The stages must
    leave ``decoder_input_ids`` (and optionally ``decoder_attention_mask``); every other entry whose name
    the decoder declares is fed to each step (``present.*`` outputs arrive as ``past_key_values.*``).
    ``first_step`` names decoder inputs that only the first step sees (zeros afterwards).
    The output is always the decoder prompt followed by the new tokens, as HF returns it.
    """

    stages: tuple[str | HostStage, ...]
    settings: Callable[[PreTrainedModel], dict[str, Any]] | None  # eos/pad/bos/... read off the eager model
    first_step: tuple[str, ...] = ()
    # placeholder tokenizer for random weights: special tokens around the text, by settings key
    tokenizer_template: tuple[tuple[str, ...], tuple[str, ...]] = ((), ())
    prompt_template: str | None = None  # e.g. BLIP-2 "Question: {} Answer:"
    needs_prompt: bool = False  # the T5 variant has no default prompt; VQA needs a question
    continues_prompt: bool = (
        False  # the text prompt is the start of the output (BLIP captions: "a picture of")
    )


# ---------------------------------------------------------------- host code as data (Triton repositories)
def code_ref(fn: Callable[..., Any], allowed: Sequence[str]) -> dict[str, Any]:
    """``fn`` (a module-level function, or a functools.partial of one with JSON-able arguments) as JSON: what
    a repository records so that its copy of the module runs the same code. Only modules in ``allowed`` (the
    ones copied into the repository) may be named; anything else raises ValueError."""
    args: list[Any] = []
    if isinstance(fn, functools.partial):
        fn, args = fn.func, list(fn.args)
    module, name = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
    if module not in allowed or "." in name or "<" in name:
        raise ValueError(f"{module}.{name} is not a module-level function of {sorted(allowed)}")
    return {"module": module, "name": name, "args": args}


def load_ref(ref: Mapping[str, Any]) -> Callable[..., Any]:
    fn = getattr(importlib.import_module(ref["module"]), ref["name"])
    return functools.partial(fn, *ref["args"]) if ref.get("args") else fn


def recipe_to_json(recipe: GenerationRecipe, allowed: Sequence[str]) -> dict[str, Any]:
    return {
        "stages": [s if isinstance(s, str) else code_ref(s, allowed) for s in recipe.stages],
        "first_step": list(recipe.first_step),
        "prompt_template": recipe.prompt_template,
        "needs_prompt": recipe.needs_prompt,
        "continues_prompt": recipe.continues_prompt,
    }


def recipe_from_json(d: Mapping[str, Any]) -> GenerationRecipe:
    return GenerationRecipe(
        tuple(s if isinstance(s, str) else load_ref(s) for s in d["stages"]),
        None,
        first_step=tuple(d["first_step"]),
        prompt_template=d["prompt_template"],
        needs_prompt=d["needs_prompt"],
        continues_prompt=d["continues_prompt"],
    )
