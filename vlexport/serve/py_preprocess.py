"""``--ensemble`` preprocessing: IMAGE (encoded bytes) + TEXT (strings) -> the encoder component's tensors.

What `vlexport run` does before it calls the graph, with the artifact's own files: the image decoded, resized
and normalised (preprocessor_config.json, else the family's statistics), the texts tokenised (the artifact's
tokenizer.json, else the random-weights placeholder `vlexport triton` wrote) and right-padded, the image
repeated once per text, the family's extra inputs added (``TaskSpec.run_inputs``, named in serve.json).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from vlexport.serve import py_common as common


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        from vlexport.models.host import load_ref
        from vlexport.runtime.tokenizer import JsonTokenizer

        meta = common.serve_json(args)
        self.directory = common.artifact_dir(args)
        self.image = common.image_settings(meta)
        # the artifact's tokenizer.json, or the placeholder `vlexport triton` wrote in its place (random
        # weights)
        self.tokenizer = JsonTokenizer(self.directory, meta.get("pad_token_id"))
        self.run_inputs = load_ref(meta["run_inputs"]) if meta.get("run_inputs") else (lambda feeds: feeds)
        self.max_texts = int(meta["max_batch_size"])
        self.limit = meta.get("token_limit")
        self.dtypes = {name: np.dtype(dtype) for name, dtype in meta["input_dtypes"].items()}

    def execute(self, requests: list[Any]) -> list[Any]:
        return common.answer(requests, self._one)

    def _one(self, request: Any) -> dict[str, np.ndarray]:
        pixels = common.decode_image(common.image_bytes(request), self.image)
        texts = common.strings(request, "TEXT", "text") or []
        if not texts:
            raise common.RequestError(
                "TEXT holds no text: send one or more strings to score against the image."
            )
        empty = [i for i, t in enumerate(texts) if not t.strip()]
        if empty:
            raise common.RequestError(
                f"TEXT element(s) {empty} are empty strings: every text must say something."
            )
        if self.max_texts and len(texts) > self.max_texts:
            raise common.RequestError(
                f"TEXT holds {len(texts)} texts; this model scores at most {self.max_texts} per "
                "request (--max-batch-size). Split the request."
            )
        ids, mask = self.tokenizer.batch(texts)
        if self.limit is not None and ids.shape[1] > self.limit:
            longest = int(mask.sum(1).argmax())
            raise common.RequestError(
                f"TEXT element {longest} is {ids.shape[1]} tokens, more than the model's "
                f"{self.limit} positions (max_position_embeddings). Shorten it."
            )
        feeds = self.run_inputs(
            {"input_ids": ids, "attention_mask": mask, "pixel_values": np.repeat(pixels, len(texts), axis=0)}
        )
        return {n: np.ascontiguousarray(feeds[n], dtype=dtype) for n, dtype in self.dtypes.items()}
