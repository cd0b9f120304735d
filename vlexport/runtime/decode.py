"""Decode strategies with HF ``generate()`` semantics, over any step function (numpy only).

The strategies reproduce what transformers 5.2x does, so that the tokens are the same:
- greedy (``GenerationMixin._sample`` without sampling): argmax of the raw logits; rows that produced eos
  continue with pad; stop when every row is done or ``max_new_tokens`` were generated;
- beam search (``GenerationMixin._beam_search``): the vectorised implementation, ported line for line to
  numpy float32 (top ``2 * num_beams`` continuations, length penalty, ``early_stopping`` heuristics, cache
  reordering).
Logits are upcast to float32 first, as HF does (``outputs.logits[:, -1, :].to(torch.float32)``), so an fp16
decoder ranks its candidates the way the eager model's generate() does.

They know nothing of artifacts or ONNX Runtime: a ``DecodeStep`` gives logits for the last position of
every row; runtime/decoder_session.py implements it over an exported decoder with a KV cache, a test can
implement it with scripted logits.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

NEG = np.float32(-1.0e9)  # HF's "impossible" score in beam search


class DecodeStep(Protocol):
    """One decoder row per hypothesis (``batch * num_beams`` rows, the beams of a sample adjacent)."""

    def first(self, prompt_ids: np.ndarray) -> np.ndarray:
        """Run the prompt ``[rows, prompt_len]`` (int64); return the last position's logits ``[rows,
        vocab]``."""
        ...

    def next(self, tokens: np.ndarray) -> np.ndarray:
        """Append one token per row (``[rows]`` int64); return the new position's logits ``[rows, vocab]``."""
        ...

    def reorder(self, beam_indices: np.ndarray) -> None:
        """Row i continues from row ``beam_indices[i]`` (beam search only): the cache follows the beams."""
        ...


@dataclass(frozen=True)
class SearchSettings:
    """The generation settings the strategies follow (an artifact's ``manifest.generation``)."""

    eos_token_id: tuple[int, ...] = ()
    pad_token_id: int | None = None
    length_penalty: float = 1.0
    early_stopping: bool | str = False  # True, False or "never", as in GenerationConfig

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> SearchSettings:
        return cls(
            tuple(int(e) for e in settings.get("eos_token_id") or ()),
            settings.get("pad_token_id"),
            float(settings.get("length_penalty", 1.0)),
            settings.get("early_stopping", False),
        )


@dataclass
class Decoded:
    sequences: np.ndarray  # [batch, prompt + new tokens]
    logits: list[np.ndarray] = field(default_factory=list)  # per step, float32 [rows, vocab] (output_logits)
    beam_margins: list[np.ndarray] = field(default_factory=list)  # per step, [batch] (beam, output_logits)


OnStep = Callable[[int], None]


def _float32_logits(logits: np.ndarray) -> np.ndarray:
    return np.asarray(logits).astype(np.float32, copy=False)


def _suppress_eos(scores: np.ndarray, eos: np.ndarray, new_tokens: int, min_new_tokens: int) -> np.ndarray:
    # MinNewTokensLengthLogitsProcessor: no eos before min_new_tokens new tokens.
    if new_tokens < min_new_tokens and eos.size:
        scores = scores.copy()
        scores[:, eos] = -np.inf
    return scores


# ---------------------------------------------------------------- greedy (GenerationMixin._sample)
def greedy_search(
    step: DecodeStep,
    prompt: np.ndarray,
    settings: SearchSettings,
    *,
    max_new_tokens: int,
    min_new_tokens: int = 0,
    output_logits: bool = False,
    on_step: OnStep | None = None,
) -> Decoded:
    """Greedy decoding of ``prompt`` ``[batch, prompt_len]``; ``on_step(i)`` when step i's logits are
    ready."""
    eos = np.array(settings.eos_token_id, dtype=np.int64)
    pad = settings.pad_token_id
    pad = pad if pad is not None else (int(eos[0]) if eos.size else None)  # HF: pad defaults to eos[0]
    out = Decoded(prompt)
    seqs = prompt
    unfinished = np.ones(prompt.shape[0], dtype=bool)
    logits = _float32_logits(step.first(prompt))
    for i in range(max_new_tokens):
        if on_step is not None:
            on_step(i)
        if output_logits:
            out.logits.append(logits)
        tokens = _suppress_eos(logits, eos, i, min_new_tokens).argmax(-1)
        if eos.size:
            tokens = np.where(unfinished, tokens, pad)
            unfinished &= ~np.isin(tokens, eos)
        seqs = np.concatenate([seqs, tokens[:, None]], axis=1)
        if i == max_new_tokens - 1 or not unfinished.any():
            break
        logits = _float32_logits(step.next(tokens))
    out.sequences = seqs
    return out


# ---------------------------------------------------------------- beam search (GenerationMixin._beam_search)
def beam_search(
    step: DecodeStep,
    prompt: np.ndarray,
    settings: SearchSettings,
    *,
    num_beams: int,
    max_new_tokens: int,
    min_new_tokens: int = 0,
    output_logits: bool = False,
    on_step: OnStep | None = None,
) -> Decoded:
    """Beam search over ``prompt`` ``[batch, prompt_len]``; the step sees ``batch * num_beams`` rows.

    With ``output_logits``, also the raw logits and each step's ``selection_margin`` (near-tie reporting).
    """
    k = num_beams
    b, prompt_len = prompt.shape
    cur_len, max_length = prompt_len, prompt_len + max_new_tokens
    length_penalty = float(settings.length_penalty)
    early_stopping = settings.early_stopping
    eos = np.array(settings.eos_token_id, dtype=np.int64)
    n_eos = int(eos.size)
    keep = max(2, 1 + n_eos) * k
    top_num_beam_mask = np.arange(keep) < k
    # HF: `pad_token_id or eos_token_id[0] if eos_token_id is not None else -1` (a pad of 0 is falsy).
    pad = settings.pad_token_id
    fill = (pad if pad else int(eos[0])) if n_eos else -1
    out = Decoded(prompt)

    running_sequences = np.full((b, k, max_length), fill, dtype=np.int64)
    running_sequences[:, :, :prompt_len] = prompt[:, None, :]
    sequences = running_sequences.copy()
    running_scores = np.zeros((b, k), dtype=np.float32)
    running_scores[:, 1:] = NEG
    beam_scores = np.full((b, k), NEG, dtype=np.float32)
    is_finished = np.zeros((b, k), dtype=bool)
    heuristic_unsatisfied = np.ones((b, 1), dtype=bool)
    running_beam_indices = np.full((b, k, max_new_tokens), -1, dtype=np.int32)
    beam_indices = running_beam_indices.copy()

    # HF's _expand_inputs_for_generation: the beams of a sample are adjacent rows (repeat_interleave).
    logits = _float32_logits(step.first(np.repeat(prompt, k, axis=0)))
    i = 0
    while True:
        if on_step is not None:
            on_step(i)
        if output_logits:
            out.logits.append(logits)
        vocab = logits.shape[-1]
        log_probs = _suppress_eos(_log_softmax(logits), eos, cur_len - prompt_len, min_new_tokens)
        log_probs = (log_probs.reshape(b, k, vocab) + running_scores[:, :, None]).reshape(b, k * vocab)

        # c. top-K continuations over all beams
        topk_idx = _topk(log_probs, keep)
        topk_log_probs = np.take_along_axis(log_probs, topk_idx, axis=1)
        if output_logits:
            out.beam_margins.append(selection_margin(log_probs, keep))
        topk_beam = topk_idx // vocab
        topk_running_beam_indices = _gather(running_beam_indices, topk_beam)
        topk_running_sequences = _gather(running_sequences, topk_beam)
        topk_ids = topk_idx % vocab
        topk_running_sequences[:, :, cur_len] = topk_ids
        topk_running_beam_indices[:, :, cur_len - prompt_len] = topk_beam + np.arange(b)[:, None] * k

        # d. stopping criteria of each continuation: eos, or max length reached
        hits = np.isin(topk_ids, eos) | (cur_len + 1 >= max_length)

        # e. running beams for the next step: the best that did not finish
        topk_running_log_probs = topk_log_probs + hits.astype(np.float32) * NEG
        nxt = _topk(topk_running_log_probs, k)
        running_sequences = _gather(topk_running_sequences, nxt)
        running_scores = np.take_along_axis(topk_running_log_probs, nxt, axis=1)
        running_beam_indices = _gather(topk_running_beam_indices, nxt)

        # f. finished hypotheses: merge in the new ones with a better score
        just_finished = hits & top_num_beam_mask[None, :]
        scores = topk_log_probs / np.float32((cur_len + 1 - prompt_len) ** length_penalty)
        full = np.all(is_finished, axis=-1, keepdims=True) & (early_stopping is True)
        scores = scores + full.astype(np.float32) * NEG
        scores = scores + (~heuristic_unsatisfied).astype(np.float32) * NEG
        scores = scores + (~just_finished).astype(np.float32) * NEG
        merged_scores = np.concatenate([beam_scores, scores], axis=1)
        top = _topk(merged_scores, k)
        sequences = _gather(np.concatenate([sequences, topk_running_sequences], axis=1), top)
        beam_scores = np.take_along_axis(merged_scores, top, axis=1)
        beam_indices = _gather(np.concatenate([beam_indices, topk_running_beam_indices], axis=1), top)
        is_finished = np.take_along_axis(np.concatenate([is_finished, just_finished], axis=1), top, axis=1)

        # g. cache follows the surviving beams; stopping condition of the search as a whole
        beam_idx = running_beam_indices[:, :, cur_len - prompt_len].reshape(-1)
        cur_len += 1
        if early_stopping == "never" and length_penalty > 0.0:
            best_len = max_length - prompt_len
        else:
            best_len = cur_len - prompt_len
        best_possible = running_scores[:, :1] / np.float32(best_len**length_penalty)
        worst_finished = np.where(is_finished, beam_scores.min(axis=1, keepdims=True), NEG)
        heuristic_unsatisfied = heuristic_unsatisfied & np.any(
            best_possible > worst_finished, axis=-1, keepdims=True
        )
        unfinished = (
            heuristic_unsatisfied.any()
            and not (is_finished.all() and early_stopping is True)
            and not hits.all()
        )
        if not unfinished:
            break
        step.reorder(beam_idx)
        logits = _float32_logits(step.next(running_sequences[:, :, cur_len - 1].reshape(-1)))
        i += 1

    best = sequences[:, 0, :]
    generated = int((beam_indices[:, 0, :] + 1).astype(bool).sum(axis=1).max())
    out.sequences = best[:, : prompt_len + generated]
    return out


def selection_margin(log_probs: np.ndarray, keep: int) -> np.ndarray:
    """Per batch row: the smallest gap between adjacent scores among the best ``keep + 1`` candidates.

    ``log_probs`` is ``[batch, beams * vocab]``, the running scores plus each continuation's log-probability.
    Their ranking decides which hypotheses continue and in which row order; candidates closer than the
    two runs' numerical error may rank either way (a near-tie), after which rows hold other hypotheses.
    Less the float32 rounding of scores that size (both runs add in float32). Scores at ``NEG`` (beams not
    yet opened) are never selected and are left out; a row without two candidates has margin inf.
    """
    top = np.take_along_axis(log_probs, _topk(log_probs, min(keep + 1, log_probs.shape[1])), axis=1)
    top = np.where(top > NEG / 2, top, np.nan)
    gaps = top[:, :-1] - top[:, 1:] - 2 * np.spacing(np.abs(top[:, :-1]).astype(np.float32))
    return np.where(np.isnan(gaps), np.inf, gaps).min(axis=1)


def search(
    step: DecodeStep,
    prompt: np.ndarray,
    settings: SearchSettings,
    *,
    num_beams: int = 1,
    max_new_tokens: int,
    min_new_tokens: int = 0,
    output_logits: bool = False,
    on_step: OnStep | None = None,
) -> Decoded:
    """Greedy for ``num_beams == 1``, beam search otherwise (what ``generate(do_sample=False)`` picks)."""
    common: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "min_new_tokens": min_new_tokens,
        "output_logits": output_logits,
        "on_step": on_step,
    }
    if num_beams == 1:
        return greedy_search(step, prompt, settings, **common)
    return beam_search(step, prompt, settings, num_beams=num_beams, **common)


# ---------------------------------------------------------------- small numpy ports of torch ops
def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float32, copy=False)
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True, dtype=np.float32))


def _topk(x: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest per row, largest first (torch.topk); ties keep the lower index first."""
    part = (
        np.argpartition(-x, k - 1, axis=-1)[:, :k]
        if k < x.shape[-1]
        else np.tile(np.arange(x.shape[-1]), (x.shape[0], 1))
    )
    vals = np.take_along_axis(x, part, axis=-1)
    order = np.lexsort((part, -vals), axis=-1)
    return np.take_along_axis(part, order, axis=-1)


def _gather(x: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """HF ``_gather_beams``: x [batch, beams, ...] indexed by idx [batch, n] along the beam dim."""
    while idx.ndim < x.ndim:
        idx = idx[..., None]
    return np.take_along_axis(x, np.broadcast_to(idx, (*idx.shape[:2], *x.shape[2:])), axis=1)
