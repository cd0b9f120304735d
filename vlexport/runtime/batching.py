"""In-flight batching of generation: the decode steps of concurrent requests run as one decoder call.

Each request runs its own decode strategy (runtime/decode.py, unchanged) in its own thread, and its prompt
step alone, as `vlexport run` does. Every later step goes through a ``StepBatcher``: it waits until each
request in the decode loop has posted its next step (or left), then runs all of them as one call of the
decoder (rows stacked; past key/values of different lengths left-padded to the longest, the attention mask 0
over the padding, positions from each request's own mask) and hands each request its rows back with the
padding stripped. Requests join at any step boundary and leave when their search ends, so a short request
is answered when it finishes, not when the longest of its batch does. Rows (requests x beams) are bounded by
``max_rows``: a request that does not fit waits, in arrival order, until rows are free (one larger than the
bound runs when it is alone); nothing is dropped.

Decoders without an attention mask and position ids as inputs (T5) batch only requests whose caches have the
same length. Numerics: a request alone runs exactly the call `vlexport run` makes. Batched, ONNX Runtime
computes the same rows with other matrix shapes (more rows, masked padding columns), which may round float32
sums differently in the last bits; only a near-tie between the two best tokens could then rank the other way
(see the validator's near-tie rule, validate/generation.py).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Self

import numpy as np

from vlexport.models.host import past_name
from vlexport.runtime.decoder_session import DecoderSession, KVCacheStep


@dataclass
class _Post:
    feeds: dict[str, np.ndarray]
    result: tuple[np.ndarray, dict[str, Any]] | BaseException | None = None


class StepBatcher:
    """Batches the decode steps of the requests that run over one decoder session (thread-safe)."""

    def __init__(self, session: DecoderSession, max_rows: int):
        self.session = session
        self.max_rows = max(1, int(max_rows))
        # Inputs whose axis grows with the past, left-padded to stack caches of different lengths: sound only
        # where the mask hides the padding and positions are inputs (BLIP, OPT). A decoder without them
        # (T5: relative position buckets from key indices, no self-attention mask) stacks only requests whose
        # caches have the same length: the past's full shape is then part of the grouping key.
        names = set(session.input_names)
        explicit = {"attention_mask", "position_ids"} <= names
        self._padded = {*session.past_names, "attention_mask"} if explicit else set()
        self._cv = threading.Condition()
        self._used = 0  # rows held by admitted requests
        self._waiting: deque[Member] = deque()  # requests waiting for rows, in arrival order
        self._active: set[Member] = set()  # requests in their decode loop (posted at least one step)
        self._posted: dict[Member, _Post] = {}
        self._thread: threading.Thread | None = None
        self._closed = False
        self._stacks: dict[str, tuple[tuple[np.ndarray, ...], np.ndarray]] = {}  # name -> last step's stack
        # decoder calls run, the rows they held (rows / calls: the mean batch) and the most rows in one call
        self.calls = self.rows = self.peak_rows = 0

    def member(self) -> Member:
        """One request's handle: ``with batcher.member() as m: generator.generate(..., decoder=m)``."""
        return Member(self)

    def close(self) -> None:
        """Stop: requests waiting for rows or for a step get an error instead of waiting forever."""
        with self._cv:
            self._closed = True
            for post in self._posted.values():
                post.result = RuntimeError("the generation model is shutting down")
            self._posted.clear()
            self._cv.notify_all()

    # ------------------------------------------------------------ rows
    def _admit(self, member: Member, rows: int) -> None:
        with self._cv:
            self._waiting.append(member)
            while not (
                self._waiting[0] is member and (self._used == 0 or self._used + rows <= self.max_rows)
            ):
                if self._closed:
                    self._waiting.remove(member)
                    raise RuntimeError("the generation model is shutting down")
                self._cv.wait()
            self._waiting.popleft()
            self._used += rows
            member.rows = rows
            self._cv.notify_all()

    def _leave(self, member: Member) -> None:
        with self._cv:
            self._used -= member.rows
            member.rows = 0
            self._active.discard(member)
            self._posted.pop(member, None)
            self._cv.notify_all()  # the others may now be all posted, and rows are free

    # ------------------------------------------------------------ steps
    def _post(self, member: Member, feeds: Mapping[str, Any]) -> tuple[np.ndarray, dict[str, Any]]:
        post = _Post({k: _numpy(v) for k, v in feeds.items()})
        with self._cv:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="step-batcher", daemon=True)
                self._thread.start()
            if self._closed:
                raise RuntimeError("the generation model is shutting down")
            self._active.add(member)
            self._posted[member] = post
            self._cv.notify_all()
            while post.result is None:
                self._cv.wait()
        if isinstance(post.result, BaseException):
            raise post.result
        return post.result

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not (self._posted and len(self._posted) == len(self._active)):
                    if self._closed:
                        return
                    self._cv.wait()
                batch = list(self._posted.values())
                self._posted.clear()
            results = self._run(batch)  # outside the lock: requests join and leave meanwhile
            with self._cv:
                for post, result in zip(batch, results):
                    post.result = result
                self._cv.notify_all()

    def _run(self, batch: list[_Post]) -> list[Any]:
        groups: dict[tuple, list[int]] = {}
        for i, post in enumerate(batch):  # only feeds of the same shapes (but the past) stack
            key = tuple(
                (n, v.shape[1:], v.dtype.str) for n, v in sorted(post.feeds.items()) if n not in self._padded
            )
            groups.setdefault(key, []).append(i)
        results: list[Any] = [None] * len(batch)
        for members in groups.values():
            try:
                outs = self._call([batch[i].feeds for i in members])
            except BaseException as e:  # noqa: BLE001  each request of the call gets the error
                outs = [e] * len(members)
            for i, out in zip(members, outs):
                results[i] = out
        return results

    def _call(self, feeds: list[dict[str, np.ndarray]]) -> list[tuple[np.ndarray, dict[str, Any]]]:
        self.calls += 1
        rows = [f["input_ids"].shape[0] for f in feeds]
        self.rows += sum(rows)
        self.peak_rows = max(self.peak_rows, sum(rows))
        if len(feeds) == 1:  # alone: the very call `vlexport run` makes
            return [self.session.run(feeds[0])]
        first = self.session.past_names[0]
        past = [f[first].shape[2] for f in feeds]
        longest = max(past)
        stacked = {}
        for name in feeds[0]:
            arrays = [f[name] for f in feeds]
            if name in self._padded:
                axis = 1 if name == "attention_mask" else 2
                stacked[name] = _left_padded_stack(arrays, [longest - p for p in past], axis)
            else:
                stacked[name] = self._stack(name, arrays)
        logits, present = self.session.run(stacked)
        present = {k: _numpy(v) for k, v in present.items()}
        out = []
        start = 0
        for n, p in zip(rows, past):
            rows_of = slice(start, start + n)
            mine = {}
            for k, v in present.items():
                v = v[rows_of]
                mine[k] = v[:, :, longest - p :] if past_name(k) in self._padded else v
            out.append((logits[rows_of], mine))
            start += n
        return out

    def _stack(self, name: str, arrays: list[np.ndarray]) -> np.ndarray:
        """``arrays`` stacked; the same arrays as last step (a request's inputs fed unchanged at every step,
        e.g. BLIP's cross-attention keys and values: 42 MB a row at full size) reuse last step's stack."""
        last = self._stacks.get(name)
        if last is not None and len(last[0]) == len(arrays) and all(a is b for a, b in zip(last[0], arrays)):
            return last[1]
        out = np.concatenate(arrays, axis=0)
        self._stacks[name] = (tuple(arrays), out)  # holds the arrays: their ids cannot be reused meanwhile
        return out


class Member:
    """One request's place in a ``StepBatcher``: makes its decode step and holds its rows until it leaves."""

    def __init__(self, batcher: StepBatcher):
        self.batcher = batcher
        self.rows = 0

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.batcher._leave(self)

    def step(
        self, env: Mapping[str, Any], mask: np.ndarray, *, first_step: tuple[str, ...] = (), repeat: int = 1
    ) -> KVCacheStep:
        """``DecoderSession.step``'s DecodeStep, once the request's rows are admitted; its steps after the
        prompt's run batched."""
        self.batcher._admit(self, int(np.shape(mask)[0]) * repeat)
        return self.batcher.session.step(env, mask, first_step=first_step, repeat=repeat, run_next=self._run)

    def _run(self, feeds: Mapping[str, Any]) -> tuple[np.ndarray, dict[str, Any]]:
        return self.batcher._post(self, feeds)


def _left_padded_stack(arrays: list[np.ndarray], pads: list[int], axis: int) -> np.ndarray:
    """``arrays`` left-padded with ``pads`` zeros along ``axis`` and stacked on the rows (axis 0), written
    once into one buffer: padding each past and then concatenating copied every KV cache twice per step."""
    shape = list(arrays[0].shape)
    shape[0] = sum(a.shape[0] for a in arrays)
    shape[axis] = arrays[0].shape[axis] + pads[0]
    out = np.zeros(shape, dtype=arrays[0].dtype)  # calloc'd: the padding costs no write
    start = 0
    for array, pad in zip(arrays, pads):
        index = [slice(None)] * array.ndim
        index[0], index[axis] = slice(start, start + array.shape[0]), slice(pad, None)
        out[tuple(index)] = array
        start += array.shape[0]
    return out


def _numpy(value: Any) -> np.ndarray:
    return value if isinstance(value, np.ndarray) else value.numpy()
