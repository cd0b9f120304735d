"""Generation on an artifact: encoders once, then a KV-cache decode loop with HF ``generate()`` semantics.

The loop reproduces what transformers 5.23 does for these models, so that the tokens are the same:
- greedy (``_sample`` without sampling): argmax of the raw logits; rows that produced eos continue with
  pad; stop when every row is done or ``max_new_tokens`` were generated;
- beam search (``_beam_search``): the vectorised implementation, ported line for line to numpy float32
  (top ``2 * num_beams`` continuations, length penalty, ``early_stopping`` heuristics, cache reordering);
- positions from the attention mask (``cumsum - 1``, pads at 0, then +1 per step) and the mask inferred
  from pad tokens when none is given, as ``_prepare_position_ids_for_generation`` /
  ``_prepare_attention_mask_for_generation`` do; left padding therefore behaves as in HF.
The task's recipe (models/generative.py) says what the model's own ``generate()`` does before that.

Past and present key/values stay ONNX Runtime values between steps (IO binding): on CUDA they never
leave the GPU, on CPU they are not copied through numpy. Beam reordering gathers them on the host.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vlexport.errors import CheckError, UsageError
from vlexport.models.generative import GenerationRecipe, past_name

_NEG = np.float32(-1.0e9)  # HF's "impossible" score in beam search


@dataclass
class GenerationOutput:
    sequences: np.ndarray  # [batch, decoder prompt + new tokens], what HF generate() returns
    prompt_length: int  # decoder prompt length: sequences[:, prompt_length:] are the new tokens
    logits: list[np.ndarray] = field(default_factory=list)  # raw logits per step, [batch * beams, vocab]
    # beam search, with output_logits: per step and batch row, the smallest gap between the ranked candidate
    # scores that decide which hypotheses run next, and in which row order ([batch]); see _selection_margin
    beam_margins: list[np.ndarray] = field(default_factory=list)

    @property
    def new_tokens(self) -> np.ndarray:
        return self.sequences[:, self.prompt_length:]


def artifact_config(directory: Path) -> Any:
    """The HF config copy of an artifact (recipes depend on it, e.g. BLIP-2 with OPT or T5)."""
    from transformers import AutoConfig

    path = Path(directory) / "config.json"
    if not path.is_file():
        raise CheckError(f"{directory} has no config.json; the artifact is incomplete, export it again.")
    d = json.loads(path.read_text())
    model_type = d.pop("model_type", None)
    if model_type is None:
        raise CheckError(f"{path} has no model_type; the artifact is damaged, export it again.")
    return AutoConfig.for_model(model_type, **d)


class Generator:
    """An artifact directory as a generator: ``generate(pixel_values, input_ids, attention_mask, ...)``.

    Same call and result as the eager model's ``generate()`` for the task (token ids in, token ids out);
    text in / text out lives in runtime/run.py.
    """

    def __init__(self, artifact: Any, config: Any | None = None):
        task = artifact.task_spec
        if not task.generative or task.generation is None:
            raise UsageError(f"{artifact.directory} holds a {artifact.manifest.task!r} artifact, which does not "
                             "generate text; `vlexport run` prints its scores instead.")
        self.artifact = artifact
        self.config = config if config is not None else artifact_config(artifact.directory)
        self.recipe: GenerationRecipe = task.generation(self.config)
        self.settings: dict[str, Any] = dict(artifact.manifest.generation)
        if not self.settings:
            raise CheckError(f"{artifact.directory}/manifest.json has no generation settings; export it again.")
        needed = [s for s in self.recipe.stages if isinstance(s, str)] + ["decoder"]
        missing = [n for n in needed if n not in artifact.components]
        if missing:
            raise CheckError(f"{artifact.directory} lacks component(s) {missing} that {artifact.manifest.family} "
                             f"{artifact.manifest.task} generation needs (has {sorted(artifact.components)}); "
                             "the manifest does not describe a complete artifact. Export it again.")
        check_components_match_manifest(artifact)
        self.decoder = _DecoderRunner(artifact.components["decoder"])
        eos = self.settings["eos_token_id"]
        pad = self.settings["pad_token_id"]
        self.eos = np.array(eos, dtype=np.int64)
        self.pad = pad if pad is not None else (eos[0] if eos else None)  # HF: pad defaults to eos[0]

    # ------------------------------------------------------------ public
    def generate(self, pixel_values: np.ndarray, input_ids: np.ndarray | None = None,
                 attention_mask: np.ndarray | None = None, *, max_new_tokens: int = 20, num_beams: int = 1,
                 min_new_tokens: int = 0, output_logits: bool = False,
                 on_step: Callable[[int], None] | None = None) -> GenerationOutput:
        """Greedy (``num_beams=1``) or beam search; ``on_step(i)`` is called when step i's logits are ready."""
        self._check_request(pixel_values, input_ids, max_new_tokens, num_beams, min_new_tokens)
        env = self.encode(pixel_values, input_ids, attention_mask)
        return self.decode(env, max_new_tokens=max_new_tokens, num_beams=num_beams, min_new_tokens=min_new_tokens,
                           output_logits=output_logits, on_step=on_step)

    def encode(self, pixel_values: np.ndarray, input_ids: np.ndarray | None = None,
               attention_mask: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Run the recipe's stages (encoders and prompt rules) once per request."""
        env: dict[str, Any] = {"pixel_values": np.ascontiguousarray(pixel_values, dtype=np.float32)}
        if input_ids is not None:
            env["input_ids"] = np.asarray(input_ids, dtype=np.int64)
        if attention_mask is not None:
            env["attention_mask"] = np.asarray(attention_mask, dtype=np.int64)
        for stage in self.recipe.stages:
            if isinstance(stage, str):
                component = self.artifact.components[stage]
                names = getattr(component, "input_names", None) or [n for n in env]
                lacking = [n for n in names if n not in env]
                if lacking:
                    raise UsageError(f"{stage} needs {lacking}: the {self.artifact.manifest.task} task needs a text "
                                     "prompt (--text) besides the image.")
                env.update(component({n: env[n] for n in names}))
            else:
                env.update(stage(env, self.settings))
        return env

    def decode(self, env: Mapping[str, Any], *, max_new_tokens: int, num_beams: int = 1, min_new_tokens: int = 0,
               output_logits: bool = False, on_step: Callable[[int], None] | None = None) -> GenerationOutput:
        prompt = env["decoder_input_ids"].astype(np.int64)
        mask = env.get("decoder_attention_mask")
        max_pos = self.settings.get("max_positions")
        if max_pos is not None and prompt.shape[1] + max_new_tokens > max_pos:
            raise UsageError(
                f"The prompt is {prompt.shape[1]} tokens and {max_new_tokens} new tokens are asked for: "
                f"{prompt.shape[1] + max_new_tokens} positions, more than the model's {max_pos} "
                "(max_position_embeddings). Shorten the prompt or lower --max-new-tokens.")
        if prompt.shape[1] == 0:
            raise UsageError("The decoder prompt is empty: give at least one token besides the special ones.")
        if mask is None:
            mask = self._default_mask(prompt)
        # Everything else the decoder declares comes from the stages, unchanged at every step (cross K/V, ...).
        per_step = {"input_ids", "attention_mask", "position_ids", *self.decoder.past_names, *self.recipe.first_step}
        static = {}
        for k, v in env.items():
            name = past_name(k) if k.startswith("present.") else k
            if name in self.decoder.input_names and name not in per_step:
                static[name] = v
        first = {k: env[k] for k in self.recipe.first_step}
        stepper = _Stepper(self.decoder, static, first, mask.astype(np.int64), repeat=num_beams)
        logits_log: list[np.ndarray] | None = [] if output_logits else None
        margins: list[np.ndarray] = []
        if num_beams == 1:
            seqs = self._greedy(stepper, prompt, max_new_tokens, min_new_tokens, logits_log, on_step)
        else:
            seqs = self._beam(stepper, prompt, num_beams, max_new_tokens, min_new_tokens, logits_log, on_step,
                              margins if output_logits else None)
        return GenerationOutput(seqs, prompt.shape[1], logits_log or [], margins)

    # ------------------------------------------------------------ checks
    def _check_request(self, pixel_values: np.ndarray, input_ids: np.ndarray | None, max_new_tokens: int,
                       num_beams: int, min_new_tokens: int) -> None:
        if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens <= 0:
            raise UsageError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}.")
        if not isinstance(num_beams, (int, np.integer)) or num_beams < 1:
            raise UsageError(f"num_beams must be an integer >= 1, got {num_beams!r}.")
        if min_new_tokens < 0:
            raise UsageError(f"min_new_tokens must be >= 0, got {min_new_tokens!r}.")
        if pixel_values.ndim != 4:
            raise UsageError(f"pixel_values must be [batch, channels, height, width], got shape {pixel_values.shape}.")
        size = self.artifact.manifest.image_size
        if size is not None and tuple(pixel_values.shape[2:]) != (size, size):
            raise UsageError(f"The artifact takes {size}x{size} images; got {pixel_values.shape[2]}x"
                             f"{pixel_values.shape[3]}. Resize to the manifest's image_size.")
        if input_ids is None and self.recipe.needs_prompt:
            raise UsageError(f"{self.artifact.manifest.family} {self.artifact.manifest.task} needs a text prompt "
                             "(--text): the model generates an answer to it.")
        max_pos = self.settings.get("max_positions")
        if input_ids is not None:
            if input_ids.ndim != 2 or input_ids.shape[0] != pixel_values.shape[0]:
                raise UsageError(f"input_ids must be [batch, sequence] with the images' batch "
                                 f"{pixel_values.shape[0]}; got shape {tuple(input_ids.shape)}.")
            if max_pos is not None and input_ids.shape[1] > max_pos:
                raise UsageError(f"The prompt is {input_ids.shape[1]} tokens, longer than the model's "
                                 f"{max_pos} positions (max_position_embeddings). Shorten the prompt.")

    def _default_mask(self, ids: np.ndarray) -> np.ndarray:
        """HF's mask when none is given: ones, unless pad occurs in the prompt and pad is not an eos token."""
        pad = self.settings["pad_token_id"]
        if pad is not None and (ids == pad).any() and not np.isin(self.eos, [pad]).any():
            return (ids != pad).astype(np.int64)
        return np.ones_like(ids)

    def _suppress_eos(self, scores: np.ndarray, new_tokens: int, min_new_tokens: int) -> np.ndarray:
        # MinNewTokensLengthLogitsProcessor: no eos before min_new_tokens new tokens.
        if new_tokens < min_new_tokens and self.eos.size:
            scores = scores.copy()
            scores[:, self.eos] = -np.inf
        return scores

    # ------------------------------------------------------------ greedy (GenerationMixin._sample)
    def _greedy(self, stepper: _Stepper, prompt: np.ndarray, max_new: int, min_new: int,
                logits_log: list[np.ndarray] | None, on_step: Callable[[int], None] | None) -> np.ndarray:
        seqs = prompt
        unfinished = np.ones(prompt.shape[0], dtype=bool)
        logits = stepper.first(prompt)
        for step in range(max_new):
            if on_step is not None:
                on_step(step)
            if logits_log is not None:
                logits_log.append(logits)
            tokens = self._suppress_eos(logits, step, min_new).argmax(-1)
            if self.eos.size:
                tokens = np.where(unfinished, tokens, self.pad)
                unfinished &= ~np.isin(tokens, self.eos)
            seqs = np.concatenate([seqs, tokens[:, None]], axis=1)
            if step == max_new - 1 or not unfinished.any():
                break
            logits = stepper.next(tokens)
        return seqs

    # ------------------------------------------------------------ beam search (GenerationMixin._beam_search)
    def _beam(self, stepper: _Stepper, prompt: np.ndarray, k: int, max_new: int, min_new: int,
              logits_log: list[np.ndarray] | None, on_step: Callable[[int], None] | None,
              margins_log: list[np.ndarray] | None = None) -> np.ndarray:
        b, prompt_len = prompt.shape
        cur_len, max_length = prompt_len, prompt_len + max_new
        length_penalty = float(self.settings.get("length_penalty", 1.0))
        early_stopping = self.settings.get("early_stopping", False)
        n_eos = int(self.eos.size)
        keep = max(2, 1 + n_eos) * k
        top_num_beam_mask = np.arange(keep) < k
        # HF: `pad_token_id or eos_token_id[0] if eos_token_id is not None else -1` (a pad of 0 is falsy).
        pad = self.settings["pad_token_id"]
        fill = (pad if pad else int(self.eos[0])) if n_eos else -1

        running_sequences = np.full((b, k, max_length), fill, dtype=np.int64)
        running_sequences[:, :, :prompt_len] = prompt[:, None, :]
        sequences = running_sequences.copy()
        running_scores = np.zeros((b, k), dtype=np.float32)
        running_scores[:, 1:] = _NEG
        beam_scores = np.full((b, k), _NEG, dtype=np.float32)
        is_finished = np.zeros((b, k), dtype=bool)
        heuristic_unsatisfied = np.ones((b, 1), dtype=bool)
        running_beam_indices = np.full((b, k, max_new), -1, dtype=np.int32)
        beam_indices = running_beam_indices.copy()

        logits = stepper.first(np.repeat(prompt, k, axis=0))
        step = 0
        while True:
            if on_step is not None:
                on_step(step)
            if logits_log is not None:
                logits_log.append(logits)
            vocab = logits.shape[-1]
            log_probs = _log_softmax(logits)
            log_probs = self._suppress_eos(log_probs, cur_len - prompt_len, min_new)
            log_probs = (log_probs.reshape(b, k, vocab) + running_scores[:, :, None]).reshape(b, k * vocab)

            # c. top-K continuations over all beams
            topk_idx = _topk(log_probs, keep)
            topk_log_probs = np.take_along_axis(log_probs, topk_idx, axis=1)
            if margins_log is not None:
                margins_log.append(_selection_margin(log_probs, keep))
            topk_beam = topk_idx // vocab
            topk_running_beam_indices = _gather(running_beam_indices, topk_beam)
            topk_running_sequences = _gather(running_sequences, topk_beam)
            topk_ids = topk_idx % vocab
            topk_running_sequences[:, :, cur_len] = topk_ids
            topk_running_beam_indices[:, :, cur_len - prompt_len] = topk_beam + np.arange(b)[:, None] * k

            # d. stopping criteria of each continuation: eos, or max length reached
            hits = np.isin(topk_ids, self.eos) | (cur_len + 1 >= max_length)

            # e. running beams for the next step: the best that did not finish
            topk_running_log_probs = topk_log_probs + hits.astype(np.float32) * _NEG
            nxt = _topk(topk_running_log_probs, k)
            running_sequences = _gather(topk_running_sequences, nxt)
            running_scores = np.take_along_axis(topk_running_log_probs, nxt, axis=1)
            running_beam_indices = _gather(topk_running_beam_indices, nxt)

            # f. finished hypotheses: merge in the new ones with a better score
            just_finished = hits & top_num_beam_mask[None, :]
            scores = topk_log_probs / np.float32((cur_len + 1 - prompt_len) ** length_penalty)
            full = np.all(is_finished, axis=-1, keepdims=True) & (early_stopping is True)
            scores = scores + full.astype(np.float32) * _NEG
            scores = scores + (~heuristic_unsatisfied).astype(np.float32) * _NEG
            scores = scores + (~just_finished).astype(np.float32) * _NEG
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
            best_possible = running_scores[:, :1] / np.float32(best_len ** length_penalty)
            worst_finished = np.where(is_finished, beam_scores.min(axis=1, keepdims=True), _NEG)
            heuristic_unsatisfied = heuristic_unsatisfied & np.any(best_possible > worst_finished, axis=-1,
                                                                   keepdims=True)
            unfinished = (heuristic_unsatisfied.any() and not (is_finished.all() and early_stopping is True)
                          and not hits.all())
            if not unfinished:
                break
            stepper.reorder(beam_idx)
            logits = stepper.next(running_sequences[:, :, cur_len - 1].reshape(-1))
            step += 1

        best = sequences[:, 0, :]
        generated = int((beam_indices[:, 0, :] + 1).astype(bool).sum(axis=1).max())
        return best[:, : prompt_len + generated]


# ---------------------------------------------------------------- decoder stepping
class _Stepper:
    """Feeds the decoder step by step: grows the mask, advances positions, carries past key/values."""

    def __init__(self, decoder: _DecoderRunner, static: dict[str, np.ndarray], first: dict[str, np.ndarray],
                 mask: np.ndarray, *, repeat: int):
        self.decoder = decoder
        rep = (lambda a: np.repeat(a, repeat, axis=0)) if repeat > 1 else (lambda a: a)
        # Beams of a sample share its encoder outputs (HF's _expand_inputs_for_generation: repeat_interleave).
        self.static = {k: decoder.constant(rep(v)) for k, v in static.items()}
        self.first_feeds = {k: rep(v) for k, v in first.items()}
        self.mask = rep(mask)
        self.past: dict[str, Any] = {}

    def _positions(self) -> np.ndarray:
        pos = np.cumsum(self.mask, axis=1) - 1
        return np.where(self.mask == 0, 0, pos)

    def first(self, ids: np.ndarray) -> np.ndarray:
        n = ids.shape[0]
        self.pos = self._positions()
        self.past = self.decoder.empty_past(n)
        return self._run(ids, self.first_feeds, self.pos)

    def next(self, tokens: np.ndarray) -> np.ndarray:
        self.mask = np.concatenate([self.mask, np.ones((self.mask.shape[0], 1), dtype=np.int64)], axis=1)
        self.pos = self.pos[:, -1:] + 1
        ids = tokens.reshape(-1, 1).astype(np.int64)
        later = {k: np.zeros((ids.shape[0], 1, *v.shape[2:]), dtype=v.dtype) for k, v in self.first_feeds.items()}
        return self._run(ids, later, self.pos)

    def reorder(self, idx: np.ndarray) -> None:
        if not np.array_equal(idx, np.arange(idx.shape[0])):
            self.past = {k: self.decoder.take(v, idx) for k, v in self.past.items()}

    def _run(self, ids: np.ndarray, extra: dict[str, np.ndarray], pos: np.ndarray) -> np.ndarray:
        feeds = {"input_ids": ids, "attention_mask": self.mask, "position_ids": pos, **extra, **self.static,
                 **self.past}
        logits, present = self.decoder.run(feeds)
        self.past = {past_name(k): v for k, v in present.items()}
        return logits[:, -1, :]


class _DecoderRunner:
    """One decoder session. ONNX Runtime sessions run through IO binding, so present key/values come back as
    ORT values on the session's device and go straight back in as the next past; other backends (callables
    on numpy dicts) get numpy."""

    def __init__(self, component: Any):
        self.component = component
        self.session = getattr(component, "session", None)
        if self.session is not None:
            self.input_names = [i.name for i in self.session.get_inputs()]
            self.output_names = [o.name for o in self.session.get_outputs()]
            shapes = {i.name: i.shape for i in self.session.get_inputs()}
            providers = self.session.get_providers()
            self.device = "cuda" if providers and providers[0] == "CUDAExecutionProvider" else "cpu"
        else:
            self.input_names = list(component.input_names)
            self.output_names = list(component.output_names)
            shapes = {}
            self.device = "cpu"
        self.past_names = [n for n in self.input_names if n.startswith("past_key_values.") and ".encoder." not in n]
        self.past_shape = {n: shapes.get(n) for n in self.past_names}
        if not self.past_names:
            raise CheckError("The decoder graph declares no past_key_values inputs: it was not exported by vlexport's "
                             "generative export. Export the artifact again.")

    def constant(self, array: np.ndarray) -> Any:
        """A tensor fed unchanged to every step: on CUDA, copied to the device once."""
        if self.session is not None and self.device == "cuda":
            import onnxruntime as ort

            return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), "cuda", 0)
        return np.ascontiguousarray(array)

    def empty_past(self, batch: int) -> dict[str, Any]:
        """Past key/values of length 0: the first step runs the same graph as every other."""
        out = {}
        for name in self.past_names:
            shape = self.past_shape.get(name)
            if not shape or not isinstance(shape[1], int) or not isinstance(shape[3], int):
                raise CheckError(f"decoder input {name} has shape {shape}; expected [batch, heads, past, head_dim] "
                                 "with static heads and head_dim. Export the artifact again.")
            out[name] = np.zeros((batch, shape[1], 0, shape[3]), dtype=np.float32)
        return out

    def take(self, value: Any, idx: np.ndarray) -> Any:
        if isinstance(value, np.ndarray):
            return np.take(value, idx, axis=0)
        import onnxruntime as ort

        return ort.OrtValue.ortvalue_from_numpy(np.take(value.numpy(), idx, axis=0), self.device, 0)

    def run(self, feeds: Mapping[str, Any]) -> tuple[np.ndarray, dict[str, Any]]:
        missing = [n for n in self.input_names if n not in feeds or feeds[n] is None]
        if missing:
            raise CheckError(f"The decoder graph expects inputs {missing} that this artifact's generation recipe does "
                             "not provide: the manifest and the graph do not match. Export the artifact again.")
        if self.session is None:
            out = self.component({n: _numpy(feeds[n]) for n in self.input_names})
            return out["logits"], {k: v for k, v in out.items() if k.startswith("present.")}
        binding = self.session.io_binding()
        keep = []  # numpy inputs must outlive the run: IO binding reads their buffers in place
        for name in self.input_names:
            value = feeds[name]
            if isinstance(value, np.ndarray):
                value = np.ascontiguousarray(value)
                keep.append(value)
                binding.bind_cpu_input(name, value)
            else:
                binding.bind_ortvalue_input(name, value)
        for name in self.output_names:
            binding.bind_output(name, "cpu" if name == "logits" else self.device)
        self.session.run_with_iobinding(binding)
        values = dict(zip(self.output_names, binding.get_outputs()))
        logits = values.pop("logits").numpy()
        return logits, values


def _numpy(value: Any) -> np.ndarray:
    return value if isinstance(value, np.ndarray) else value.numpy()


# ---------------------------------------------------------------- small numpy ports of torch ops
def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float32, copy=False)
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True, dtype=np.float32))


def _topk(x: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest per row, largest first (torch.topk); ties keep the lower index first."""
    part = np.argpartition(-x, k - 1, axis=-1)[:, :k] if k < x.shape[-1] else np.tile(np.arange(x.shape[-1]),
                                                                                        (x.shape[0], 1))
    vals = np.take_along_axis(x, part, axis=-1)
    order = np.lexsort((part, -vals), axis=-1)
    return np.take_along_axis(part, order, axis=-1)


def _selection_margin(log_probs: np.ndarray, keep: int) -> np.ndarray:
    """Per batch row: the smallest gap between adjacent scores among the best ``keep + 1`` candidates.

    Their ranking decides which hypotheses continue and in which row order; candidates closer than the
    two runs' numerical error may rank either way (a near-tie), after which rows hold other hypotheses.
    Less the float32 rounding of scores that size (both runs add in float32). Scores at _NEG (beams not
    yet opened) are never selected and are left out.
    """
    top = np.take_along_axis(log_probs, _topk(log_probs, min(keep + 1, log_probs.shape[1])), axis=1)
    top = np.where(top > _NEG / 2, top, np.nan)
    gaps = top[:, :-1] - top[:, 1:] - 2 * np.spacing(np.abs(top[:, :-1]).astype(np.float32))
    return np.where(np.isnan(gaps), np.inf, gaps).min(axis=1)


def _gather(x: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """HF ``_gather_beams``: x [batch, beams, ...] indexed by idx [batch, n] along the beam dim."""
    while idx.ndim < x.ndim:
        idx = idx[..., None]
    return np.take_along_axis(x, np.broadcast_to(idx, (*idx.shape[:2], *x.shape[2:])), axis=1)


def check_components_match_manifest(artifact: Any) -> None:
    """Every loaded graph must declare the inputs/outputs its manifest entry records (swapped files fail here)."""
    for name, comp in artifact.manifest.components.items():
        loaded = artifact.components.get(name)
        if loaded is None or not hasattr(loaded, "input_names"):
            continue
        recorded_in = {t.name for t in comp.inputs}
        recorded_out = [t.name for t in comp.outputs]
        got_in, got_out = set(loaded.input_names), list(loaded.output_names)
        if not got_in <= recorded_in or got_out != recorded_out:
            raise CheckError(
                f"{artifact.directory}: component {name!r} ({comp.file}) declares inputs {sorted(got_in)} and outputs "
                f"{got_out}, but the manifest records {sorted(recorded_in)} and {recorded_out}: the manifest does not "
                "match its files. Export the artifact again.")
