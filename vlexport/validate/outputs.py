"""Encoder artifacts vs eager: per-output errors at several shapes. A miss is fatal.

The reference is always the eager PyTorch model in fp32 on the same seeded inputs, at several batch
sizes and sequence lengths other than the export example, with padded attention masks. Tolerances come
from the precision configs (contracts/precision.py).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedModel

from vlexport.contracts.family import TaskSpec
from vlexport.contracts.manifest import ValidationReport
from vlexport.contracts.precision import PrecisionConfig, Tolerance
from vlexport.models.inputs import VALIDATION_SHAPES, InputShape

# Outputs whose values barely vary carry no signal: a comparison against them passes trivially.
DEGENERATE_STD = 1e-6


@dataclass
class OutputCheck:
    shape: str
    output: str
    kind: str  # ok | tolerance | shape | missing | degenerate | agreement
    passed: bool
    max_abs: float | None = None
    max_rel: float | None = None
    cosine: float | None = None
    agreement: float | None = None
    # argmax agreement where a flip at a near-tie (the reference's top-2 gap within twice the variant's
    # typical error, see noise_level) counts as agreeing, as for generation; the gate reads this one
    agreement_with_near_ties: float | None = None
    limit: str = ""
    detail: str = ""


def noise_level(pairs: Sequence[tuple[np.ndarray, np.ndarray]], tol: Tolerance | None = None) -> float | None:
    """The variant's typical error: the median over every row of every (reference, artifact) pair of the
    row's largest absolute difference. A flipped argmax always has an error of at least half the reference's
    top-2 gap at that row, so the row's own error cannot tell a near-tie from a broken answer; the error
    level the variant shows elsewhere can.

    ``tol``: the precision's tolerance bounds it (:func:`explained_error`): an artifact wrong everywhere has a
    large typical error of its own, and must not call every flip a near-tie by it."""
    rows = [
        np.abs(a.astype(np.float64) - b).max(axis=-1).ravel()
        for a, b in pairs
        if a.ndim >= 1 and a.shape == np.shape(b) and a.size
    ]
    if not rows:
        return None
    noise = float(np.median(np.concatenate(rows)))
    bound = explained_error(pairs, tol) if tol is not None else None
    return noise if bound is None else min(noise, bound)


def explained_error(pairs: Sequence[tuple[np.ndarray, np.ndarray]], tol: Tolerance) -> float | None:
    """The largest typical row error the precision's tolerance allows, as a median over the reference rows:
    ``atol + rtol * max|ref|`` elementwise tolerances (fp32); ``|ref| * sqrt(2 (1 - min_cosine))`` for cosine
    ones (a row at that cosine is at most that far from the reference, in L2 and so in every element)."""
    refs = [
        np.asarray(a, dtype=np.float64) for a, b in pairs if a.ndim >= 1 and a.shape == np.shape(b) and a.size
    ]
    if not refs:
        return None
    if tol.atol is not None:
        rows = [tol.atol + (tol.rtol or 0.0) * np.abs(r).max(axis=-1).ravel() for r in refs]
        return float(np.median(np.concatenate(rows)))
    if tol.min_cosine is not None:
        rows = [np.linalg.norm(r, axis=-1).ravel() * np.sqrt(2 * (1 - tol.min_cosine)) for r in refs]
        return float(np.median(np.concatenate(rows)))
    return None


def compare_output(
    name: str,
    shape: str,
    got: np.ndarray | None,
    ref: np.ndarray,
    tol: Tolerance,
    agreement_kind: str | None = None,
    noise: float | None = None,
) -> OutputCheck:
    """One output at one shape. ``noise``: the variant's typical row error over the run (noise_level);
    argmax flips where the reference's top-2 gap is within twice it are near-ties."""
    if got is None:
        return OutputCheck(shape, name, "missing", False, detail="output not produced by the artifact")
    if got.shape != ref.shape:
        return OutputCheck(
            shape, name, "shape", False, detail=f"shape {list(got.shape)} != reference {list(ref.shape)}"
        )
    got64, ref64 = got.astype(np.float64), ref.astype(np.float64)
    if not np.isfinite(got64).all():
        return OutputCheck(shape, name, "tolerance", False, detail="artifact output has NaN or Inf")
    diff = np.abs(got64 - ref64)
    check = OutputCheck(
        shape,
        name,
        "ok",
        True,
        max_abs=float(diff.max(initial=0.0)),
        max_rel=float((diff / np.maximum(np.abs(ref64), 1e-6)).max(initial=0.0)),
    )
    if tol.atol is not None:
        bound = tol.atol + tol.rtol * np.abs(ref64)
        check.limit = f"|err| <= {tol.atol:g} + {tol.rtol:g}*|ref|"
        if (diff > bound).any():
            worst = np.unravel_index(np.argmax(diff - bound), diff.shape)
            check.kind, check.passed = "tolerance", False
            check.detail = f"at {list(map(int, worst))}: got {got64[worst]:.6g}, ref {ref64[worst]:.6g}"
    if tol.min_cosine is not None:
        a, b = got64.ravel(), ref64.ravel()
        check.cosine = float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30))
        check.limit = f"cosine >= {tol.min_cosine}"
        if check.cosine < tol.min_cosine:
            check.kind, check.passed = "tolerance", False
    if tol.min_agreement is not None and agreement_kind == "argmax" and ref.ndim >= 1 and ref.shape[-1] > 1:
        agree = got.argmax(-1) == ref.argmax(-1)
        top2 = np.sort(ref64, axis=-1)[..., -2:]
        near_tie = top2[..., 1] - top2[..., 0] <= 2 * (noise or 0.0)
        check.agreement = float(agree.mean())
        check.agreement_with_near_ties = float((agree | near_tie).mean())
        check.limit += f"; argmax agreement (near-ties counted as agreeing) >= {tol.min_agreement}"
        if check.agreement_with_near_ties < tol.min_agreement and check.passed:
            check.kind, check.passed = "agreement", False
    return check


def degenerate_outputs(refs: Mapping[str, Sequence[np.ndarray]]) -> list[str]:
    """Outputs that are ~constant across every validation input (e.g. BLIP's 1e-10 init range)."""
    bad = []
    for name, arrays in refs.items():
        flat = np.concatenate([a.astype(np.float64).ravel() for a in arrays])
        if flat.size > 1 and flat.std() < DEGENERATE_STD:
            bad.append(name)
    return bad


Runner = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


@dataclass
class OutputReferences:
    """Eager outputs of a single-component task on seeded inputs at several shapes."""

    component: Any  # ComponentSpec
    agreement: Mapping[str, str]
    shapes: tuple[InputShape, ...]
    inputs: list[dict[str, np.ndarray]]
    outputs: list[dict[str, np.ndarray]]
    task: str = ""


def output_references(
    model: PreTrainedModel,
    task: TaskSpec,
    *,
    shapes: Sequence[InputShape] = VALIDATION_SHAPES,
    seed: int = 1234,
) -> OutputReferences:
    (component,) = task.components(model.config)
    reference = component.build(model).eval()
    inputs, outputs = [], []
    for i, shape in enumerate(shapes):
        x = task.make_inputs(model.config, shape, seed + i)
        with torch.no_grad():
            ref = reference(*(x[name] for name in component.inputs))
        inputs.append({k: v.numpy() for k, v in x.items()})
        outputs.append({name: r.float().numpy() for name, r in zip(component.outputs, ref)})
    return OutputReferences(component, dict(task.agreement), tuple(shapes), inputs, outputs, task.name)


def compare_outputs(
    refs: OutputReferences, runner: Runner, *, precision: PrecisionConfig
) -> ValidationReport:
    """Run ``runner`` (the artifact) on the references' inputs; per-output checks at each shape."""
    tol = precision.tolerance
    checks: list[OutputCheck] = []
    got = [runner(x) for x in refs.inputs]
    noise = {
        name: noise_level([(ref[name], g[name]) for ref, g in zip(refs.outputs, got) if name in g], tol)
        for name in refs.agreement
    }
    for shape, g, ref in zip(refs.shapes, got, refs.outputs):
        for name in refs.component.outputs:
            checks.append(
                compare_output(
                    name, str(shape), g.get(name), ref[name], tol, refs.agreement.get(name), noise.get(name)
                )
            )
    for name in degenerate_outputs({n: [o[n] for o in refs.outputs] for n in refs.component.outputs}):
        checks.append(
            OutputCheck(
                "all",
                name,
                "degenerate",
                False,
                detail=f"reference output is ~constant (std < {DEGENERATE_STD:g}); the "
                "comparison would pass trivially. Check the weights' initialisation.",
            )
        )
    result = report(checks, precision.name, tol, refs.shapes)
    if tol.min_cosine is not None:  # reduced precisions: the accuracy report (validate/accuracy.py)
        from vlexport.validate.accuracy import outputs_accuracy

        result.accuracy = outputs_accuracy(result.checks, refs.agreement, refs.task, precision.name, tol)
    return result


def report(
    checks: Sequence[OutputCheck], precision: str, tol: Tolerance, shapes: Sequence[InputShape]
) -> ValidationReport:
    worst: dict[str, float] = {}
    for c in checks:
        if c.max_abs is not None:
            worst[c.output] = max(worst.get(c.output, 0.0), c.max_abs)
    failures = [asdict(c) for c in checks if not c.passed]
    return ValidationReport(
        passed=not failures,
        reference="eager PyTorch fp32",
        precision=precision,
        tolerance=tol.as_dict(),
        shapes=[str(s) for s in shapes],
        max_abs_error=worst,
        checks=[asdict(c) for c in checks],
        failures=failures,
    )
