"""``--backend python-onnxruntime``: one artifact component (an ONNX file) run by ONNX Runtime in a python
model.

For servers without Triton's ORT backend (the nvidia-pytriton build has only the python backend). Requests
are run one by one, never concatenated: each answer is what ONNX Runtime gives for that request alone,
which is what the artifact was validated with.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from vlexport.serve import py_common as common


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        from vlexport.runtime.onnx_session import OnnxComponent, available_providers

        params = common.parameters(args)
        path = common.version_dir(args) / params.get("model_file", "model.onnx")
        device = params.get("device", "cpu")
        self.component = OnnxComponent(
            path,
            providers=available_providers("auto" if device == "gpu" else "cpu"),
            spin=False,  # threads must not spin on the cores the server and other models' runs share
        )
        config = common.model_config(args)
        self.outputs = [o["name"] for o in config["output"]]

    def execute(self, requests: list[Any]) -> list[Any]:
        return common.answer(requests, self._one)

    def _one(self, request: Any) -> dict[str, np.ndarray]:
        feeds = {n: common.tensor(request, n) for n in self.component.input_names}
        missing = [n for n, v in feeds.items() if v is None]
        if missing:
            raise common.RequestError(
                f"missing input(s) {missing}; this model takes {self.component.input_names}."
            )
        out = self.component(feeds)
        return {n: out[n] for n in self.outputs}
