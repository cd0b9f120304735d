"""The exported decoder as a ``decode.DecodeStep``: KV cache carried between steps, HF's masks and positions.

Positions come from the attention mask (``cumsum - 1``, pads at 0, then +1 per step) as HF's
``_prepare_position_ids_for_generation`` does, so left padding behaves as in HF.

ONNX Runtime sessions run through IO binding: past and present key/values stay ORT values between steps (on
CUDA they never leave the GPU, on CPU they are not copied through numpy); beam reordering gathers them on the
host. Other components (AOTInductor packages, TensorRT engines) are callables on numpy dicts and get numpy.
Feeds take the dtypes the manifest records for the decoder's inputs, so an fp16 graph gets fp16 tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from vlexport.contracts.manifest import Component
from vlexport.errors import CheckError
from vlexport.models.host import past_name

# one decoder call: feeds in, (logits, present.* outputs) out
RunFeeds = Callable[[Mapping[str, Any]], tuple[np.ndarray, dict[str, Any]]]


def numpy_dtype(name: str) -> np.dtype:
    """The numpy dtype of a manifest dtype name ("float32", "float16", "int64", "bool", "bfloat16", ...)."""
    if name == "bfloat16":
        # numpy has no bfloat16; ml_dtypes (a dependency of onnx and jax) registers one with numpy.
        try:
            import ml_dtypes
        except ImportError:
            raise CheckError(
                "The artifact declares bfloat16 tensors, which numpy cannot hold, and ml_dtypes is not "
                "installed: the numpy runtime cannot feed bf16 graphs. `pip install ml_dtypes`, or "
                "export at fp32/fp16."
            ) from None
        return np.dtype(ml_dtypes.bfloat16)
    try:
        return np.dtype(name)
    except TypeError:
        raise CheckError(
            f"The manifest records tensor dtype {name!r}, which numpy does not know; the artifact "
            "is damaged or from a newer vlexport. Export it again."
        ) from None


def input_dtypes(spec: Component | None) -> dict[str, np.dtype]:
    """Declared dtype of every input of a manifest component (empty without a manifest entry)."""
    return {t.name: numpy_dtype(t.dtype) for t in spec.inputs} if spec is not None else {}


class DecoderSession:
    """One loaded decoder component, with the manifest entry that describes it."""

    def __init__(self, component: Any, spec: Component | None = None):
        self.component = component
        self.session = getattr(component, "session", None)  # an OnnxComponent's InferenceSession
        self.dtypes = input_dtypes(spec)
        if self.session is not None:
            self.input_names = [i.name for i in self.session.get_inputs()]
            self.output_names = [o.name for o in self.session.get_outputs()]
            shapes = {i.name: i.shape for i in self.session.get_inputs()}
            providers = self.session.get_providers()
            self.device = "cuda" if providers and providers[0] == "CUDAExecutionProvider" else "cpu"
        else:
            self.input_names = list(component.input_names)
            self.output_names = list(component.output_names)
            # Compiled backends do not report shapes: the manifest's record of the graph does.
            shapes = {t.name: t.shape for t in spec.inputs} if spec is not None else {}
            self.device = "cpu"
        self.past_names = [
            n for n in self.input_names if n.startswith("past_key_values.") and ".encoder." not in n
        ]
        self.past_shape = {n: shapes.get(n) for n in self.past_names}
        if not self.past_names:
            raise CheckError(
                "The decoder graph declares no past_key_values inputs: it was not exported by vlexport's "
                "generative export. Export the artifact again."
            )

    def cast(self, name: str, array: np.ndarray) -> np.ndarray:
        """``array`` in the dtype the graph declares for input ``name`` (fp16 graphs get fp16), contiguous."""
        dtype = self.dtypes.get(name)
        return np.ascontiguousarray(array if dtype is None else np.asarray(array).astype(dtype, copy=False))

    def constant(self, name: str, array: np.ndarray) -> Any:
        """A tensor fed unchanged to every step: on CUDA, copied to the device once."""
        array = self.cast(name, array)
        if self.session is not None and self.device == "cuda":
            import onnxruntime as ort

            return ort.OrtValue.ortvalue_from_numpy(array, "cuda", 0)
        return array

    def empty_past(self, batch: int) -> dict[str, Any]:
        """Past key/values of length 0 in the declared past dtype: the first step runs the same graph as the
        rest."""
        out = {}
        for name in self.past_names:
            shape = self.past_shape.get(name)
            if not shape or not isinstance(shape[1], int) or not isinstance(shape[3], int):
                raise CheckError(
                    f"decoder input {name} has shape {shape}; expected [batch, heads, past, head_dim] "
                    "with static heads and head_dim. Export the artifact again."
                )
            out[name] = np.zeros((batch, shape[1], 0, shape[3]), dtype=self.dtypes.get(name, np.float32))
        return out

    def take(self, value: Any, idx: np.ndarray) -> Any:
        """Rows ``idx`` of a past value (beam reordering), on the device it lives on."""
        if isinstance(value, np.ndarray):
            return np.take(value, idx, axis=0)
        import onnxruntime as ort

        return ort.OrtValue.ortvalue_from_numpy(np.take(value.numpy(), idx, axis=0), self.device, 0)

    def run(self, feeds: Mapping[str, Any]) -> tuple[np.ndarray, dict[str, Any]]:
        """One decoder call: logits (numpy, the graph's dtype) and the ``present.*`` outputs."""
        missing = [n for n in self.input_names if n not in feeds or feeds[n] is None]
        if missing:
            raise CheckError(
                f"The decoder graph expects inputs {missing} that this artifact's generation recipe does "
                "not provide: the manifest and the graph do not match. Export the artifact again."
            )
        if self.session is None:
            # Compiled backends may hand floats back upcast (AOTInductor returns float32): cast to what the
            # graph takes.
            out = self.component({n: self.cast(n, _numpy(feeds[n])) for n in self.input_names})
            return out["logits"], {k: v for k, v in out.items() if k.startswith("present.")}
        return StepBinding(self, {}).run(feeds)

    def binding(self, static: Mapping[str, Any]) -> StepBinding | None:
        """One request's IO binding with ``static`` (inputs fed unchanged at every step) bound once; None for
        compiled backends, which take numpy dicts."""
        return StepBinding(self, static) if self.session is not None else None

    def step(
        self,
        env: Mapping[str, Any],
        mask: np.ndarray,
        *,
        first_step: tuple[str, ...] = (),
        repeat: int = 1,
        run_next: RunFeeds | None = None,
    ) -> KVCacheStep:
        """A DecodeStep for one request: ``env`` holds the recipe stages' outputs, ``mask`` the decoder
        prompt's attention mask; ``repeat`` rows per sample (num_beams). ``run_next`` runs the steps after the
        prompt's (default: this session; serving batches them with other requests', runtime/batching.py)."""
        # Everything else the decoder declares comes from the stages, unchanged at every step (cross K/V,
        # ...).
        per_step = {"input_ids", "attention_mask", "position_ids", *self.past_names, *first_step}
        static = {}
        for k, v in env.items():
            name = past_name(k) if k.startswith("present.") else k
            if name in self.input_names and name not in per_step:
                static[name] = v
        first = {k: env[k] for k in first_step}
        return KVCacheStep(self, static, first, mask, repeat=repeat, run_next=run_next)


class StepBinding:
    """One ONNX Runtime IO binding kept for a request's whole decode.

    The inputs fed unchanged at every step (BLIP's cross-attention keys and values: 24 of its decoder's 53
    inputs, 42 MB a row at full size) are bound once; each step binds only its own inputs (ids, mask,
    positions, and the past: the previous step's ``present`` ORT values, never copied through numpy) and its
    outputs, which ORT allocates anew (its arena reuses the memory), so a past never aliases the present
    being written.
    """

    def __init__(self, session: DecoderSession, static: Mapping[str, Any]):
        self.session = session
        self.binding = session.session.io_binding()
        self.static = frozenset(static)
        self.keep: dict[str, np.ndarray] = {}  # bound numpy inputs: IO binding reads their buffers in place
        for name, value in static.items():
            self._bind(name, value)

    def _bind(self, name: str, value: Any) -> None:
        if isinstance(value, np.ndarray):
            value = self.session.cast(name, value)
            self.keep[name] = value
            self.binding.bind_cpu_input(name, value)
        else:
            self.keep.pop(name, None)
            self.binding.bind_ortvalue_input(name, value)

    def run(self, feeds: Mapping[str, Any]) -> tuple[np.ndarray, dict[str, Any]]:
        """One decoder call with ``feeds`` (inputs bound at construction may be left out)."""
        s = self.session
        missing = [n for n in s.input_names if n not in self.static and (n not in feeds or feeds[n] is None)]
        if missing:
            raise CheckError(
                f"The decoder graph expects inputs {missing} that this artifact's generation recipe does "
                "not provide: the manifest and the graph do not match. Export the artifact again."
            )
        for name in s.input_names:
            if name not in self.static:
                self._bind(name, feeds[name])
        for name in s.output_names:  # rebinding replaces last step's outputs, which the caller now holds
            self.binding.bind_output(name, "cpu" if name == "logits" else s.device)
        s.session.run_with_iobinding(self.binding)
        values = dict(zip(s.output_names, self.binding.get_outputs()))
        logits = values.pop("logits").numpy()
        return logits, values


class KVCacheStep:
    """Feeds the decoder step by step: grows the mask, advances positions, carries past key/values."""

    def __init__(
        self,
        session: DecoderSession,
        static: dict[str, np.ndarray],
        first: dict[str, np.ndarray],
        mask: np.ndarray,
        *,
        repeat: int = 1,
        run_next: RunFeeds | None = None,
    ):
        self.session = session
        rep = (lambda a: np.repeat(a, repeat, axis=0)) if repeat > 1 else (lambda a: a)
        # Beams of a sample share its encoder outputs (HF's _expand_inputs_for_generation: repeat_interleave).
        self.static = {k: session.constant(k, rep(v)) for k, v in static.items()}
        self.first_feeds = {k: session.cast(k, rep(v)) for k, v in first.items()}
        self.mask = rep(np.asarray(mask, dtype=np.int64))
        self.pos = self._positions()
        self.past: dict[str, Any] = {}
        # ONNX Runtime: one IO binding for the request, the static inputs bound once (StepBinding)
        binding = session.binding(self.static)
        self.run_own: RunFeeds = binding.run if binding is not None else session.run
        self.run_next = run_next or self.run_own

    def _positions(self) -> np.ndarray:
        pos = np.cumsum(self.mask, axis=1) - 1
        return np.where(self.mask == 0, 0, pos)

    def first(self, prompt_ids: np.ndarray) -> np.ndarray:
        self.pos = self._positions()
        self.past = self.session.empty_past(prompt_ids.shape[0])
        return self._run(prompt_ids.astype(np.int64, copy=False), self.first_feeds, self.pos, self.run_own)

    def next(self, tokens: np.ndarray) -> np.ndarray:
        self.mask = np.concatenate([self.mask, np.ones((self.mask.shape[0], 1), dtype=np.int64)], axis=1)
        self.pos = self.pos[:, -1:] + 1
        ids = tokens.reshape(-1, 1).astype(np.int64)
        later = {
            k: np.zeros((ids.shape[0], 1, *v.shape[2:]), dtype=v.dtype) for k, v in self.first_feeds.items()
        }
        return self._run(ids, later, self.pos, self.run_next)

    def reorder(self, beam_indices: np.ndarray) -> None:
        if not np.array_equal(beam_indices, np.arange(beam_indices.shape[0])):
            self.past = {k: self.session.take(v, beam_indices) for k, v in self.past.items()}

    def _run(
        self, ids: np.ndarray, extra: dict[str, np.ndarray], pos: np.ndarray, run: RunFeeds | None = None
    ) -> np.ndarray:
        feeds = {
            "input_ids": ids,
            "attention_mask": self.mask,
            "position_ids": pos,
            **extra,
            **self.static,
            **self.past,
        }
        logits, present = (run or self.run_own)(feeds)
        self.past = {past_name(k): v for k, v in present.items()}
        return logits[:, -1, :]


def _numpy(value: Any) -> np.ndarray:
    return value if isinstance(value, np.ndarray) else value.numpy()
