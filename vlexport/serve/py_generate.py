"""The BLS generation model of a generative artifact: IMAGE bytes (+ TEXT prompt) -> the caption / answer.

It runs vlexport's own generation (runtime.generate.Generator: the family's recipe, recorded in serve.json by
`vlexport triton`, then runtime/decode.py's greedy or beam search over a KV cache) with every component a
Triton model called through BLS, and builds and decodes prompts as `vlexport run` does (generate.prompt_ids,
the artifact's tokenizer.json): the answer is token for token what `vlexport run` prints for the same image
and prompt.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from vlexport.errors import CheckError
from vlexport.runtime.generate import prompt_ids  # `vlexport run`'s prompt rules (template, image tokens)
from vlexport.serve import py_common as common

MAX_BEAMS = 16  # a bound on the work one request may ask for
MAX_NEW_TOKENS = 1024


class Served:
    """A component served by Triton, called through BLS: named numpy arrays in and out, like a loaded one."""

    def __init__(self, model: str, inputs: list[str], outputs: list[str]):
        self.model, self.input_names, self.output_names = model, inputs, outputs

    def __call__(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        utils = common.pb()
        request = utils.InferenceRequest(
            model_name=self.model,
            requested_output_names=self.output_names,
            inputs=[utils.Tensor(n, np.ascontiguousarray(np.asarray(feeds[n]))) for n in self.input_names],
        )
        response = request.exec()
        if response.has_error():
            raise CheckError(f"component model {self.model} failed: {response.error().message()}")
        return {n: utils.get_output_tensor_by_name(response, n).as_numpy() for n in self.output_names}


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        from types import SimpleNamespace

        from vlexport.models.host import recipe_from_json
        from vlexport.runtime.generate import ConfigView, Generator
        from vlexport.runtime.tokenizer import JsonTokenizer

        meta = common.serve_json(args)
        directory = common.artifact_dir(args)
        manifest = common.read_manifest(directory)
        components = {
            name: Served(
                model, meta["served_inputs"][model], [t.name for t in manifest.components[name].outputs]
            )
            for name, model in meta["components"].items()
        }
        recipe = recipe_from_json(meta["recipe"])
        task = SimpleNamespace(generative=True, generation=lambda config: recipe)
        artifact = SimpleNamespace(
            directory=directory, manifest=manifest, task_spec=task, components=components
        )
        self.generator = Generator(artifact, ConfigView({}))  # the recipe is resolved: no model config needed
        self.image = common.image_settings(meta)
        self.tokenizer = (
            JsonTokenizer(directory) if manifest.tokenizer.get("kind", "none") != "none" else None
        )

    def execute(self, requests: list[Any]) -> list[Any]:
        return common.answer(requests, self._one)

    def _one(self, request: Any) -> dict[str, np.ndarray]:
        gen, s = self.generator, self.generator.settings
        pixels = common.decode_image(common.image_bytes(request), self.image)
        texts = common.strings(request, "TEXT", "prompt")
        text = None
        if texts is not None:
            if len(texts) != 1:
                raise common.RequestError(f"TEXT must hold one prompt, got {len(texts)}.")
            text = texts[0]
            if not text.strip():
                raise common.RequestError(
                    "TEXT is an empty string: send a prompt, or leave TEXT out for the model's "
                    "default prompt."
                )
            if self.tokenizer is None:
                raise common.RequestError(
                    "This artifact has no tokenizer to encode TEXT with (the export source had "
                    "none); leave TEXT out."
                )
        max_new = _scalar(
            request, "MAX_NEW_TOKENS", int(s.get("default_max_new_tokens", 20)), 1, MAX_NEW_TOKENS
        )
        beams = _scalar(request, "NUM_BEAMS", int(s.get("default_num_beams", 1)), 1, MAX_BEAMS)
        raw = bool(_scalar(request, "RAW_PROMPT", 0, 0, 1))
        if raw and "{}" not in (gen.recipe.prompt_template or ""):
            raise common.RequestError(
                "RAW_PROMPT turns off the prompt template, and this model has none: drop it."
            )
        ids = prompt_ids(text, self.tokenizer, s, gen.recipe, raw)
        out = gen.generate(
            pixels, ids, None if ids is None else np.ones_like(ids), max_new_tokens=max_new, num_beams=beams
        )
        seq = out.sequences[0]
        shown = seq if gen.recipe.continues_prompt else seq[out.prompt_length :]
        answer = self.tokenizer.decode(shown) if self.tokenizer else ""
        return {"TEXT": np.array([answer.encode("utf-8")], dtype=object), "TOKEN_IDS": seq.astype(np.int64)}


def _scalar(request: Any, name: str, default: int, low: int, high: int) -> int:
    value = common.tensor(request, name)
    if value is None:
        return default
    if value.size != 1:
        raise common.RequestError(f"{name} must hold one value, got {value.size}.")
    v = int(value.reshape(-1)[0])
    if not low <= v <= high:
        raise common.RequestError(f"{name} must be in {low}..{high}, got {v}.")
    return v
