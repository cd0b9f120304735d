"""The one entry point. Thin: parse, call the library, print. Exit codes: 0 ok, 1 failed check, 2 usage."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table

from vlexport.errors import UsageError, VlexportError

console = Console(stderr=True, highlight=False, soft_wrap=True)
out = Console(highlight=False, soft_wrap=True)

Command = Callable[[argparse.Namespace], int]
COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Command, str]] = {}


def command(name: str, help: str) -> Callable:
    """Register ``add_<name>_args`` / ``cmd_<name>`` pairs by decorating the command function."""

    def wrap(fn: Command) -> Command:
        COMMANDS[name] = (getattr(sys.modules[__name__], f"_{name.replace('-', '_')}_args"), fn, help)
        return fn

    return wrap


def _csv(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


def _ints(value: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in _csv(value))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of integers, got {value!r}") from None


# ---------------------------------------------------------------- list
def _list_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="machine-readable output")


@command("list", "presets, tasks, backends, precisions")
def cmd_list(args: argparse.Namespace) -> int:
    from vlexport.models import get_family
    from vlexport.presets import PRESETS
    from vlexport.validate import TOLERANCES

    rows = []
    for p in PRESETS.values():
        fam = get_family(p.family)
        rows.append({"preset": p.name, "family": p.family, "checkpoint": p.checkpoint, "tiny": p.tiny,
                     "tasks": {t: fam.task(t).hf_class_name for t in p.tasks}, "default_task": p.default_task})
    if args.json:
        out.print_json(json.dumps({"presets": rows, "backends": ["onnx"], "precisions": list(TOLERANCES)}))
        return 0
    table = Table(title="vlexport presets")
    for col in ("preset", "family", "tasks (HF class)", "upstream checkpoint", "tiny twin"):
        table.add_column(col)
    for r in rows:
        tasks = "\n".join(f"{t}{'*' if t == r['default_task'] else ''}: {c}" for t, c in r["tasks"].items())
        table.add_row(r["preset"], r["family"], tasks, r["checkpoint"] or "-", r["tiny"] or "-")
    out.print(table)
    out.print("* default task.  Backends: onnx.  Precisions: " + ", ".join(TOLERANCES))
    return 0


# ---------------------------------------------------------------- onnx
def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="preset name (`vlexport list`) or a local directory written by save_pretrained")
    p.add_argument("--task", help="task / head to export (default: the preset's first task)")
    p.add_argument("--random-weights", action="store_true", help="seeded random weights (no checkpoint needed)")
    p.add_argument("--seed", type=int, default=0, help="seed for --random-weights and example inputs")


def _onnx_args(p: argparse.ArgumentParser) -> None:
    _model_args(p)
    p.add_argument("-o", "--output", type=Path, help="artifact directory (default: ./<model>-<task>-onnx)")
    p.add_argument("--precision", default="fp32", help="fp32 (convert later with `vlexport quantize`)")
    p.add_argument("--optimize", action="store_true", help="ONNX Runtime graph optimizations and fusions")
    p.add_argument("--kernels", type=_csv, default=(), help="inject fused kernels: attention,bridge")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default 18)")
    p.add_argument("--no-validate", action="store_true", help="skip validation (the manifest says so)")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")


@command("onnx", "export to ONNX and validate against eager PyTorch")
def cmd_onnx(args: argparse.Namespace) -> int:
    from vlexport.export.onnx import DEFAULT_OPSET
    from vlexport.pipeline import ExportJob, run_export

    job = ExportJob(args.model, args.output, task=args.task, precision=args.precision, random_weights=args.random_weights,
                    seed=args.seed, optimize=args.optimize, kernels=args.kernels, force=args.force,
                    opset=args.opset or DEFAULT_OPSET, validate=not args.no_validate)
    with console.status("exporting") as status:
        manifest = run_export(job, progress=lambda msg: status.update(msg))
    _print_summary(job.output, manifest)
    return 0


def _print_summary(directory: Path, manifest) -> None:
    from vlexport.manifest import component_size

    size = sum(component_size(directory, c) for c in manifest.components.values())
    v = manifest.validation
    verdict = "skipped" if v.get("skipped") else ("passed" if v.get("passed") else "FAILED")
    out.print(f"[bold]{directory}[/bold]: {manifest.family} {manifest.task} ({manifest.hf_class}), "
              f"{manifest.backend} {manifest.precision}, {len(manifest.components)} component(s), "
              f"{size / 2**20:.1f} MiB, weights: {manifest.weights.get('kind')}")
    if v.get("max_abs_error"):
        errs = ", ".join(f"{k} {e:.2e}" for k, e in v["max_abs_error"].items())
        out.print(f"validation {verdict} vs {v['reference']} at {', '.join(v['shapes'])}: max abs error {errs}")
    else:
        out.print(f"validation {verdict}" + (f": {v['summary']}" if v.get("summary") else ""))
    if manifest.timings:
        out.print("timings: " + ", ".join(f"{k} {s:.1f}s" for k, s in manifest.timings.items()))


# ---------------------------------------------------------------- dual-encoder
def _dual_encoder_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("vision", type=Path, help="vision encoder directory (save_pretrained: ViT, CLIP vision, ...)")
    p.add_argument("text", type=Path, help="text encoder directory (save_pretrained: BERT, RoBERTa, ...)")
    p.add_argument("-o", "--output", type=Path, required=True, help="where to save the combined model")
    p.add_argument("--projection-dim", type=int, default=512)
    p.add_argument("--seed", type=int, default=0, help="seed for the new projection layers")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")


@command("dual-encoder", "combine two local encoders into a VisionTextDualEncoder directory")
def cmd_dual_encoder(args: argparse.Namespace) -> int:
    from vlexport.compose import compose_dual_encoder

    path = compose_dual_encoder(args.vision, args.text, args.output, projection_dim=args.projection_dim,
                                seed=args.seed, force=args.force)
    out.print(f"{path}: VisionTextDualEncoder (new projections, seed {args.seed}); export it with "
              f"`vlexport onnx {path}`")
    return 0


# ---------------------------------------------------------------- validate
def _validate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("directory", type=Path, help="artifact directory")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    p.add_argument("--json", type=Path, help="also write the validation report here")


@command("validate", "re-run validation of an artifact directory against eager PyTorch")
def cmd_validate(args: argparse.Namespace) -> int:
    from vlexport.validate import raise_on_failure, validate_directory

    with console.status("validating"):
        result = validate_directory(args.directory, device=args.device)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str) + "\n")
    raise_on_failure(result, str(args.directory))
    errs = ", ".join(f"{k} {e:.2e}" for k, e in result.get("max_abs_error", {}).items())
    out.print(f"{args.directory}: validation passed vs {result['reference']}"
              + (f"; max abs error {errs}" if errs else "") + (f"; {result['summary']}" if result.get("summary") else ""))
    return 0


# ---------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vlexport", description="Export, validate and benchmark Hugging Face vision-language models. "
        "Exit codes: 0 ok, 1 failed check, 2 usage error.")
    from vlexport import __version__

    parser.add_argument("--version", action="version", version=f"vlexport {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (add_args, fn, help) in COMMANDS.items():
        p = sub.add_parser(name, help=help, description=help)
        add_args(p)
        p.set_defaults(func=fn)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-tensor "Loading weights" bars drown the CLI's own output
    try:
        return args.func(args)
    except VlexportError as e:
        console.print(f"[red]error:[/red] {e}", soft_wrap=True)
        return e.exit_code
    except KeyboardInterrupt:
        console.print("[red]interrupted:[/red] nothing was written (partial output removed).")
        return 130
    except (ValueError, OSError) as e:
        # Library errors we did not anticipate still get one readable paragraph, not a traceback.
        if os.environ.get("VLEXPORT_DEBUG"):
            raise
        console.print(f"[red]error:[/red] {type(e).__name__}: {e}. Re-run with VLEXPORT_DEBUG=1 for a traceback.",
                      soft_wrap=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
