"""Token-exact validation of a generative artifact against HF ``generate()`` on the eager model.

Seeded image/prompt samples (prompts of different lengths, padded as the family's tokenizer pads), run
at two batch sizes, greedy and beam search: every sample's tokens must equal the reference's (fp32), or
the export fails naming the sample, the step and both tokens. Per-step raw logits are compared up to
the first divergence (or to the end) and reported, with the reference's smallest top-1/top-2 margin: a
divergence where that margin is below the logits error is a near-tie, not a wiring bug, and the report
says so. When the reference's tokens are constant (a random model stuck on one token), tokens say
little about the cache wiring, so the logits must then also be within the precision's tolerance.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from transformers import PreTrainedModel

from vlexport.contracts.manifest import ValidationReport
from vlexport.contracts.precision import Tolerance
from vlexport.models.inputs import InputShape
from vlexport.validate.outputs import noise_level

if TYPE_CHECKING:
    from vlexport.runtime import Artifact


SAMPLES = 4
BATCH_SIZES = (1, 4)
MAX_NEW_TOKENS = 12
NUM_BEAMS = 3
PROMPT_TOKENS = 6  # text tokens of the longest prompt; the others are shorter (padding)


@dataclass
class TokenCheck:
    shape: str  # e.g. "b4 greedy", "b1 beam3"
    output: str  # "tokens"
    kind: str  # ok | mismatch | logits
    passed: bool
    sample: int | None = None
    step: int | None = None
    max_abs: float | None = None  # logits error up to the first divergence (or to the end)
    margin: float | None = None  # reference's smallest top-1/top-2 logit gap over the compared steps
    tokens: int = 0  # new tokens compared
    limit: str = "tokens equal"
    near_tie_step: int | None = None  # beam search: logits compared up to this step (see compare_case)
    detail: str = ""
    logit_cosine: float | None = None  # smallest per-step logit cosine up to the first divergence
    near_tie: bool = False  # diverged where the artifact's logit error can flip the reference's choice
    step_margin: float | None = None  # greedy: the reference's top-2 gap at the divergence step


@dataclass
class _Case:
    shape: str  # "b4 greedy"
    mode: str
    beams: int
    rows: list[int]
    inputs: dict[str, np.ndarray]
    sequences: np.ndarray  # HF generate()'s sequences
    logits: list[np.ndarray]  # its raw logits per step


@dataclass
class GenerationReferences:
    """HF ``generate()`` on the eager model, run before the artifact is loaded (see
    validate.eager_references)."""

    config: Any
    cases: list[_Case]
    modes: list[tuple[str, int]]
    batch_sizes: tuple[int, ...]
    samples: int
    max_new_tokens: int


def generation_references(
    model: PreTrainedModel,
    task: Any,
    *,
    samples: int = SAMPLES,
    batch_sizes: Sequence[int] = BATCH_SIZES,
    max_new_tokens: int = MAX_NEW_TOKENS,
    num_beams: int = NUM_BEAMS,
    seed: int = 1234,
    prompt_tokens: int = PROMPT_TOKENS,
) -> GenerationReferences:
    """Seeded samples at every (mode, batch size) and what ``model.generate()`` makes of them (greedy, and
    beam search when ``num_beams`` > 1)."""
    inputs = task.make_inputs(model.config, InputShape(samples, prompt_tokens), seed)
    modes = [("greedy", 1)] + ([(f"beam{num_beams}", num_beams)] if num_beams > 1 else [])
    cases = []
    for mode, beams in modes:
        for bs in batch_sizes:
            for start in range(0, samples, bs):
                rows = list(range(start, min(start + bs, samples)))
                sub = _rows(inputs, rows, strip=bs == 1)
                with torch.no_grad():
                    ref = model.generate(
                        **sub,
                        max_new_tokens=max_new_tokens,
                        num_beams=beams,
                        do_sample=False,
                        return_dict_in_generate=True,
                        output_logits=True,
                    )
                cases.append(
                    _Case(
                        f"b{bs} {mode}",
                        mode,
                        beams,
                        rows,
                        {k: v.numpy() for k, v in sub.items()},
                        ref.sequences.numpy(),
                        [x.float().numpy() for x in ref.logits],
                    )
                )
    return GenerationReferences(model.config, cases, modes, tuple(batch_sizes), samples, max_new_tokens)


@dataclass
class GenerationCheck:
    """``check(artifact) -> report`` over references computed once (validate.eager_references): the same
    references judge the artifact and, for per-component attribution, artifacts that mix its components with
    the fp32 parent's."""

    refs: GenerationReferences

    def __call__(self, artifact: Artifact) -> ValidationReport:
        return compare_generation(self.refs, artifact)

    def attribution(self, artifact: Artifact) -> ValidationReport:
        """Greedy decoding at the largest batch size only, with the accuracy figures whatever the precision:
        what per-component attribution reports (token agreement, first divergence, logit cosine), at a
        quarter of the full check's cost (beam search is the costly part)."""
        bs = max(self.refs.batch_sizes)
        cases = [c for c in self.refs.cases if c.shape == f"b{bs} greedy"]
        refs = replace(self.refs, cases=cases, modes=[("greedy", 1)], batch_sizes=(bs,))
        return compare_generation(refs, artifact, with_accuracy=True)


def compare_generation(
    refs: GenerationReferences, artifact: Artifact, *, with_accuracy: bool = False
) -> ValidationReport:
    """Run the artifact's generation loop on the references' samples; return a validation report.

    ``with_accuracy``: the accuracy figures (agreement, logit cosine) even for a value-exact precision, as
    per-component attribution reports them for every component."""
    from vlexport.runtime.generate import Generator

    precision = artifact.manifest.precision
    tol = artifact.manifest.precision_config.tolerance
    generator = Generator(artifact, config=refs.config)
    checks: list[TokenCheck] = []
    ref_tokens: list[np.ndarray] = []
    logit_pairs: list[tuple[np.ndarray, np.ndarray]] = []
    near_ties = 0
    for case in refs.cases:
        got = generator.generate(
            **case.inputs, max_new_tokens=refs.max_new_tokens, num_beams=case.beams, output_logits=True
        )
        if case.mode == "greedy":
            ref_tokens.append(case.sequences[:, got.prompt_length :])
        case_checks, case_pairs = compare_case(
            case.shape,
            case.rows,
            case.sequences,
            got.sequences,
            got.prompt_length,
            case.logits,
            got.logits,
            case.beams,
            got.beam_margins,
        )
        logit_pairs += case_pairs
        near_ties += any(c.near_tie_step is not None for c in case_checks)
        checks += case_checks
    mark_greedy_near_ties(checks, logit_pairs, tol)
    tokens = np.concatenate([t.ravel() for t in ref_tokens]) if ref_tokens else np.zeros(0)
    distinct = int(np.unique(tokens).size)
    degenerate = distinct <= 1
    if degenerate and tol.exact_tokens:
        checks += logits_gate(logit_pairs, tol)
    accuracy = None
    if with_accuracy or not tol.exact_tokens:  # agreement and logit cosine (validate/accuracy.py)
        from vlexport.validate.accuracy import generation_accuracy

        accuracy = generation_accuracy(checks, precision, tol, refs.max_new_tokens)
    if not tol.exact_tokens:  # reduced precisions are judged by those figures
        checks = _agreement(checks, accuracy)
    report = _report(
        checks,
        precision,
        tol,
        refs.modes,
        refs.batch_sizes,
        refs.samples,
        refs.max_new_tokens,
        distinct,
        degenerate,
        near_ties,
    )
    report.accuracy = accuracy
    return report


def validate_generation(model: PreTrainedModel, artifact: Artifact, **kwargs: Any) -> ValidationReport:
    """Compare ``artifact`` (a loaded runtime.Artifact) with ``model.generate()``; return a validation
    report."""
    return compare_generation(generation_references(model, artifact.task_spec, **kwargs), artifact)


def _rows(inputs: dict[str, torch.Tensor], rows: list[int], *, strip: bool) -> dict[str, torch.Tensor]:
    """The samples ``rows`` of a padded batch; alone (batch 1), without their padding columns."""
    sub = {k: v[rows] for k, v in inputs.items()}
    if strip and "attention_mask" in sub:
        keep = sub["attention_mask"][0].bool()
        sub["input_ids"] = sub["input_ids"][:, keep]
        sub["attention_mask"] = sub["attention_mask"][:, keep]
    return sub


def compare_case(
    shape: str,
    rows: list[int],
    ref: np.ndarray,
    got: np.ndarray,
    prompt_len: int,
    ref_logits: list[np.ndarray],
    got_logits: list[np.ndarray],
    beams: int,
    beam_margins: Sequence[np.ndarray] = (),
) -> tuple[list[TokenCheck], list[tuple[np.ndarray, np.ndarray]]]:
    """One case's token checks, and the (reference, artifact) logit rows compared per step (the run's noise
    level and logits gate read them)."""
    out = []
    logit_pairs: list[tuple[np.ndarray, np.ndarray]] = []
    first_div: int | None = None
    divergences = []
    for i, sample in enumerate(rows):
        r, g = ref[i], got[i]
        n = min(len(r), len(g))
        diff = np.nonzero(r[:n] != g[:n])[0]
        if diff.size or len(r) != len(g):
            pos = int(diff[0]) if diff.size else n
            step = pos - prompt_len
            divergences.append((sample, i, step, pos))
            first_div = step if first_div is None else min(first_div, step)
        else:
            divergences.append((sample, i, None, None))
    # Logits are comparable while both runs saw the same tokens: up to and including the divergence. Greedy
    # rows are independent, so each row's own divergence bounds it; beam rows are reordered across the
    # batch's hypotheses, so the first divergence bounds them all.
    steps = min(len(ref_logits), len(got_logits))
    if beams == 1:
        horizon = np.array([steps - 1 if step is None else max(step, 0) for _, _, step, _ in divergences])
    else:
        horizon = np.full(
            len(ref_logits[0]) if steps else 0, steps - 1 if first_div is None else max(first_div, 0)
        )
    last = min(steps, int(horizon.max(initial=-1)) + 1)
    errs, margins, cosines = [], [], []
    tie_step, score_err = None, 0.0
    for s in range(last):
        a, b = ref_logits[s], got_logits[s]
        if a.shape != b.shape:
            last = s
            break
        valid = horizon >= s
        if valid.any():
            logit_pairs.append((a[valid], b[valid]))
        a64, b64 = a.astype(np.float64), b.astype(np.float64)
        errs.append(np.abs(a64 - b64).max(axis=-1))  # per row
        cosines.append(
            (a64 * b64).sum(-1)
            / np.maximum(np.linalg.norm(a64, axis=-1) * np.linalg.norm(b64, axis=-1), 1e-30)
        )
        top2 = np.sort(a, axis=-1)[:, -2:]
        margins.append(top2[:, 1] - top2[:, 0])
        # Beam rows hold hypotheses in score order. A log-softmax value moves by at most twice the largest
        # logit error and a path score sums one per step, so candidates closer than twice that may rank
        # either way: after such a near-tie the two runs' rows hold other hypotheses and per-row logits stop
        # being comparable (tokens still are). Random weights with huge logits do this at every step.
        score_err += 2 * float(errs[-1][valid].max(initial=0.0))
        if s < len(beam_margins) and float(beam_margins[s].min()) <= 2 * score_err:
            tie_step = s
            break
    for sample, i, step, pos in divergences:
        row_slice = slice(i * beams, (i + 1) * beams)
        upto = int(horizon[i * beams]) + 1 if len(horizon) else 0  # this row's comparable steps
        err = float(max((e[row_slice].max() for e in errs[:upto]), default=0.0))
        margin = float(min((m[row_slice].min() for m in margins[:upto]), default=np.inf))
        margin = margin if np.isfinite(margin) else None
        new = max(0, min(len(ref[i]), len(got[i])) - prompt_len)
        cos = float(min((c[row_slice].min() for c in cosines[:upto]), default=np.nan))
        check = TokenCheck(
            shape,
            "tokens",
            "ok",
            True,
            sample=sample,
            max_abs=err,
            margin=margin,
            tokens=new,
            near_tie_step=tie_step,
            logit_cosine=cos if np.isfinite(cos) else None,
        )
        if step is not None:
            r_tok = _tok(ref[i], pos)
            g_tok = _tok(got[i], pos)
            at = errs[min(max(step, 0), len(errs) - 1)][row_slice].max() if errs else float("nan")
            where = "in the prompt" if step < 0 else f"at step {step}"
            check.kind, check.passed, check.step = "mismatch", False, step
            if beams > 1:  # the candidates' ranking hit a near-tie at or before the divergence
                check.near_tie = tie_step is not None and tie_step <= step
            elif 0 <= step < len(margins):  # judged in compare_generation, against the run's noise level
                check.step_margin = float(margins[step][i])
            check.detail = (
                f"{shape}: tokens diverge {where}: artifact {g_tok}, HF generate() {r_tok}; logits max abs "
                f"err {at:.3g} there, {err:.3g} up to it; reference top-2 margin {margin}"
            )
        out.append(check)
    return out, logit_pairs


def mark_greedy_near_ties(
    checks: Sequence[TokenCheck],
    logit_pairs: Sequence[tuple[np.ndarray, np.ndarray]],
    tol: Tolerance | None = None,
) -> None:
    """A greedy divergence is a near-tie when the reference's top-2 gap there is within twice the variant's
    typical logit error over the run (validate.outputs.noise_level): fp32 itself barely preferred its token.
    The error at the divergence cannot decide it: a flip always makes it at least half the gap. ``tol`` (the
    precision's) bounds that typical error, so an artifact wrong everywhere cannot excuse its flips by it."""
    noise = noise_level(logit_pairs, tol)
    for c in checks:
        if c.kind == "mismatch" and c.step_margin is not None:
            c.near_tie = noise is not None and c.step_margin <= 2 * noise
            if c.near_tie:
                c.detail += (
                    f" (a near-tie: the gap there, {c.step_margin:.3g}, is within twice the run's typical "
                    f"logit error, {noise:.3g})"
                )


def _tok(seq: np.ndarray, pos: int) -> str:
    return str(int(seq[pos])) if pos < len(seq) else "<end>"


def logits_gate(pairs: list[tuple[np.ndarray, np.ndarray]], tol: Tolerance) -> list[TokenCheck]:
    """Constant reference tokens: the logits carry the check, within the precision's tolerance."""
    worst, worst_excess = 0.0, -np.inf
    for a, b in pairs:
        diff = np.abs(a.astype(np.float64) - b)
        worst = max(worst, float(diff.max()))
        worst_excess = max(worst_excess, float((diff - (tol.atol + tol.rtol * np.abs(a))).max()))
    passed = worst_excess <= 0
    return [
        TokenCheck(
            "all",
            "logits",
            "ok" if passed else "logits",
            passed,
            max_abs=worst,
            limit=f"|err| <= {tol.atol:g} + {tol.rtol:g}*|ref| (reference tokens are constant)",
            detail="" if passed else "per-step logits differ from HF generate() beyond tolerance",
        )
    ]


def _agreement(checks: list[TokenCheck], accuracy: Any) -> list[TokenCheck]:
    """Reduced precisions: samples may diverge as long as the accuracy report's thresholds hold."""
    for c in checks:
        if c.output == "tokens":
            c.limit = "accuracy thresholds (agreement, logit cosine): " + (
                "met" if accuracy.passed else "missed"
            )
            c.passed = c.kind == "ok" or accuracy.passed
    if not accuracy.passed:
        checks.append(
            TokenCheck(
                "all",
                "accuracy",
                "accuracy",
                False,
                limit=str(accuracy.thresholds),
                detail="; ".join(accuracy.misses),
            )
        )
    return checks


def _report(
    checks: list[TokenCheck],
    precision: str,
    tol: Tolerance,
    modes: list[tuple[str, int]],
    batch_sizes: Sequence[int],
    samples: int,
    max_new_tokens: int,
    distinct: int,
    degenerate: bool,
    near_ties: int = 0,
) -> ValidationReport:
    token_checks = [c for c in checks if c.output == "tokens"]
    failures = [asdict(c) for c in checks if not c.passed]
    err = max((c.max_abs for c in checks if c.max_abs is not None), default=0.0)
    margins = [c.margin for c in token_checks if c.margin is not None and np.isfinite(c.margin)]
    margin = min(margins) if margins else None
    compared = sum(c.tokens for c in token_checks)
    equal = all(c.kind == "ok" for c in token_checks)
    shapes = [f"b{b} {m}" for m, _ in modes for b in batch_sizes]
    beams = max(b for _, b in modes)
    decoded = ", ".join(m for m, _ in modes)
    summary = (
        f"tokens {'equal' if equal else 'DIFFER from'} HF generate() for {samples} samples x "
        f"{len(batch_sizes)} batch sizes x ({decoded}): {compared} new tokens; per-step "
        f"logits max abs err {err:.2g}, reference min top-2 margin "
        f"{margin if margin is None else f'{margin:.2g}'}"
    )
    if degenerate:
        summary += "; the reference tokens are constant (random weights), so the logits were checked too"
    if near_ties:
        summary += (
            f"; beam logits compared up to a near-tie in the candidates' ranking in {near_ties} case(s)"
        )
    return ValidationReport(
        passed=not failures,
        reference="HF generate() on eager PyTorch fp32",
        precision=precision,
        tolerance={"tokens": "exact" if tol.exact_tokens else f"agreement >= {tol.min_agreement}"},
        shapes=shapes,
        max_abs_error={"logits": err},
        checks=[asdict(c) for c in checks],
        failures=failures,
        generation={
            "samples": samples,
            "batch_sizes": list(batch_sizes),
            "max_new_tokens": max_new_tokens,
            "num_beams": beams,
            "new_tokens_compared": compared,
            "tokens_equal": equal,
            "distinct_reference_tokens": distinct,
            "min_logit_margin": margin,
            "logits_max_abs_error": err,
            "beam_near_ties": near_ties,
        },
        summary=summary,
    )


def decoder_needs(task: Any, config: Any) -> tuple[int, int]:
    """(decoder rows, cache slots) that validating ``task`` asks of a decoder with fixed limits (a compiled
    static cache): the widest batch times the beams, and the longest decoder prompt plus every new token. The
    prompt is the text when no other component reads ``input_ids`` (captions, BLIP-2 OPT with its image
    tokens), else the decoder's start token (VQA, T5). Known from the config alone, so a package that cannot
    pass is refused before it is compiled."""
    inputs = task.make_inputs(config, InputShape(SAMPLES, PROMPT_TOKENS), 1234)
    components = task.components(config)
    encoded = any("input_ids" in c.inputs for c in components if c.name != "decoder")
    prompt = 1 if encoded else int(inputs["input_ids"].shape[1])
    return max(BATCH_SIZES) * NUM_BEAMS, prompt + MAX_NEW_TOKENS
