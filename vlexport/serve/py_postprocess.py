"""``--ensemble`` postprocessing: the encoder component's outputs -> the per-text scores `vlexport run`
prints.

The score reader is the task's own (models/scores.py), named in serve.json by `vlexport triton`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from vlexport.models.host import load_ref
from vlexport.serve import py_common as common


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        self.scores = load_ref(common.serve_json(args)["scores"])
        config = common.model_config(args)
        self.inputs = [t["name"] for t in config["input"]]
        self.outputs = [t["name"] for t in config["output"]]

    def execute(self, requests: list[Any]) -> list[Any]:
        return common.answer(requests, self._one)

    def _one(self, request: Any) -> dict[str, np.ndarray]:
        out = {n: common.tensor(request, n) for n in self.inputs}
        n = next(iter(out.values())).shape[0]
        scores = self.scores(out, n)
        return {k: np.ascontiguousarray(scores[k], dtype=np.float32).reshape(n) for k in self.outputs}
