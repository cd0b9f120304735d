"""Requests the tests (and benchmarks/triton_load.py) send: the same calls with tritonclient's http or
grpc."""

from __future__ import annotations

from typing import Any

import numpy as np


def image_bytes(seed: int, size: tuple[int, int] = (40, 52)) -> bytes:
    import io

    from PIL import Image

    rgb = (np.random.RandomState(seed).rand(size[0], size[1], 3) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def _module(client: Any) -> Any:
    from tritonclient import grpc, http

    return grpc if isinstance(client, grpc.InferenceServerClient) else http


def tensor(client: Any, name: str, array: np.ndarray, dtype: str) -> Any:
    t = _module(client).InferInput(name, list(array.shape), dtype)
    t.set_data_from_numpy(array)
    return t


def strings(*items: bytes | str) -> np.ndarray:
    return np.array([i.encode() if isinstance(i, str) else i for i in items], dtype=object)


def scores(client: Any, model: str, image: bytes, texts: list[str]) -> dict[str, np.ndarray]:
    """The ensemble's per-text scores for one image and its texts."""
    result = client.infer(
        model,
        [tensor(client, "IMAGE", strings(image), "BYTES"), tensor(client, "TEXT", strings(*texts), "BYTES")],
    )
    config = client.get_model_config(model)
    outputs = config.config.output if hasattr(config, "config") else config["output"]
    names = [o.name if hasattr(o, "name") else o["name"] for o in outputs]
    return {n: result.as_numpy(n) for n in names}


def generate(
    client: Any,
    model: str,
    image: bytes,
    text: str | None = None,
    *,
    num_beams: int | None = None,
    max_new_tokens: int | None = None,
    raw_prompt: bool = False,
) -> tuple[str, list[int]]:
    """(answer text, token ids) from a generation model."""
    inputs = [tensor(client, "IMAGE", strings(image), "BYTES")]
    if text is not None:
        inputs.append(tensor(client, "TEXT", strings(text), "BYTES"))
    if num_beams is not None:
        inputs.append(tensor(client, "NUM_BEAMS", np.array([num_beams], np.int32), "INT32"))
    if max_new_tokens is not None:
        inputs.append(tensor(client, "MAX_NEW_TOKENS", np.array([max_new_tokens], np.int32), "INT32"))
    if raw_prompt:
        inputs.append(tensor(client, "RAW_PROMPT", np.array([True]), "BOOL"))
    result = client.infer(model, inputs)
    return result.as_numpy("TEXT")[0].decode("utf-8"), result.as_numpy("TOKEN_IDS").tolist()
