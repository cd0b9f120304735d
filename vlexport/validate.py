"""Artifact vs eager: per-output errors for encoders, token agreement for generation. A miss is fatal.

The reference is always the eager PyTorch model in fp32 on the same seeded inputs, at several batch
sizes and sequence lengths other than the export example, with padded attention masks.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedModel

from vlexport.errors import ValidationError
from vlexport.manifest import Manifest
from vlexport.models.base import TaskSpec
from vlexport.models.inputs import VALIDATION_SHAPES, InputShape


@dataclass(frozen=True)
class Tolerance:
    """Per-precision tolerance. fp32 compares values; reduced precisions compare direction and task results."""

    atol: float | None = None  # elementwise |a - b| <= atol + rtol * |b|
    rtol: float | None = None
    min_cosine: float | None = None  # per-output cosine similarity of the flattened tensors
    min_agreement: float | None = None  # share of rows whose task-level result (argmax) agrees


# The one table of tolerances. fp32: the exporters reorder float ops (fused matmuls, different
# reduction orders) so errors of ~1e-6 relative are normal; 1e-4 leaves room for deep models without
# hiding a wrong graph (a wrong mask or cache gives errors of 1e-2 or more).
# fp16 keeps ~3 decimal digits, bf16 ~2: cosines of 0.999 / 0.99 over whole outputs. int8 dynamic
# quantization of activations and weights loses more: 0.98, with task agreement on top.
TOLERANCES: dict[str, Tolerance] = {
    "fp32": Tolerance(atol=1e-4, rtol=1e-4),
    "fp16": Tolerance(min_cosine=0.999, min_agreement=0.99),
    "bf16": Tolerance(min_cosine=0.99, min_agreement=0.95),
    "int8-dynamic": Tolerance(min_cosine=0.98, min_agreement=0.9),
    "int8-static": Tolerance(min_cosine=0.98, min_agreement=0.9),
    "int8-weight": Tolerance(min_cosine=0.99, min_agreement=0.95),
}

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
    limit: str = ""
    detail: str = ""


def compare_output(name: str, shape: str, got: np.ndarray | None, ref: np.ndarray, tol: Tolerance,
                   agreement_kind: str | None = None) -> OutputCheck:
    if got is None:
        return OutputCheck(shape, name, "missing", False, detail="output not produced by the artifact")
    if got.shape != ref.shape:
        return OutputCheck(shape, name, "shape", False, detail=f"shape {list(got.shape)} != reference {list(ref.shape)}")
    got64, ref64 = got.astype(np.float64), ref.astype(np.float64)
    if not np.isfinite(got64).all():
        return OutputCheck(shape, name, "tolerance", False, detail="artifact output has NaN or Inf")
    diff = np.abs(got64 - ref64)
    check = OutputCheck(shape, name, "ok", True, max_abs=float(diff.max(initial=0.0)),
                        max_rel=float((diff / np.maximum(np.abs(ref64), 1e-6)).max(initial=0.0)))
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
        check.agreement = float((got.argmax(-1) == ref.argmax(-1)).mean())
        check.limit += f"; argmax agreement >= {tol.min_agreement}"
        if check.agreement < tol.min_agreement and check.passed:
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


def output_references(model: PreTrainedModel, task: TaskSpec, *, shapes: Sequence[InputShape] = VALIDATION_SHAPES,
                      seed: int = 1234) -> OutputReferences:
    (component,) = task.components(model.config)
    reference = component.build(model).eval()
    inputs, outputs = [], []
    for i, shape in enumerate(shapes):
        x = task.make_inputs(model.config, shape, seed + i)
        with torch.no_grad():
            ref = reference(*(x[name] for name in component.inputs))
        inputs.append({k: v.numpy() for k, v in x.items()})
        outputs.append({name: r.float().numpy() for name, r in zip(component.outputs, ref)})
    return OutputReferences(component, dict(task.agreement), tuple(shapes), inputs, outputs)


def compare_outputs(refs: OutputReferences, runner: Runner, *, precision: str) -> dict[str, Any]:
    """Run ``runner`` (the artifact) on the references' inputs; per-output checks at each shape."""
    tol = TOLERANCES[precision]
    checks: list[OutputCheck] = []
    for shape, x, ref in zip(refs.shapes, refs.inputs, refs.outputs):
        got = runner(x)
        for name in refs.component.outputs:
            checks.append(compare_output(name, str(shape), got.get(name), ref[name], tol, refs.agreement.get(name)))
    for name in degenerate_outputs({n: [o[n] for o in refs.outputs] for n in refs.component.outputs}):
        checks.append(OutputCheck("all", name, "degenerate", False,
                                  detail=f"reference output is ~constant (std < {DEGENERATE_STD:g}); the "
                                         "comparison would pass trivially. Check the weights' initialisation."))
    return report(checks, precision, tol, refs.shapes)


def report(checks: Sequence[OutputCheck], precision: str, tol: Tolerance, shapes: Sequence[InputShape],
           **extra: Any) -> dict[str, Any]:
    failures = [asdict(c) for c in checks if not c.passed]
    worst: dict[str, float] = {}
    for c in checks:
        if c.max_abs is not None:
            worst[c.output] = max(worst.get(c.output, 0.0), c.max_abs)
    return {
        "passed": not failures,
        "reference": "eager PyTorch fp32",
        "precision": precision,
        "tolerance": {k: v for k, v in asdict(tol).items() if v is not None},
        "shapes": [str(s) for s in shapes],
        "max_abs_error": worst,
        "checks": [asdict(c) for c in checks],
        "failures": failures,
        **extra,
    }


def raise_on_failure(result: dict[str, Any], where: str) -> None:
    if result["passed"]:
        return
    lines = []
    for f in result["failures"][:8]:
        if f.get("step") is not None:  # generation mismatch
            lines.append(f"  sample {f.get('sample')}: {f.get('detail')}")
            continue
        err = ", ".join(f"{k}={f[k]:.3g}" for k in ("max_abs", "max_rel", "cosine", "agreement") if f.get(k) is not None)
        lines.append(f"  {f['output']} @ {f['shape']}: {f['kind']} ({err}) limit {f['limit'] or '-'} {f['detail']}")
    more = len(result["failures"]) - 8
    raise ValidationError(
        f"Validation failed for {where}: {len(result['failures'])} check(s) missed against {result['reference']}.\n"
        + "\n".join(lines) + (f"\n  ... and {more} more" if more > 0 else ""),
        result,
    )


ArtifactCheck = Callable[[Any], dict[str, Any]]


def eager_references(model: PreTrainedModel, task: TaskSpec) -> ArtifactCheck:
    """Run the eager side of validation now; return ``check(artifact) -> report``, which needs no model.

    Callers that own the model drop it before loading the artifact, so that eager weights and the
    artifact's weights are never in memory together: the peak is one copy, not two, which is what lets
    a model that fills half the machine (BLIP-2's 3.7B parameters) be validated on it.
    """
    if task.generative:
        from vlexport.runtime.generation_check import compare_generation, generation_references

        gen_refs = generation_references(model, task)
        return lambda artifact: compare_generation(gen_refs, artifact)
    refs = output_references(model, task)
    return lambda artifact: compare_outputs(refs, artifact.run, precision=artifact.manifest.precision)


def validate_directory(directory: str | Path, *, device: str = "cpu") -> dict[str, Any]:
    """Re-run validation from the artifact directory alone (rebuilding the eager reference)."""
    from vlexport.runtime import load_artifact
    from vlexport.weights import load_model, source_from_manifest

    directory = Path(directory)
    manifest = Manifest.read(directory)
    source = source_from_manifest(manifest, directory)
    check = eager_references(load_model(source, manifest.task), source.family.task(manifest.task))
    gc.collect()  # the eager model is gone before the artifact's weights load
    return check(load_artifact(directory, manifest=manifest, device=device))


def validate_artifact(model: PreTrainedModel, artifact: Any) -> dict[str, Any]:
    """Generation agreement for generative tasks, per-output errors otherwise."""
    return eager_references(model, artifact.task_spec)(artifact)
