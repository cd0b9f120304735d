"""A broken artifact cannot excuse itself: the typical error the near-tie rule compares a flip's gap against
is bounded by what the precision's tolerance explains, so an fp32 artifact wrong everywhere calls no flip a
tie."""

from __future__ import annotations

import numpy as np
import pytest

from vlexport.contracts.precision import get_precision
from vlexport.validate.generation import compare_case, mark_greedy_near_ties
from vlexport.validate.outputs import noise_level

RNG = np.random.default_rng(0)
VOCAB, STEPS = 50, 4


def _greedy_flip(noise: float, gap: float, precision: str):
    ref = [RNG.normal(size=(1, VOCAB)).astype(np.float32) for _ in range(STEPS)]
    for r in ref:
        r[0, :2] = [5.0, 5.0 - gap]
    got = [r + RNG.normal(scale=noise, size=r.shape).astype(np.float32) for r in ref]
    for g in got[:3]:
        g[0, :2] = [5.0, 5.0 - gap]  # same tokens for three steps, wrong logits everywhere else
    got[3][0, :2] = [5.0 - gap, 5.0]
    seq, out = np.array([[9, 0, 0, 0, 0]]), np.array([[9, 0, 0, 0, 1]])
    checks, pairs = compare_case("b1 greedy", [0], seq, out, 1, ref, got, 1)
    mark_greedy_near_ties(checks, pairs, get_precision(precision).tolerance)
    return checks[0]


def test_an_fp32_artifact_wrong_everywhere_gets_no_near_tie() -> None:
    flip = _greedy_flip(noise=1.0, gap=0.5, precision="fp32")  # its own typical error (~2) would excuse 0.5
    assert flip.kind == "mismatch" and not flip.near_tie


def test_a_genuine_fp32_near_tie_is_still_one() -> None:
    flip = _greedy_flip(noise=1e-5, gap=1e-5, precision="fp32")  # within its noise and its tolerance
    assert flip.kind == "mismatch" and flip.near_tie


@pytest.mark.parametrize(
    ("precision", "noise", "expect"), [("fp32", 1.0, 1e-4 + 1e-4 * 5.0), ("int8-dynamic", 3.0, None)]
)
def test_noise_level_is_bounded_by_the_tolerance(precision: str, noise: float, expect: float | None) -> None:
    ref = RNG.normal(size=(64, VOCAB))
    ref[:, 0] = 5.0  # every row's largest |value|
    got = ref + RNG.normal(scale=noise, size=ref.shape)
    tol = get_precision(precision).tolerance
    bounded = noise_level([(ref, got)], tol)
    assert bounded < noise_level([(ref, got)])
    if expect is not None:
        assert bounded == pytest.approx(expect)
    else:  # cosine tolerance: |ref row| * sqrt(2 (1 - min_cosine))
        norms = np.linalg.norm(ref, axis=-1)
        assert bounded == pytest.approx(float(np.median(norms)) * np.sqrt(2 * (1 - tol.min_cosine)))
