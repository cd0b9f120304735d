"""What the CLI prints beyond one-liners: `vlexport list` (presets, tasks, every registered backend with its
precisions, every precision with its tolerance) and the summary of a written artifact."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.table import Table

if TYPE_CHECKING:
    from vlexport.contracts.manifest import Manifest


def listing() -> dict[str, Any]:
    """Presets, backends (from the registry) and precisions (from their configs), as plain data."""
    from vlexport.contracts.backends import backend_names, backend_precisions, get_backend
    from vlexport.contracts.precision import PRECISIONS
    from vlexport.models import get_family
    from vlexport.presets import PRESETS

    presets = []
    for p in PRESETS.values():
        fam = get_family(p.family)
        presets.append(
            {
                "preset": p.name,
                "family": p.family,
                "checkpoint": p.checkpoint,
                "tiny": p.tiny,
                "tasks": {t: fam.task(t).hf_class_name for t in p.tasks},
                "default_task": p.default_task,
            }
        )
    backends = [
        {
            "name": name,
            "derived_from": b.parent,
            "description": b.description,
            "precisions": list(backend_precisions(b)),
        }
        for name, b in ((n, get_backend(n)) for n in backend_names())
    ]
    precisions = {
        name: {
            "dtype": c.dtype,
            "weight_bits": c.weight_bits,
            "compute": c.compute,
            "tolerance": c.tolerance.as_dict(),
            "backends": list(c.backends),
            "knobs": c.knobs(),
            "description": c.description,
        }
        for name, c in PRECISIONS.items()
    }
    return {"presets": presets, "backends": backends, "precisions": precisions}


def render_listing(data: dict[str, Any]) -> list[Table]:
    # Names never wrap or get cut (users copy them): one section per family, tiny twins last in it;
    # the HF class of each task goes in a second table.
    rows = data["presets"]
    table = Table(title="vlexport presets")
    table.add_column("preset", no_wrap=True)
    table.add_column("tasks (* default)")
    table.add_column("upstream checkpoint", overflow="fold")
    for family in dict.fromkeys(r["family"] for r in rows):
        members = sorted((r for r in rows if r["family"] == family), key=lambda r: r["checkpoint"] is None)
        for r in members:
            tasks = ", ".join(f"{t}{'*' if t == r['default_task'] else ''}" for t in r["tasks"])
            table.add_row(
                r["preset"],
                tasks,
                r["checkpoint"] or ("(composed, see `dual-encoder`)" if r["tiny"] else "(tiny twin, tests)"),
            )
        table.add_section()
    classes = Table(title="tasks")
    for col in ("family", "task", "HF class"):
        classes.add_column(col, no_wrap=True)
    for (family, t), c in {(r["family"], t): c for r in rows for t, c in r["tasks"].items()}.items():
        classes.add_row(family, t, c)
    backends = Table(title="backends (`--json` for descriptions)")
    for col in ("backend", "built from", "precisions"):
        backends.add_column(col, no_wrap=col != "precisions")
    for b in data["backends"]:
        backends.add_row(b["name"], b["derived_from"] or "torch", ", ".join(b["precisions"]) or "-")
    precisions = Table(title="precisions: how each is validated against eager fp32")
    for col in ("precision", "dtype", "weights", "tolerance"):
        precisions.add_column(col, no_wrap=col != "tolerance")
    short = {"atol": "atol", "rtol": "rtol", "min_cosine": "cosine >=", "min_agreement": "agreement >="}
    for name, p in data["precisions"].items():
        precisions.add_row(
            name,
            p["dtype"],
            f"{p['weight_bits']}-bit",
            ", ".join(f"{short[k]} {v:g}" for k, v in p["tolerance"].items()),
        )
    return [table, classes, backends, precisions]


def artifact_summary(directory: Path, manifest: Manifest) -> list[str]:
    """What an export prints: the artifact, its validation verdict and errors, its stage timings."""
    from vlexport.contracts.manifest import component_size

    size = sum(component_size(directory, c) for c in manifest.components.values())
    v = manifest.validation
    mixed = ", ".join(f"{k} {p}" for k, p in manifest.component_precisions.items())
    lines = [
        (
            f"[bold]{directory}[/bold]: {manifest.family} {manifest.task} ({manifest.hf_class}), "
            f"{manifest.backend} {manifest.precision}{f' ({mixed})' if mixed else ''}, "
            f"{len(manifest.components)} component(s), "
            f"{size / 2**20:.1f} MiB, weights: {manifest.weights.get('kind')}"
        )
    ]
    cosines = [c["cosine"] for c in v.checks if c.get("cosine") is not None]
    agreements = [c["agreement"] for c in v.checks if c.get("agreement") is not None]
    if cosines and not v.generation:  # reduced precisions are judged by direction and task results
        lines.append(
            f"validation {v.verdict} vs {v.reference} at {', '.join(v.shapes)}: min cosine {min(cosines):.5f}"
            + (f", min argmax agreement {min(agreements):.3f}" if agreements else "")
        )
    elif v.max_abs_error and not v.generation:
        errs = ", ".join(f"{k} {e:.2e}" for k, e in v.max_abs_error.items())
        lines.append(
            f"validation {v.verdict} vs {v.reference} at {', '.join(v.shapes)}: max abs error {errs}"
        )
    else:
        lines.append(f"validation {v.verdict}" + (f": {v.summary}" if v.summary else ""))
    if v.accuracy is not None:
        lines += v.accuracy.lines()
    if manifest.timings:
        lines.append("timings: " + ", ".join(f"{k} {s:.1f}s" for k, s in manifest.timings.items()))
    return lines
