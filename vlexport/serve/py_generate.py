"""The generation model of a generative artifact: IMAGE bytes (+ TEXT prompt) -> the caption / answer.

It runs vlexport's own generation (runtime.generate.Generator: the family's recipe, recorded in serve.json by
`vlexport triton`, then runtime/decode.py's greedy or beam search over a KV cache) and builds and decodes
prompts as `vlexport run` does (generate.prompt_ids, the artifact's tokenizer.json): the answer is token for
token what `vlexport run` prints for the same image and prompt. The encoders are Triton models called through
BLS; an ONNX decoder runs here, in ONNX Runtime (no Triton hop per token).

Requests are served in flight: ``execute`` hands each request to a worker thread and returns at once, so
Triton passes the next requests as they arrive; each worker answers through the request's response sender
when its sequence is done (the client API is unchanged: one response per request, not decoupled). The decode
steps of all requests in flight run batched (runtime/batching.py), up to serve.json's ``max_rows`` rows
(requests x beams); more wait their turn. A request whose client cancelled stops at its next step.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
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
        from vlexport.runtime.batching import StepBatcher
        from vlexport.runtime.generate import ConfigView, Generator
        from vlexport.runtime.tokenizer import JsonTokenizer

        meta = common.serve_json(args)
        self.name = args.get("model_name", "generate")
        directory = common.artifact_dir(args)
        manifest = common.read_manifest(directory)
        components: dict[str, Any] = {
            name: Served(
                model, meta["served_inputs"][model], [t.name for t in manifest.components[name].outputs]
            )
            for name, model in meta["components"].items()
        }
        if meta.get("decoder"):  # the ONNX decoder, run in this process
            from vlexport.runtime.onnx_session import OnnxComponent, available_providers

            device = meta["decoder"]["device"]
            components["decoder"] = OnnxComponent(
                common.version_dir(args) / meta["decoder"]["file"],
                providers=available_providers("auto" if device == "gpu" else "cpu"),
                spin=False,  # threads must not spin on the cores the server and other models' runs share
                decode_step=True,
            )
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
        rows = int(meta.get("max_rows", 1))
        self.batcher = StepBatcher(self.generator.decoder, rows)
        # workers: requests in flight (encoding, waiting for rows, decoding); the rest queue here, in order
        self.workers = ThreadPoolExecutor(max_workers=2 * rows, thread_name_prefix="generate")

    def execute(self, requests: list[Any]) -> None:
        for request in requests:
            self.workers.submit(self._answer, request, request.get_response_sender())
        # returns None: answered through the response senders, so Triton may pass the next requests now

    def finalize(self) -> None:
        self.batcher.close()
        self.workers.shutdown(wait=False, cancel_futures=True)

    def _answer(self, request: Any, sender: Any) -> None:
        utils = common.pb()
        sender.send(common.response(request, self._one), flags=utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

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

        def cancelled(step: int) -> None:
            if request.is_cancelled():  # the client went away: free its rows for the others
                message = f"the request was cancelled after {step} new tokens; its rows are free"
                common.pb().Logger.log_info(f"{self.name}: {message}")
                raise common.RequestError(message)

        with self.batcher.member() as member:
            out = gen.generate(
                pixels,
                ids,
                None if ids is None else np.ones_like(ids),
                max_new_tokens=max_new,
                num_beams=beams,
                on_step=cancelled,
                decoder=member,
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
