"""Artifact vs eager: per-output errors for encoders, token agreement for generation. A miss is fatal.

* :mod:`vlexport.validate.outputs`: encoder artifacts, per output and shape, tolerances from the precision
  configs (contracts/precision.py);
* :mod:`vlexport.validate.generation`: generative artifacts, tokens vs HF ``generate()``.

Both produce a :class:`vlexport.contracts.manifest.ValidationReport`. The eager side runs first and the model
can be dropped before the artifact loads (:func:`eager_references`), so both sets of weights are never in
memory together. This package uses the runtime (it runs artifacts); the runtime never imports it.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformers import PreTrainedModel

from vlexport.contracts.family import TaskSpec
from vlexport.contracts.manifest import Manifest, ValidationReport
from vlexport.errors import ValidationError
from vlexport.validate.outputs import compare_outputs, output_references

if TYPE_CHECKING:
    from vlexport.runtime import Artifact


ArtifactCheck = Callable[[Any], ValidationReport]


def eager_references(model: PreTrainedModel, task: TaskSpec) -> ArtifactCheck:
    """Run the eager side of validation now; return ``check(artifact) -> report``, which needs no model.

    Callers that own the model drop it before loading the artifact, so that eager weights and the
    artifact's weights are never in memory together: the peak is one copy, not two, which is what lets
    a model that fills half the machine (BLIP-2's 3.7B parameters) be validated on it.
    """
    if task.generative:
        from vlexport.validate.generation import GenerationCheck, generation_references

        return GenerationCheck(generation_references(model, task))
    refs = output_references(model, task)

    def check(artifact: Artifact) -> ValidationReport:
        report = compare_outputs(refs, artifact.run, precision=artifact.manifest.precision_config)
        if report.accuracy is not None:  # where int8-static's scales came from (never these inputs)
            report.accuracy.calibration = (artifact.manifest.derived_from or {}).get("calibration")
        return report

    return check


def raise_on_failure(report: ValidationReport, where: str, advice: str = "") -> None:
    """A miss is an error (exit 1) that names each failed output or sample, its error and its limit, and then
    ``advice``: what to do next."""
    if report.passed is not False:
        return
    raise ValidationError(
        f"Validation failed for {where}: {len(report.failures)} check(s) missed against {report.reference}.\n"
        + "\n".join(report.failure_lines())
        + (f"\n{advice}" if advice else ""),
        report,
    )


def validate_directory(directory: str | Path, *, device: str = "cpu") -> ValidationReport:
    """Re-run validation from the artifact directory alone (rebuilding the eager reference)."""
    from vlexport.runtime import check_device, load_artifact
    from vlexport.weights import load_model, source_from_manifest

    check_device(device)  # before the eager references, not after
    directory = Path(directory)
    manifest = Manifest.read(directory)
    # every file, before minutes of eager references: is this what was validated?
    manifest.verify_hashes(directory)
    source = source_from_manifest(manifest, directory)
    check = eager_references(load_model(source, manifest.task), source.family.task(manifest.task))
    gc.collect()  # the eager model is gone before the artifact's weights load
    return check(load_artifact(directory, manifest=manifest, device=device, verify="none"))  # hashed above


def validate_artifact(model: PreTrainedModel, artifact: Artifact) -> ValidationReport:
    """Generation agreement for generative tasks, per-output errors otherwise."""
    return eager_references(model, artifact.task_spec)(artifact)


__all__ = [
    "ArtifactCheck",
    "ValidationReport",
    "eager_references",
    "raise_on_failure",
    "validate_artifact",
    "validate_directory",
]
