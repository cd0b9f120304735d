"""Which component of a reduced-precision generative artifact loses the accuracy: each changed component
alone, the others from the fp32 parent, judged against the same eager references as the whole variant.

A BLIP-2 variant quantizes the vision tower and the language model; its report says how far its tokens and
logits moved, not which of the two moved them. Here every component the precision pass changed (its content
hash differs from the parent's) is loaded beside the parent's other components and decoded greedily at the
validation's largest batch size (``GenerationCheck.attribution``): greedy token agreement, first-divergence
step and per-step logit cosine, per component. It is what TensorRT-LLM users measure by hand before they keep
the vision tower in bf16 and quantize the decoder. The parent's files are loaded from where they are (the
fp32 artifact, or the scratch parent of the export): nothing is copied.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from vlexport.contracts.backends import LoadOptions, get_backend
from vlexport.contracts.family import TaskSpec
from vlexport.contracts.manifest import Manifest
from vlexport.runtime import Artifact
from vlexport.validate.generation import GenerationCheck

# the accuracy figures attribution keeps per component (validate/accuracy.generation_accuracy's names)
FIGURES = (
    "greedy_samples",
    "greedy_token_agreement",
    "agreement_with_near_ties",
    "mean_first_divergence_step",
    "min_logit_cosine",
    "mean_logit_cosine",
)


def changed_components(variant: Manifest, parent: Manifest) -> list[str]:
    """The components whose graph or weights differ from the parent's (by recorded content hash; a
    component without hashes on either side counts as changed)."""
    out = []
    for name, comp in variant.components.items():
        before = parent.components.get(name)
        files = [comp.file, comp.external_data]
        same = (
            before is not None
            and [before.file, before.external_data] == files
            and all(f is None or (variant.sha256.get(f) or "?") == parent.sha256.get(f) for f in files)
        )
        if not same:
            out.append(name)
    return out


def attribute_components(
    check: GenerationCheck,
    variant_dir: Path,
    variant: Manifest,
    parent_dir: Path,
    parent: Manifest,
    task_spec: TaskSpec,
    *,
    device: str,
    progress: Callable[[str], None] = lambda _: None,
) -> dict[str, dict[str, Any]]:
    """Per changed component: its precision and :data:`FIGURES` with it alone at reduced precision.
    Empty when fewer than two components changed (the whole variant's report already says it all)."""
    changed = changed_components(variant, parent)
    if len(changed) < 2 or parent.backend != variant.backend:
        return {}
    backend = get_backend(variant.backend)
    out: dict[str, dict[str, Any]] = {}
    for name in changed:
        progress(f"attributing accuracy: {name} alone at reduced precision")
        precision = variant.component_precisions.get(name, variant.precision)
        records = {c: (variant if c == name else parent).components[c] for c in variant.components}
        manifest = replace(
            variant,
            components=records,
            component_precisions={},
            precision=precision,
            precision_knobs=variant.precision_knobs if precision == variant.precision else {},
        )
        fns = {
            c: backend.load((variant_dir if c == name else parent_dir) / record.file, LoadOptions(device))
            for c, record in records.items()
        }
        report = check.attribution(Artifact(variant_dir, manifest, task_spec, fns))
        del fns
        gc.collect()  # one mixed pipeline in memory at a time (full-size BLIP-2: GBs each)
        figures = (report.accuracy.generation or {}) if report.accuracy is not None else {}
        out[name] = {"precision": precision, **{k: figures.get(k) for k in FIGURES}}
    return out
