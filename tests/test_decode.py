"""Decode strategies (runtime/decode.py) driven without any artifact, and the runtime's dtype handling.

- scripted steps: logits are a function of each row's tokens so far, tokens checked against hand-worked
  greedy and beam search results;
- a tiny random GPT-2 behind the step protocol (with its own KV cache), against HF ``generate()``: batch 2
  with left padding, greedy and beam, so the numpy port of ``_beam_search`` is checked without ONNX;
- fp16: a fake artifact whose manifest declares fp16 graphs gets fp16 feeds (pixels, cache, encoder states),
  and fp16 logits rank as their float32 upcast.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from vlexport.contracts.manifest import Component, Manifest, TensorSpec
from vlexport.errors import CheckError
from vlexport.models.generative import GenerationRecipe
from vlexport.runtime.decode import SearchSettings, beam_search, greedy_search, search
from vlexport.runtime.decoder_session import DecoderSession, numpy_dtype
from vlexport.runtime.generate import Generator


class ScriptedStep:
    """A DecodeStep whose logits for a row are ``script(tokens of that row so far)``; rows follow
    reorder()."""

    def __init__(self, script: Callable[[tuple[int, ...]], np.ndarray], dtype: type = np.float32):
        self.script, self.dtype = script, dtype
        self.rows: list[tuple[int, ...]] = []
        self.fed: list[list[int]] = []  # tokens given to next(), per call

    def _logits(self) -> np.ndarray:
        return np.stack([self.script(r) for r in self.rows]).astype(self.dtype)

    def first(self, prompt_ids: np.ndarray) -> np.ndarray:
        self.rows = [tuple(int(t) for t in r) for r in prompt_ids]
        return self._logits()

    def next(self, tokens: np.ndarray) -> np.ndarray:
        self.fed.append(tokens.tolist())
        self.rows = [r + (int(t),) for r, t in zip(self.rows, tokens)]
        return self._logits()

    def reorder(self, beam_indices: np.ndarray) -> None:
        self.rows = [self.rows[i] for i in beam_indices]


def _count_up(row: tuple[int, ...]) -> np.ndarray:
    """Vocab 5, eos 4: the next token is the last one + 1 (mod 5), by a wide margin."""
    logits = np.zeros(5, np.float32)
    logits[(row[-1] + 1) % 5] = 5.0
    return logits


GREEDY = SearchSettings(eos_token_id=(4,), pad_token_id=0)


def test_greedy_pads_finished_rows_and_stops_when_all_are_done() -> None:
    step = ScriptedStep(_count_up)
    out = greedy_search(step, np.array([[1], [2]]), GREEDY, max_new_tokens=10)
    # Row 1 reaches eos a step earlier and continues with pad, as HF does; then every row is done.
    np.testing.assert_array_equal(out.sequences, [[1, 2, 3, 4], [2, 3, 4, 0]])
    # the finished row's eos is fed like any token; no step after the last
    assert step.fed == [
        [2, 3],
        [3, 4],
    ]
    assert out.logits == [] and out.beam_margins == []


def test_greedy_min_new_tokens_suppresses_eos_and_max_new_tokens_stops() -> None:
    out = greedy_search(
        ScriptedStep(_count_up),
        np.array([[1], [2]]),
        GREEDY,
        max_new_tokens=5,
        min_new_tokens=4,
        output_logits=True,
    )
    # eos (4) is -inf for the first 4 new tokens: argmax falls to token 0 (the first of the tied zeros).
    np.testing.assert_array_equal(out.sequences, [[1, 2, 3, 0, 1, 2], [2, 3, 0, 1, 2, 3]])
    assert len(out.logits) == 5 and all(x.dtype == np.float32 and x.shape == (2, 5) for x in out.logits)


def _detour(row: tuple[int, ...]) -> np.ndarray:
    """Vocab 4, eos 3, prompt (0,): greedy takes 1 (p=.5) then 0 (p=.4): .2 in all; beam search finds 2 then
    eos (.4 * .9 = .36)."""
    p = {(0,): [0.05, 0.5, 0.4, 0.05], (0, 1): [0.4, 0.3, 0.2, 0.1], (0, 2): [0.04, 0.03, 0.03, 0.9]}
    return np.log(np.array(p.get(row, [0.25] * 4), np.float32))


BEAM = SearchSettings(eos_token_id=(3,), pad_token_id=0)


def test_beam_search_finds_the_better_hypothesis_greedy_misses() -> None:
    prompt = np.array([[0]])
    np.testing.assert_array_equal(
        greedy_search(ScriptedStep(_detour), prompt, BEAM, max_new_tokens=2).sequences, [[0, 1, 0]]
    )
    step = ScriptedStep(_detour)
    out = beam_search(step, prompt, BEAM, num_beams=2, max_new_tokens=2, output_logits=True)
    np.testing.assert_array_equal(out.sequences, [[0, 2, 3]])
    assert step.fed == [[1, 2]]  # both rows continue from beam 0 (reorder), with the two best first tokens
    assert [x.shape for x in out.logits] == [(2, 4), (2, 4)] and len(out.beam_margins) == 2
    # search() picks the strategy as generate(do_sample=False) does.
    np.testing.assert_array_equal(
        search(ScriptedStep(_detour), prompt, BEAM, num_beams=2, max_new_tokens=2).sequences, out.sequences
    )


def test_beam_margins_report_a_near_tie_of_the_ranked_candidates() -> None:
    def tied(row: tuple[int, ...]) -> np.ndarray:
        return np.log(np.array([0.1, 0.35, 0.35 * (1 + 1e-7), 0.2], np.float32))

    out = beam_search(
        ScriptedStep(tied), np.array([[0]]), BEAM, num_beams=2, max_new_tokens=1, output_logits=True
    )
    assert out.beam_margins[0].shape == (1,) and out.beam_margins[0][0] < 1e-6

    def apart(row: tuple[int, ...]) -> np.ndarray:
        return np.log(np.array([0.05, 0.5, 0.3, 0.15], np.float32))

    out = beam_search(
        ScriptedStep(apart), np.array([[0]]), BEAM, num_beams=2, max_new_tokens=1, output_logits=True
    )
    assert abs(out.beam_margins[0][0] - np.log(0.5 / 0.3)) < 1e-5  # the closest pair: .5 vs .3


def test_fp16_logits_are_upcast_before_ranking() -> None:
    prompt = np.array([[0]])
    ref = beam_search(ScriptedStep(_detour), prompt, BEAM, num_beams=2, max_new_tokens=2, output_logits=True)
    half = beam_search(
        ScriptedStep(_detour, np.float16), prompt, BEAM, num_beams=2, max_new_tokens=2, output_logits=True
    )
    np.testing.assert_array_equal(half.sequences, ref.sequences)
    assert all(x.dtype == np.float32 for x in half.logits)


# ---------------------------------------------------------------- against HF generate() on a tiny torch model
class TorchStep:
    """A tiny HF causal LM behind the step protocol, fed the way runtime/decoder_session.py feeds a graph."""

    def __init__(self, model: torch.nn.Module, mask: np.ndarray, repeat: int):
        self.model = model
        self.mask = torch.from_numpy(np.repeat(mask, repeat, axis=0))
        self.cache = None

    def _run(self, ids: np.ndarray, pos: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            out = self.model(
                input_ids=torch.from_numpy(ids),
                attention_mask=self.mask,
                position_ids=pos,
                cache=self.cache,
                use_cache=True,
            )
        self.cache, self.pos = out.cache, pos[:, -1:]
        return out.logits[:, -1].float().numpy()

    def first(self, prompt_ids: np.ndarray) -> np.ndarray:
        pos = (self.mask.cumsum(1) - 1).masked_fill(self.mask == 0, 0)
        return self._run(prompt_ids, pos)

    def next(self, tokens: np.ndarray) -> np.ndarray:
        self.mask = torch.cat([self.mask, torch.ones(self.mask.shape[0], 1, dtype=self.mask.dtype)], dim=1)
        return self._run(tokens.reshape(-1, 1).astype(np.int64), self.pos + 1)

    def reorder(self, beam_indices: np.ndarray) -> None:
        self.cache.reorder_cache(torch.from_numpy(beam_indices.astype(np.int64)))


@pytest.mark.parametrize("num_beams", [1, 3])
def test_strategies_generate_what_hf_generate_does_on_a_tiny_lm(num_beams: int) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    # A wide init: peaked distributions, so the comparison is about the search, not about float ties.
    config = GPT2Config(
        vocab_size=48,
        n_positions=64,
        n_embd=32,
        n_layer=2,
        n_head=2,
        initializer_range=0.3,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    model = GPT2LMHeadModel(config).eval()
    ids = np.array([[0, 0, 1, 7, 9], [1, 5, 11, 3, 8]], dtype=np.int64)  # row 0 left-padded
    mask = (ids != 0).astype(np.int64)
    settings = SearchSettings(eos_token_id=(2,), pad_token_id=0)
    with torch.no_grad():
        ref = model.generate(
            input_ids=torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            max_new_tokens=12,
            num_beams=num_beams,
            do_sample=False,
            min_new_tokens=3,
        ).numpy()
    got = search(
        TorchStep(model, mask, num_beams),
        ids,
        settings,
        num_beams=num_beams,
        max_new_tokens=12,
        min_new_tokens=3,
    )
    np.testing.assert_array_equal(got.sequences, ref)


# ---------------------------------------------------------------- dtypes from the manifest
HEADS, HEAD_DIM, WIDTH, VOCAB = 2, 4, 8, 6


class FakeComponent:
    """A compiled-backend-like component (a callable on numpy dicts) that records the dtypes it was fed."""

    def __init__(self, spec: Component, fn: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]):
        self.input_names = [t.name for t in spec.inputs]
        self.output_names = [t.name for t in spec.outputs]
        self.fn = fn
        self.fed: list[dict[str, np.dtype]] = []

    def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.fed.append({k: v.dtype for k, v in inputs.items()})
        return self.fn(inputs)


def _vision(x: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    # float32 out, as AOTInductor hands back floats: the decoder feed must still be cast to its fp16.
    return {"encoder_hidden_states": np.ones((x["pixel_values"].shape[0], 3, WIDTH), np.float32)}


def _decoder(x: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    # Next token: the position + 2, in fp16 logits; presents grow by the step's length.
    ids, pos = x["input_ids"], x["position_ids"]
    logits = np.zeros((*ids.shape, VOCAB), np.float16)
    np.put_along_axis(logits, ((pos + 2) % VOCAB)[..., None], 4.0, axis=-1)
    new = np.zeros((ids.shape[0], HEADS, ids.shape[1], HEAD_DIM), np.float16)
    return {
        "logits": logits,
        **{
            f"present.0.{k}": np.concatenate([x[f"past_key_values.0.{k}"], new], axis=2)
            for k in ("key", "value")
        },
    }


def _fake_fp16_artifact(dtype: str = "float16") -> SimpleNamespace:
    past = [
        TensorSpec(f"past_key_values.0.{k}", dtype, ["batch", HEADS, "past_sequence", HEAD_DIM])
        for k in ("key", "value")
    ]
    vision = Component(
        "vision",
        "vision.bin",
        [TensorSpec("pixel_values", dtype, ["batch", 3, 4, 4])],
        [TensorSpec("encoder_hidden_states", dtype, ["batch", 3, WIDTH])],
    )
    decoder = Component(
        "decoder",
        "decoder.bin",
        [
            TensorSpec("input_ids", "int64", ["batch", "sequence"]),
            TensorSpec("attention_mask", "int64", ["batch", "total_sequence"]),
            TensorSpec("position_ids", "int64", ["batch", "sequence"]),
            TensorSpec("encoder_hidden_states", dtype, ["batch", 3, WIDTH]),
            *past,
        ],
        [
            TensorSpec("logits", dtype, ["batch", "sequence", VOCAB]),
            *(TensorSpec(t.name.replace("past_key_values.", "present."), dtype, t.shape) for t in past),
        ],
    )
    prompt = GenerationRecipe(
        (
            "vision",
            lambda env, s: {
                "decoder_input_ids": np.full((env["pixel_values"].shape[0], 1), s["bos_token_id"], np.int64)
            },
        ),
        settings=lambda model: {},
    )
    manifest = Manifest(
        family="fake",
        task="caption",
        hf_class="-",
        backend="aoti",
        precision="fp16",
        source={},
        weights={},
        components={"vision": vision, "decoder": decoder},
        image_size=4,
        generation={"eos_token_id": [5], "pad_token_id": 0, "bos_token_id": 1},
    )
    components = {"vision": FakeComponent(vision, _vision), "decoder": FakeComponent(decoder, _decoder)}
    task = SimpleNamespace(generative=True, generation=lambda config: prompt)
    return SimpleNamespace(
        directory="fake-artifact", manifest=manifest, task_spec=task, components=components
    )


@pytest.mark.parametrize("num_beams", [1, 2])
def test_fp16_declared_graphs_get_fp16_feeds(num_beams: int) -> None:
    artifact = _fake_fp16_artifact()
    gen = Generator(artifact, config=object())
    out = gen.generate(
        np.zeros((2, 3, 4, 4), np.float32), max_new_tokens=6, num_beams=num_beams, output_logits=True
    )
    # Positions 0, 1, 2, 3 -> tokens 2, 3, 4, 5 (eos); the bos prompt at position 0.
    np.testing.assert_array_equal(out.sequences, [[1, 2, 3, 4, 5]] * 2)
    assert artifact.components["vision"].fed[0]["pixel_values"] == np.float16
    fed = artifact.components["decoder"].fed
    # beams go on past eos
    assert len(fed) >= 4 and all(f["encoder_hidden_states"] == np.float16 for f in fed)
    assert all(f["past_key_values.0.key"] == np.float16 and f["input_ids"] == np.int64 for f in fed)
    assert all(x.dtype == np.float32 for x in out.logits)  # upcast before argmax / log-softmax


def test_empty_past_takes_the_declared_dtype_and_shape_from_the_manifest() -> None:
    artifact = _fake_fp16_artifact()
    session = DecoderSession(artifact.components["decoder"], artifact.manifest.components["decoder"])
    past = session.empty_past(3)
    assert {k: (v.dtype, v.shape) for k, v in past.items()} == {
        f"past_key_values.0.{k}": (np.float16, (3, HEADS, 0, HEAD_DIM)) for k in ("key", "value")
    }


def test_bfloat16_needs_ml_dtypes(monkeypatch) -> None:
    pytest.importorskip("ml_dtypes")
    assert numpy_dtype("bfloat16").name == "bfloat16"
    assert numpy_dtype("float16") == np.float16 and numpy_dtype("bool") == np.bool_
    monkeypatch.setitem(sys.modules, "ml_dtypes", None)  # as if not installed: the import fails
    with pytest.raises(CheckError, match="cannot feed bf16"):
        numpy_dtype("bfloat16")
    with pytest.raises(CheckError, match="cannot feed bf16"):
        Generator(_fake_fp16_artifact("bfloat16"), config=object())
    with pytest.raises(CheckError, match="does not know"):
        numpy_dtype("float4x")
