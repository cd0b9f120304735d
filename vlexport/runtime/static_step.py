"""A static-KV-cache decoder package (export/static_cache.py) as a ``decode.DecodeStep``.

The caches are ``max_length`` slots per layer, allocated once per row count and updated in place by the
package; the step writes the prompt at slots ``0..P-1`` and token ``i`` at slot ``P + i``, marks the slot
in the ``[rows, max_length]`` mask and advances positions from the mask (``cumsum - 1``, pads at 0, as
runtime/decoder_session.py and HF do). Beam search reorders the cache rows in place. Tensors stay torch
tensors on the package's device between steps; only the last position's logits come back to numpy.

With CUDA graphs (``--mode reduce-overhead`` packages on a GPU), each decode call (one new token) is
captured once per input shapes (row count, encoder length) and replayed: the caches and the mask are the
graph's own buffers (persistent per row count), the other inputs are copied into its input buffers.
The prompt runs outside the graph (its length varies).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from vlexport.contracts.manifest import Component
from vlexport.errors import CheckError, UsageError
from vlexport.models.host import past_name

CACHE_POSITION = "cache_position"
META_STATIC = "vlexport.static_cache"  # package metadata: {"max_length", "max_batch", "cuda_graphs"} as JSON


def is_static_decoder(component: Any) -> bool:
    return CACHE_POSITION in getattr(component, "input_names", ())


def _torch_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise CheckError(
            f"The manifest records tensor dtype {name!r}, which torch does not know. Compile again."
        )
    return dtype


class StaticDecoderSession:
    """One loaded static-cache decoder package, its limits and its per-row-count cache buffers."""

    def __init__(self, component: Any, spec: Component | None):
        if spec is None:
            raise CheckError("The manifest has no entry for the decoder package; compile the artifact again.")
        self.component = component
        self.input_names = list(component.input_names)
        self.device = torch.device(getattr(component, "device", "cpu"))
        info = json.loads((getattr(component, "metadata", None) or {}).get(META_STATIC, "{}") or "{}")
        shapes = {t.name: t.shape for t in spec.inputs}
        self.dtypes = {t.name: _torch_dtype(t.dtype) for t in spec.inputs}
        self.cache_names = [n for n in self.input_names if n.startswith("cache.")]
        if not self.cache_names or not all(isinstance(d, int) for d in shapes[self.cache_names[0]][1:]):
            raise CheckError(
                "The decoder package declares no static cache inputs [batch, heads, slots, head_dim]; "
                "compile the artifact again."
            )
        self.cache_shape = tuple(shapes[self.cache_names[0]][1:])  # heads, slots, head_dim
        self.max_length = int(info.get("max_length", self.cache_shape[1]))
        self.max_batch = int(info.get("max_batch", 1 << 30))
        self._buffers: dict[int, dict[str, torch.Tensor]] = {}
        call = component.call_tensors
        self.graphs = CudaGraphs(call) if info.get("cuda_graphs") and self.device.type == "cuda" else None
        self.call: Callable[..., Sequence[torch.Tensor]] = call

    def check_request(self, rows: int, prompt_length: int, max_new_tokens: int) -> None:
        """Fail before any work when the request does not fit the compiled limits."""
        if prompt_length + max_new_tokens > self.max_length:
            raise UsageError(
                f"The decoder prompt is {prompt_length} tokens and {max_new_tokens} new tokens are asked "
                "for: "
                f"{prompt_length + max_new_tokens} positions, more than this package's static cache of "
                f"{self.max_length} (--max-length at compile time). Shorten the prompt, lower "
                "--max-new-tokens, "
                "or compile again with a larger --max-length."
            )
        if rows > self.max_batch:
            raise UsageError(
                f"This request needs {rows} decoder rows (batch x beams), more than the {self.max_batch} the "
                "package "
                "was compiled for (--max-batch at compile time). Lower the batch or the beams, or compile "
                "again "
                "with a larger --max-batch."
            )

    def buffers(self, rows: int) -> dict[str, torch.Tensor]:
        """The caches and slot mask for ``rows`` rows, zeroed: allocated once per row count and reused."""
        bufs = self._buffers.get(rows)
        if bufs is None:
            bufs = {
                n: torch.zeros((rows, *self.cache_shape), dtype=self.dtypes[n], device=self.device)
                for n in self.cache_names
            }
            bufs["attention_mask"] = torch.zeros(
                (rows, self.max_length), dtype=torch.int64, device=self.device
            )
            self._buffers[rows] = bufs
        for t in bufs.values():
            t.zero_()
        return bufs

    def tensor(self, name: str, array: Any) -> torch.Tensor:
        """``array`` as a contiguous tensor on the package's device, in the dtype the package declares."""
        t = array if isinstance(array, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(array))
        return t.to(self.device, self.dtypes.get(name, t.dtype)).contiguous()

    def run(self, feeds: Mapping[str, torch.Tensor], persistent: set[str]) -> torch.Tensor:
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise CheckError(
                f"The decoder package expects inputs {missing} that this artifact's generation recipe "
                "does not provide: the manifest and the package do not match. Compile again."
            )
        tensors = [feeds[n] for n in self.input_names]
        with torch.no_grad():
            if self.graphs is not None and feeds["input_ids"].shape[1] == 1:
                return self.graphs(tensors, {i for i, n in enumerate(self.input_names) if n in persistent})
            return self.call(*tensors)[0]

    def step(
        self, env: Mapping[str, Any], mask: np.ndarray, *, first_step: tuple[str, ...] = (), repeat: int = 1
    ) -> StaticCacheStep:
        """A DecodeStep for one request (same contract as decoder_session.DecoderSession.step)."""
        per_step = {
            "input_ids",
            "attention_mask",
            "position_ids",
            CACHE_POSITION,
            *self.cache_names,
            *first_step,
        }
        static = {}
        for k, v in env.items():
            name = past_name(k) if k.startswith("present.") else k
            if name in self.input_names and name not in per_step:
                static[name] = v
        return StaticCacheStep(self, static, {k: env[k] for k in first_step}, mask, repeat=repeat)


class StaticCacheStep:
    """Feeds the package step by step: slots, mask, positions; the caches stay on the device."""

    def __init__(
        self,
        session: StaticDecoderSession,
        static: dict[str, Any],
        first: dict[str, Any],
        mask: np.ndarray,
        *,
        repeat: int = 1,
    ):
        self.session = session
        rep = (lambda a: np.repeat(np.asarray(a), repeat, axis=0)) if repeat > 1 else np.asarray
        # Beams of a sample share its encoder outputs (HF's _expand_inputs_for_generation: repeat_interleave).
        self.static = {k: session.tensor(k, rep(v)) for k, v in static.items()}
        self.first_feeds = {k: session.tensor(k, rep(v)) for k, v in first.items()}
        self.later = {
            k: torch.zeros((v.shape[0], 1, *v.shape[2:]), dtype=v.dtype, device=v.device)
            for k, v in self.first_feeds.items()
        }
        self.prompt_mask = rep(np.asarray(mask, dtype=np.int64))
        self.rows = self.prompt_mask.shape[0]
        self.bufs = session.buffers(self.rows)
        self.length = 0
        self.last_pos = torch.zeros((self.rows, 1), dtype=torch.int64, device=session.device)

    def first(self, prompt_ids: np.ndarray) -> np.ndarray:
        n = prompt_ids.shape[1]
        if n > self.session.max_length:
            raise UsageError(
                f"The decoder prompt is {n} tokens, more than the package's {self.session.max_length} "
                "cache slots (--max-length). Shorten the prompt or compile with a larger --max-length."
            )
        mask = self.bufs["attention_mask"]
        mask.zero_()
        mask[:, :n] = torch.from_numpy(self.prompt_mask[:, :n])
        pos = np.cumsum(self.prompt_mask, axis=1) - 1
        pos = torch.from_numpy(np.where(self.prompt_mask == 0, 0, pos)).to(self.session.device)
        self.last_pos = pos[:, -1:].clone()
        self.length = n
        slots = torch.arange(n, device=self.session.device)
        return self._run(torch.from_numpy(prompt_ids.astype(np.int64)), self.first_feeds, pos, slots)

    def next(self, tokens: np.ndarray) -> np.ndarray:
        slot = self.length
        if slot >= self.session.max_length:
            raise UsageError(
                f"Generation reached the package's {self.session.max_length} cache slots "
                "(--max-length at compile time): lower --max-new-tokens or compile again."
            )
        self.bufs["attention_mask"][:, slot] = 1
        self.last_pos += 1
        self.length += 1
        ids = torch.from_numpy(np.asarray(tokens, dtype=np.int64).reshape(-1, 1))
        return self._run(ids, self.later, self.last_pos, torch.tensor([slot], device=self.session.device))

    def reorder(self, beam_indices: np.ndarray) -> None:
        if np.array_equal(beam_indices, np.arange(beam_indices.shape[0])):
            return
        idx = torch.from_numpy(np.asarray(beam_indices, dtype=np.int64)).to(self.session.device)
        for t in self.bufs.values():  # in place: CUDA graphs keep reading the same buffers
            t.copy_(t.index_select(0, idx))
        self.last_pos = self.last_pos.index_select(0, idx)

    def _run(
        self, ids: torch.Tensor, extra: Mapping[str, torch.Tensor], pos: torch.Tensor, slots: torch.Tensor
    ) -> np.ndarray:
        s = self.session
        feeds = {
            "input_ids": s.tensor("input_ids", ids),
            "position_ids": s.tensor("position_ids", pos),
            CACHE_POSITION: s.tensor(CACHE_POSITION, slots),
            **extra,
            **self.static,
            **self.bufs,
        }
        logits = s.run(feeds, persistent=set(self.bufs))
        return logits[:, -1, :].float().cpu().numpy()


class CudaGraphs:
    """``call(*tensors)`` captured in a CUDA graph per input signature and replayed (reduce-overhead).

    ``persistent`` inputs (the caches, the mask) are used as they are, so their addresses must not change
    between calls of one signature (StaticDecoderSession.buffers keeps them per row count); the others are
    copied into the graph's input buffers before each replay.
    """

    def __init__(self, call: Callable[..., Sequence[torch.Tensor]]):
        self.call = call
        self.entries: dict[tuple, tuple[Any, list[torch.Tensor], Sequence[torch.Tensor]]] = {}

    def __call__(self, tensors: list[torch.Tensor], persistent: set[int]) -> torch.Tensor:
        key = tuple(
            (tuple(t.shape), t.dtype, t.data_ptr() if i in persistent else 0) for i, t in enumerate(tensors)
        )
        entry = self.entries.get(key)
        if entry is None:
            bufs = [t if i in persistent else t.clone() for i, t in enumerate(tensors)]
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(
                side
            ):  # warm-up off the capture stream; it writes this step's slot, as the replay will
                self.call(*bufs)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = self.call(*bufs)
            entry = self.entries[key] = (graph, bufs, out)
        graph, bufs, out = entry
        for i, t in enumerate(tensors):
            if i not in persistent:
                bufs[i].copy_(t)
        graph.replay()
        return out[0]
