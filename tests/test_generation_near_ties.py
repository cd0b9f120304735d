"""Beam search near-ties: per-row logits are compared only while both runs' beam rows hold the same
hypotheses.

Seen at full size with random weights (BLIP-2 Flan-T5-XL before its LM head got a sane scale): two
candidates scored -770.74562 and -770.74564 in HF, equal to float32 precision, ranked the other way in
the ONNX run; rows 1 and 2 then held swapped hypotheses and a per-row logits check reported an error of
~100 although the generated tokens were identical. These tests pin the rule on synthetic logits.
"""

from __future__ import annotations

import numpy as np

from vlexport.contracts.precision import get_precision
from vlexport.runtime.decode import selection_margin
from vlexport.validate.generation import compare_case, logits_gate

FP32 = get_precision("fp32").tolerance

RNG = np.random.default_rng(0)
VOCAB, BEAMS, STEPS = 50, 3, 4


def _case(swap_at: int | None, noise: float = 1e-5):
    """Reference logits per step (3 beam rows) and the artifact's: equal up to noise, rows 1 and 2 swapped
    from ``swap_at`` on (another ranking of two tied candidates)."""
    ref = [RNG.normal(size=(BEAMS, VOCAB)).astype(np.float32) for _ in range(STEPS)]
    got = []
    for s, r in enumerate(ref):
        g = r + RNG.normal(scale=noise, size=r.shape).astype(np.float32)
        got.append(g[[0, 2, 1]] if swap_at is not None and s >= swap_at else g)
    seq = np.array([[0, 5, 6, 7, 8]])
    return ref, got, seq


def _run(ref, got, seq, margins):
    return compare_case("b1 beam3", [0], seq, seq.copy(), 1, ref, got, BEAMS, margins)


def test_rows_after_a_near_tie_are_not_compared() -> None:
    ref, got, seq = _case(swap_at=2)
    margins = [np.array([1.0]), np.array([1e-7]), np.array([1.0]), np.array([1.0])]  # a tie at step 1
    checks, pairs = _run(ref, got, seq, margins)
    assert [c.near_tie_step for c in checks] == [1]
    assert len(pairs) == 2  # steps 0 and 1: their rows are the same hypotheses in both runs
    gate = logits_gate(pairs, FP32)
    assert gate[0].passed, gate[0]


def test_swapped_rows_without_a_tie_still_fail() -> None:
    """The same swap with well-separated candidates is a real difference: the logits gate must catch it."""
    ref, got, seq = _case(swap_at=2)
    margins = [np.array([1.0])] * STEPS
    checks, pairs = _run(ref, got, seq, margins)
    # Step 2, the first swapped one, is compared (its error then stops the comparison: nothing after it
    # could be trusted) and fails.
    assert len(pairs) == 3 and [c.near_tie_step for c in checks] == [2]
    gate = logits_gate(pairs, FP32)
    assert not gate[0].passed and gate[0].max_abs > 0.1


def test_a_broken_step_before_the_tie_still_fails() -> None:
    """A tie only ends the comparison after its step: a large error at or before it is still judged."""
    ref, got, seq = _case(swap_at=None)
    got[1] = got[1] + 0.5  # wrong logits at step 1
    margins = [np.array([1.0]), np.array([0.8]), np.array([1.0]), np.array([1.0])]  # "tie" only by that error
    _checks, pairs = _run(ref, got, seq, margins)
    assert len(pairs) == 2
    assert not logits_gate(pairs, FP32)[0].passed


def test_selection_margin_is_the_smallest_gap_among_the_ranked_candidates() -> None:
    log_probs = np.full((2, 8), -1e9, dtype=np.float32)
    log_probs[0, :4] = [-1.0, -1.5, -1.50001, -3.0]
    log_probs[1, :4] = [-1.0, -2.0, -3.0, -4.0]
    m = selection_margin(log_probs, keep=3)
    assert m[0] < 2e-5  # -1.5 vs -1.50001, less float32 rounding
    assert abs(m[1] - 1.0) < 1e-5  # beams at decode.NEG (not opened yet) are never candidates


def test_greedy_divergence_is_a_near_tie_only_within_the_runs_noise() -> None:
    """Greedy: a divergence where the reference's top-2 gap is within twice the variant's typical logit error
    is a near-tie; a divergence over a clear gap is not, although the flip makes the error there large."""
    from vlexport.validate.generation import mark_greedy_near_ties

    def case(gap: float):
        ref = [RNG.normal(size=(1, VOCAB)).astype(np.float32) for _ in range(STEPS)]
        for r in ref:
            r[0, :2] = [5.0, 5.0 - gap]  # token 0 wins by ``gap``
        got = [r + RNG.normal(scale=0.01, size=r.shape).astype(np.float32) for r in ref]
        got[3][0, :2] = [5.0 - gap, 5.0]  # the artifact flips the last step, after three at its noise level
        seq, out = np.array([[9, 0, 0, 0, 0]]), np.array([[9, 0, 0, 0, 1]])
        checks, pairs = compare_case("b1 greedy", [0], seq, out, 1, ref, got, 1)
        mark_greedy_near_ties(checks, pairs)
        return checks[0]

    tie = case(gap=0.01)
    assert tie.kind == "mismatch" and tie.step == 3 and abs(tie.step_margin - 0.01) < 1e-5 and tie.near_tie
    clear = case(gap=2.0)
    assert clear.kind == "mismatch" and clear.step == 3 and not clear.near_tie


def test_batched_greedy_rows_are_compared_up_to_their_own_divergence() -> None:
    """Greedy rows are independent: a row that diverges at step 2 keeps its logits compared up to step 2
    although another row of the batch diverged at step 0 (BLIP-2 Flan-T5-XL int8 at batch 4 did this)."""
    from vlexport.validate.generation import mark_greedy_near_ties

    ref = [RNG.normal(size=(2, VOCAB)).astype(np.float32) for _ in range(STEPS)]
    for r in ref:
        r[:, :2] = [5.0, 3.0]  # token 0 wins by 2.0 ...
    ref[2][1, :2] = [5.0, 4.99]  # ... except row 1 at step 2: a near-tie
    got = [r + RNG.normal(scale=0.01, size=r.shape).astype(np.float32) for r in ref]
    got[0][0, :2] = [3.0, 5.0]  # row 0 flips a clear choice at step 0
    got[2][1, :2] = [4.99, 5.0]  # row 1 flips the near-tie at step 2
    seq = np.array([[9, 0, 0, 0, 0], [9, 0, 0, 0, 0]])
    out = np.array([[9, 1, 0, 0, 0], [9, 0, 0, 1, 0]])
    checks, pairs = compare_case("b2 greedy", [0, 1], seq, out, 1, ref, got, 1)
    mark_greedy_near_ties(checks, pairs)
    row0, row1 = checks
    assert (row0.step, row1.step) == (0, 2)
    assert abs(row1.step_margin - 0.01) < 1e-4 and row1.near_tie and not row0.near_tie
    assert [len(a) for a, _ in pairs] == [2, 1, 1]  # step 0: both rows; steps 1-2: row 1 only
