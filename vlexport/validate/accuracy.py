"""The accuracy report of a reduced-precision variant against eager fp32, and its verdict.

Built from validation's own checks (the seeded validation inputs, never a calibration set), one record
(:class:`vlexport.contracts.manifest.AccuracyReport`) for the manifest, the CLI and the exit code:

* encoders: per output, the smallest cosine and largest absolute error over the shapes; per output the
  task declares an agreement kind for (models/ ``TaskSpec.agreement``), the task-level agreement (ITM
  argmax, ITC retrieval rank@1 over the batch, MLM top-1), worst shape;
* generation: the share of greedy samples whose tokens equal fp32's, the mean first-divergence step,
  the per-step logit cosine up to the first divergence; beam agreement is reported beside it.

Thresholds are the precision config's :class:`Tolerance` (contracts/precision.py): cosine >= min_cosine
on every output (for generation: on every step's logits), agreement >= min_agreement. A sample whose
tokens diverge where the reference's top-2 logit gap is within twice the artifact's logit error there
(a near-tie: fp32 itself barely prefers its token) counts as agreeing; the logit cosine still has to pass.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from vlexport.contracts.manifest import AccuracyReport, ValidationReport
from vlexport.contracts.precision import Tolerance

# What an argmax agreement means, per task name (the kinds models/ declare are generic: "argmax").
TASK_LABELS = {
    "itm": "ITM argmax",
    "itc": "ITC retrieval rank@1 over the batch",
    "mlm": "MLM top-1",
    "features": "retrieval rank@1 over the batch",
}
# Failure kinds a degraded variant may have (accuracy below threshold); anything else is a broken artifact.
ACCURACY_KINDS = frozenset({"tolerance", "agreement", "mismatch", "accuracy"})


def _min(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return float(min(vals)) if vals else None


def outputs_accuracy(
    checks: Sequence[Mapping[str, Any]],
    agreement: Mapping[str, str],
    task: str,
    precision: str,
    tol: Tolerance,
) -> AccuracyReport:
    """Aggregate validate.outputs' per-(output, shape) checks into the report."""
    outputs: dict[str, dict[str, Any]] = {}
    tasks: dict[str, dict[str, Any]] = {}
    for name in dict.fromkeys(c["output"] for c in checks if c.get("shape") != "all"):
        mine = [c for c in checks if c["output"] == name and c.get("shape") != "all"]
        outputs[name] = {
            "cosine": _min([c.get("cosine") for c in mine]),
            "max_abs": max((c["max_abs"] for c in mine if c.get("max_abs") is not None), default=None),
        }
        if agreement.get(name):
            tasks[name] = {
                "kind": TASK_LABELS.get(task, f"{task} {agreement[name]}"),
                "agreement": _min([c.get("agreement") for c in mine]),
                "agreement_with_near_ties": _min([c.get("agreement_with_near_ties") for c in mine]),
            }
    misses = [
        f"{n}: cosine {o['cosine']:.5f} < {tol.min_cosine}"
        for n, o in outputs.items()
        if tol.min_cosine is not None and o["cosine"] is not None and o["cosine"] < tol.min_cosine
    ]
    misses += [
        f"{n}: {t['kind']} agreement {t['agreement_with_near_ties']:.3f} (near-ties counted as agreeing) < "
        f"{tol.min_agreement}"
        for n, t in tasks.items()
        if tol.min_agreement is not None
        and t["agreement_with_near_ties"] is not None
        and t["agreement_with_near_ties"] < tol.min_agreement
    ]
    return AccuracyReport(
        precision=precision,
        passed=not misses,
        thresholds=tol.as_dict(),
        outputs=outputs,
        tasks=tasks,
        misses=misses,
    )


def generation_accuracy(
    checks: Sequence[Any], precision: str, tol: Tolerance, max_new_tokens: int
) -> AccuracyReport:
    """``checks``: validate.generation's TokenChecks (one per sample and decode case)."""
    tokens = [c for c in checks if c.output == "tokens"]
    greedy = [c for c in tokens if "greedy" in c.shape]
    beam = [c for c in tokens if "greedy" not in c.shape]

    def share(cs: Sequence[Any], *, ties: bool) -> float | None:
        return float(np.mean([c.kind == "ok" or (ties and c.near_tie) for c in cs])) if cs else None

    steps = [c.step for c in greedy if c.kind != "ok" and c.step is not None]
    cosines = [c.logit_cosine for c in greedy if c.logit_cosine is not None]
    g = {
        "greedy_samples": len(greedy),
        "greedy_token_agreement": share(greedy, ties=False),
        "agreement_with_near_ties": share(greedy, ties=True),
        "near_tie_divergences": sum(c.kind != "ok" and c.near_tie for c in greedy),
        "mean_first_divergence_step": float(np.mean(steps)) if steps else None,
        "min_logit_cosine": _min(cosines),
        "mean_logit_cosine": float(np.mean(cosines)) if cosines else None,
        "beam_token_agreement": share(beam, ties=False),
        "beam_agreement_with_near_ties": share(beam, ties=True),
        "max_new_tokens": max_new_tokens,
    }
    misses = []
    need = tol.min_agreement
    for key, what in (("agreement_with_near_ties", "greedy"), ("beam_agreement_with_near_ties", "beam")):
        if need is not None and g[key] is not None and g[key] < need:
            misses.append(f"{what} token agreement {g[key]:.3f} (near-ties counted as agreeing) < {need}")
    if (
        tol.min_cosine is not None
        and g["min_logit_cosine"] is not None
        and g["min_logit_cosine"] < tol.min_cosine
    ):
        misses.append(f"per-step logit cosine {g['min_logit_cosine']:.5f} < {tol.min_cosine}")
    return AccuracyReport(
        precision=precision, passed=not misses, thresholds=tol.as_dict(), generation=g, misses=misses
    )


def below_thresholds_only(report: ValidationReport) -> bool:
    """A miss of a reduced precision's accuracy thresholds only (what ``--accept-degraded`` may keep), not a
    broken artifact (missing output, wrong shape, NaN, constant reference)."""
    if report.passed is not False or report.accuracy is None:
        return False
    return not [
        f for f in report.failures if f.get("kind") not in ACCURACY_KINDS or "NaN" in str(f.get("detail"))
    ]


def accept_degraded(report: ValidationReport) -> bool:
    """``--accept-degraded``: keep a variant that only missed accuracy thresholds, marked as degraded.

    A broken artifact (missing output, wrong shape, NaN, constant reference) is never kept. Returns whether
    the report was accepted (its accuracy record is then marked ``degraded``).
    """
    if not below_thresholds_only(report):
        return False
    report.accuracy.degraded = True
    report.summary = (
        report.summary + "; " if report.summary else ""
    ) + "BELOW the precision's accuracy thresholds, kept with --accept-degraded"
    return True
