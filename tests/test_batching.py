"""In-flight batching of generation (runtime/batching.py): concurrent requests whose decode steps run as one
decoder call get, each, the tokens of the same request run alone (prompts of different lengths, greedy and
beam search, different lengths, requests joining while others run), within the row limit. T5 is in the list
because padding its cache gave other tokens: its decoder takes no mask and no positions."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest

from vlexport.runtime import load_artifact
from vlexport.runtime.batching import StepBatcher
from vlexport.runtime.generate import Generator, prompt_ids

TOKENS = SimpleNamespace(encode=lambda text: [int(t) for t in text.split()])  # ids as text


@pytest.mark.parametrize(
    ("preset", "task"),
    [
        ("blip-tiny", "caption"),
        ("blip-tiny", "vqa"),  # the question's length sets the cross-attention's: stacked by shape
        ("blip2-opt-tiny", "generate"),
        ("blip2-flan-t5-tiny", "generate"),  # no mask / positions as inputs: caches of one length only
    ],
)
def test_batched_requests_get_their_solo_tokens_within_the_row_limit(
    exported, preset: str, task: str
) -> None:
    gen = Generator(load_artifact(exported(preset, task), device="cpu"))
    size = gen.artifact.manifest.image_size
    rng = np.random.RandomState(0)
    cases = []
    for i in range(10):
        text = " ".join(str(t) for t in rng.randint(5, 90, size=2 + i % 5))  # 2..6 prompt tokens
        ids = prompt_ids(text, TOKENS, gen.settings, gen.recipe, True)
        beams, max_new = (1, 1, 3, 1, 2)[i % 5], (3, 9, 25, 14, 6)[i % 5]
        cases.append((rng.rand(1, 3, size, size).astype(np.float32), ids, beams, max_new))

    def one(case, decoder=None) -> list[int]:
        pixels, ids, beams, max_new = case
        mask = None if ids is None else np.ones_like(ids)
        out = gen.generate(pixels, ids, mask, max_new_tokens=max_new, num_beams=beams, decoder=decoder)
        return out.sequences[0].tolist()

    alone = [one(case) for case in cases]
    assert len({str(a) for a in alone}) >= len(cases) // 2  # mostly different answers: a mix-up would show

    batcher = StepBatcher(gen.decoder, max_rows=5)
    got: list[list[int] | None] = [None] * len(cases)

    def run(i: int) -> None:
        time.sleep(0.004 * i)  # arrivals spread out: later requests join a loop already running
        with batcher.member() as member:
            got[i] = one(cases[i], member)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(cases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert got == alone
    assert batcher.rows > batcher.calls  # steps really ran batched
    assert batcher.peak_rows <= 5  # the row limit held (beams count as rows)


def test_a_request_above_the_row_limit_runs_alone_and_nothing_waits_forever(exported) -> None:
    gen = Generator(load_artifact(exported("blip-tiny", "caption"), device="cpu"))
    size = gen.artifact.manifest.image_size
    pixels = np.random.RandomState(1).rand(1, 3, size, size).astype(np.float32)
    alone = [
        gen.generate(pixels, max_new_tokens=n, num_beams=b).sequences.tolist() for b, n in ((4, 6), (1, 5))
    ]
    batcher = StepBatcher(gen.decoder, max_rows=2)
    got = [None, None]

    def run(i: int, beams: int, max_new: int) -> None:
        with batcher.member() as member:
            got[i] = gen.generate(
                pixels, max_new_tokens=max_new, num_beams=beams, decoder=member
            ).sequences.tolist()

    threads = [threading.Thread(target=run, args=a) for a in ((0, 4, 6), (1, 1, 5))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert got == alone and batcher.peak_rows == 4  # 4 beams > 2 rows: admitted alone, never with the other


def test_left_padded_stack_is_pad_then_concatenate_in_one_copy() -> None:
    from vlexport.runtime.batching import _left_padded_stack

    rng = np.random.default_rng(0)
    pasts = [rng.standard_normal((r, 2, t, 3)).astype(np.float32) for r, t in ((1, 5), (3, 2), (2, 7))]
    view = rng.standard_normal((2, 2, 9, 3)).astype(np.float32)[:, :, 3:]  # a present sliced last step
    pasts.append(view)
    longest = 7
    want = np.concatenate(
        [np.pad(p, ((0, 0), (0, 0), (longest - p.shape[2], 0), (0, 0))) for p in pasts], axis=0
    )
    got = _left_padded_stack(pasts, [longest - p.shape[2] for p in pasts], axis=2)
    assert got.dtype == np.float32 and got.flags.c_contiguous and np.array_equal(got, want)
    masks = [np.ones((1, 5), np.int64), np.ones((2, 3), np.int64)]
    got = _left_padded_stack(masks, [0, 2], axis=1)
    assert got.tolist() == [[1, 1, 1, 1, 1], [0, 0, 1, 1, 1], [0, 0, 1, 1, 1]]
