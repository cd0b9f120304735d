"""The verbs that read artifacts and registries: `list`, `validate`, `run`, with their arguments."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from rich.markup import escape

from vlexport.artifact import atomic_write_text
from vlexport.cli import options as opts
from vlexport.cli.common import Command, console, out


def _list_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="machine-readable output")


def cmd_list(args: argparse.Namespace) -> int:
    from vlexport.display import listing, render_listing

    data = listing()
    if args.json:
        out.print_json(json.dumps(data))
    else:
        for table in render_listing(data):
            out.print(table)
    return 0


def _validate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("directory", type=Path, help="artifact directory")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    p.add_argument("--json", type=Path, help="also write the validation report here")


def cmd_validate(args: argparse.Namespace) -> int:
    from vlexport.validate import raise_on_failure, validate_directory

    # before validation runs, so its report is not lost, and never over the artifact it reads
    opts.check_report_paths({"--json": args.json}, inputs=[args.directory])
    with console.status("validating"):
        report = validate_directory(args.directory, device=args.device)
    if args.json:
        atomic_write_text(args.json, json.dumps(asdict(report), indent=2, default=str) + "\n")
    from vlexport.validate.accuracy import below_thresholds_only

    raise_on_failure(
        report,
        str(args.directory),
        "It is below its precision's accuracy thresholds (a variant kept with --accept-degraded stays "
        "so): build a more accurate one, or use the fp32 artifact."
        if below_thresholds_only(report)
        else "Its files are the ones validated at export (their hashes match), so what differs is where it "
        "runs: compare the `versions` in its manifest.json with this environment's (onnxruntime, torch), "
        "try the --device it was validated on, or export it again here.",
    )
    errs = ", ".join(f"{k} {e:.2e}" for k, e in report.max_abs_error.items())
    out.print(
        f"{args.directory}: validation passed vs {report.reference}"
        + (f"; max abs error {errs}" if errs else "")
        + (f"; {report.summary}" if report.summary else "")
    )
    return 0


def _run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("directory", type=Path, help="artifact directory")
    p.add_argument("--image", type=Path, required=True, help="image file (JPEG, PNG, ...)")
    p.add_argument(
        "--text",
        action="append",
        default=[],
        help="prompt / question (generative tasks) or text to score; may be given several times",
    )
    opts.add_ranged(p, "--max-new-tokens", "tokens to generate (default: the artifact's, else 20)")
    opts.add_ranged(p, "--num-beams", "beam search width (default: greedy)")
    p.add_argument("--ids", action="store_true", help="also print the token ids")
    p.add_argument(
        "--raw-prompt", action="store_true", help="BLIP-2: use --text as is, not 'Question: ... Answer:'"
    )
    p.add_argument("--device", default="auto", choices=("cpu", "cuda", "auto"))
    p.add_argument(
        "--verify",
        action="store_true",
        help="check every file's sha256 against the manifest first (native code: always checked)",
    )


def cmd_run(args: argparse.Namespace) -> int:
    from vlexport.runtime.run import run_artifact

    result = run_artifact(
        args.directory,
        args.image,
        args.text,
        max_new_tokens=args.max_new_tokens,
        num_beams=args.num_beams,
        device=args.device,
        raw_prompt=args.raw_prompt,
        verify=args.verify,
    )
    for line in result.lines:
        prefix = (
            f"{line.text}: "
            if line.text is not None and (result.kind == "scores" or len(result.lines) > 1)
            else ""
        )
        if result.kind == "scores":
            out.print(escape(prefix + ", ".join(f"{k} {v:.4f}" for k, v in line.score.items())))
        elif line.output is not None:
            out.print(escape(prefix + line.output))
        if args.ids or line.output is None and result.kind == "generate":
            out.print(f"ids: {line.ids}")
    for note in result.notes:
        console.print(f"[dim]note: {escape(note)}[/dim]")
    return 0


COMMANDS: tuple[Command, ...] = (
    Command("list", "presets, tasks, backends and their precisions", _list_args, cmd_list),
    Command(
        "validate",
        "re-run validation of an artifact directory against eager PyTorch",
        _validate_args,
        cmd_validate,
    ),
    Command("run", "caption / answer / score an image with an artifact directory", _run_args, cmd_run),
)
