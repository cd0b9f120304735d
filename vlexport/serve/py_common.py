"""What every python-backend model of a vlexport repository shares: its folder, its settings, error replies.

Runs inside tritonserver's python stub; ``triton_python_backend_utils`` exists only there (imported lazily).
Like every module a python model imports, it is copied into the repository (triton_repo ``SERVING_SOURCES``)
and imports only numpy, pillow, tokenizers, onnxruntime and the other copied modules.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from vlexport.contracts.manifest import Manifest
from vlexport.errors import VlexportError


def pb() -> Any:
    import triton_python_backend_utils

    return triton_python_backend_utils


def version_dir(args: Mapping[str, str]) -> Path:
    return Path(args["model_repository"]) / str(args["model_version"])


def model_config(args: Mapping[str, str]) -> dict[str, Any]:
    return json.loads(args["model_config"])


def parameters(args: Mapping[str, str]) -> dict[str, str]:
    return {k: v.get("string_value", "") for k, v in model_config(args).get("parameters", {}).items()}


ARTIFACT_DIR = "artifact"  # inside a python model's version folder: the artifact's manifest and support files
SERVE_JSON = "serve.json"  # inside a python model's version folder: what the model needs to know


def serve_json(args: Mapping[str, str]) -> dict[str, Any]:
    return json.loads((version_dir(args) / SERVE_JSON).read_text())


class _CopiedManifest(Manifest):
    """The artifact's manifest as copied into a python model: its component files live in other models."""

    def check_files(self, directory: Path) -> None:
        pass


def artifact_dir(args: Mapping[str, str]) -> Path:
    return version_dir(args) / ARTIFACT_DIR


def read_manifest(directory: Path) -> Manifest:
    return _CopiedManifest.read(directory)


def tensor(request: Any, name: str) -> np.ndarray | None:
    t = pb().get_input_tensor_by_name(request, name)
    return None if t is None else t.as_numpy()


def strings(request: Any, name: str, what: str) -> list[str] | None:
    """A TYPE_STRING input as Python strings (UTF-8); None when the request does not carry it."""
    value = tensor(request, name)
    if value is None:
        return None
    out = []
    for item in value.reshape(-1):
        try:
            out.append(item.decode("utf-8") if isinstance(item, bytes) else str(item))
        except UnicodeDecodeError:
            raise RequestError(
                f"{name} must hold UTF-8 {what}; element {len(out)} is not valid UTF-8."
            ) from None
    return out


def image_bytes(request: Any) -> bytes:
    value = tensor(request, "IMAGE")
    if value is None or value.size != 1:
        raise RequestError(
            f"IMAGE must hold exactly one encoded image (JPEG, PNG, ... bytes); got "
            f"{0 if value is None else value.size} element(s)."
        )
    data = value.reshape(-1)[0]
    if not isinstance(data, bytes) or not data:
        raise RequestError("IMAGE is empty: send the encoded image file's bytes (JPEG, PNG, ...).")
    return data


class RequestError(Exception):
    """A request this model cannot answer; its message goes back to the client as the Triton error."""


def answer(requests: list[Any], handle: Callable[[Any], Mapping[str, np.ndarray]]) -> list[Any]:
    """One response per request: ``handle``'s tensors, or a Triton error with the reason (the model keeps
    serving)."""
    return [response(request, handle) for request in requests]


def response(request: Any, handle: Callable[[Any], Mapping[str, np.ndarray]]) -> Any:
    """``handle(request)``'s tensors as an InferenceResponse, or the error that stopped it."""
    utils = pb()
    try:
        outputs = handle(request)
        return utils.InferenceResponse(output_tensors=[utils.Tensor(k, v) for k, v in outputs.items()])
    except (RequestError, VlexportError) as e:
        return utils.InferenceResponse(error=utils.TritonError(str(e)))
    except Exception as e:  # noqa: BLE001  a bug must fail this request, not the model instance
        return utils.InferenceResponse(error=utils.TritonError(f"{type(e).__name__}: {e}"))


def image_settings(meta: Mapping[str, Any]) -> Any:
    """The artifact's image settings as `vlexport triton` resolved them (preprocessor_config.json or the
    family's)."""
    from vlexport.runtime.preprocess import ImageSettings

    d = meta["image"]
    return ImageSettings(
        int(d["size"]),
        tuple(d["mean"]),
        tuple(d["std"]),
        float(d["rescale"]),
        int(d["resample"]),
        d["source"],
    )


def decode_image(data: bytes, settings: Any) -> np.ndarray:
    """``[1, 3, size, size]`` pixels from encoded image bytes, by the same code as `vlexport run`
    (load_image)."""
    import tempfile

    from vlexport.runtime.preprocess import load_image

    with tempfile.NamedTemporaryFile(suffix=".img") as f:
        f.write(data)
        f.flush()
        try:
            return load_image(f.name, settings)
        except VlexportError as e:
            raise RequestError(
                str(e).replace(f"Image {f.name}", "IMAGE").replace(f"image {f.name}", "IMAGE")
            ) from None
