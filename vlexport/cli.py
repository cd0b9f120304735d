"""The one entry point. Thin: parse, call the library, print. Exit codes: 0 ok, 1 failed check, 2 usage."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from vlexport import cli_args as opts  # option types and up-front checks
from vlexport.artifact import atomic_write_text, check_output_dir
from vlexport.cli_serve import cmd_triton, triton_args
from vlexport.errors import UsageError, VlexportError

console = Console(stderr=True, highlight=False, soft_wrap=True)
out = Console(highlight=False, soft_wrap=True)

Handler = Callable[[argparse.Namespace], int]


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    add_args: Callable[[argparse.ArgumentParser], None]
    run: Handler
    parents: tuple[Callable[[], argparse.ArgumentParser], ...] = ()
    aliases: tuple[str, ...] = ()


# ---------------------------------------------------------------- shared flags (argparse parents)
def _model_flags() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--task", help="task / head to export (default: the preset's first task)")
    p.add_argument("--random-weights", action="store_true", help="seeded random weights (no checkpoint needed)")
    opts.add_ranged(p, "--seed", "seed for --random-weights and example inputs", 0)
    p.add_argument("--allow-new-weights", type=opts.csv, default=(), metavar="GLOB,...",
                   help="checkpoint tensors that may be missing and get fresh seeded values (e.g. a new head); "
                        "recorded in the manifest. Without it a checkpoint that lacks tensors is refused")
    return p


def _artifact_flags() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("-o", "--output", type=Path, help="artifact directory (default: ./<model>-<task>-<backend>)")
    p.add_argument("--no-validate", action="store_true", help="skip validation (the manifest says so)")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    return p


def _kernel_flags() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--kernels", type=opts.csv, default=(), help="inject fused kernels: attention,bridge")
    return p


# ---------------------------------------------------------------- list
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


# ---------------------------------------------------------------- onnx / compile / tensorrt
def _model_arg(p: argparse.ArgumentParser, *, artifact: bool = False) -> None:
    what = "preset name (`vlexport list`) or a local directory written by save_pretrained"
    p.add_argument("model", help=what + (", or an ONNX artifact directory" if artifact else ""))


def _onnx_args(p: argparse.ArgumentParser) -> None:
    _model_arg(p)
    p.add_argument("--precision", default="fp32", choices=("fp32", "fp16", "int8-dynamic", "int8-weight"),
                   help="fp32, or a variant of the fp32 export (as `vlexport quantize` makes it)")
    p.add_argument("--optimize", action="store_true",
                   help="ONNX Runtime graph optimizations and fusions (backend onnx-opt)")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default 18)")


def _export(args: argparse.Namespace, backend: str, verb: str, **options: object) -> int:
    from vlexport.display import artifact_summary
    from vlexport.pipeline import ExportJob, run_export

    job = ExportJob(args.model, args.output, backend=backend, task=getattr(args, "task", None),
                    precision=args.precision, random_weights=getattr(args, "random_weights", False),
                    seed=getattr(args, "seed", 0), allow_new_weights=getattr(args, "allow_new_weights", ()),
                    kernels=getattr(args, "kernels", ()),
                    force=args.force, validate=not args.no_validate,
                    options={k: v for k, v in options.items() if v is not None},
                    calibration=getattr(args, "calibration", None), method=getattr(args, "method", None),
                    smooth=getattr(args, "smooth", None), block_size=getattr(args, "block_size", None),
                    accept_degraded=getattr(args, "accept_degraded", False))
    with console.status(verb) as status:
        manifest = run_export(job, progress=lambda msg: status.update(msg))
    for line in artifact_summary(job.output, manifest):
        out.print(line)
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from vlexport.manifest import Manifest

    opts.check_quantize_args(args)
    manifest = Manifest.read(args.model)
    opts.check_quantize_source(args, manifest)
    return _export(args, manifest.backend, "quantizing")


def cmd_onnx(args: argparse.Namespace) -> int:
    return _export(args, "onnx-opt" if args.optimize else "onnx", "exporting", opset=args.opset)


def _compile_args(p: argparse.ArgumentParser) -> None:
    _model_arg(p)
    opts.compile_args(p)


def cmd_compile(args: argparse.Namespace) -> int:
    return _export(args, "aoti", "compiling", mode=args.mode, device=args.device, max_length=args.max_length,
                   max_batch=args.max_batch)


def _tensorrt_args(p: argparse.ArgumentParser) -> None:
    from vlexport.export import TRT_DEFAULT_SHAPES  # not export.tensorrt: it imports torch

    _model_arg(p, artifact=True)
    p.add_argument("--precision", default="fp32", choices=("fp32", "fp16", "int8-static", "int8"),
                   help="engine precision (int8 = int8-static: calibrated, or the scales of a QDQ graph)")
    p.add_argument("--shapes", default=TRT_DEFAULT_SHAPES,
                   help=f"optimization profile per dynamic axis, AXIS=MIN:OPT:MAX (default {TRT_DEFAULT_SHAPES})")


def cmd_tensorrt(args: argparse.Namespace) -> int:
    return _export(args, "tensorrt", "building TensorRT engines", shapes=args.shapes)


# ---------------------------------------------------------------- dual-encoder
def _dual_encoder_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("vision", type=Path, help="vision encoder directory (save_pretrained: ViT, CLIP vision, ...)")
    p.add_argument("text", type=Path, help="text encoder directory (save_pretrained: BERT, RoBERTa, ...)")
    p.add_argument("-o", "--output", type=Path, required=True, help="where to save the combined model")
    opts.add_ranged(p, "--projection-dim", "size of the shared embedding", 512)
    opts.add_ranged(p, "--seed", "seed for the new projection layers", 0)
    p.add_argument("--force", action="store_true", help="replace an existing output directory")


def cmd_dual_encoder(args: argparse.Namespace) -> int:
    from vlexport.compose import compose_dual_encoder

    check_output_dir(args.output, force=args.force)  # before both encoders load, not after
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


def cmd_validate(args: argparse.Namespace) -> int:
    from vlexport.validate import raise_on_failure, validate_directory

    # before validation runs, so its report is not lost, and never over the artifact it reads
    opts.check_report_paths({"--json": args.json}, inputs=[args.directory])
    with console.status("validating"):
        report = validate_directory(args.directory, device=args.device)
    if args.json:
        atomic_write_text(args.json, json.dumps(asdict(report), indent=2, default=str) + "\n")
    from vlexport.validate.accuracy import below_thresholds_only

    raise_on_failure(report, str(args.directory),
                     "It is below its precision's accuracy thresholds (a variant kept with --accept-degraded stays "
                     "so): build a more accurate one, or use the fp32 artifact." if below_thresholds_only(report) else
                     "Its files are the ones validated at export (their hashes match), so what differs is where it "
                     "runs: compare the `versions` in its manifest.json with this environment's (onnxruntime, torch), "
                     "try the --device it was validated on, or export it again here.")
    errs = ", ".join(f"{k} {e:.2e}" for k, e in report.max_abs_error.items())
    out.print(f"{args.directory}: validation passed vs {report.reference}"
              + (f"; max abs error {errs}" if errs else "") + (f"; {report.summary}" if report.summary else ""))
    return 0


# ---------------------------------------------------------------- bench
def cmd_bench(args: argparse.Namespace) -> int:
    from vlexport.bench import BenchPlan, run_bench
    from vlexport.bench.report import RichProgress, to_rich, write_reports
    from vlexport.bench.suite import load_suite

    opts.check_bench_args(args)  # whatever would lose the results after minutes of benchmarking, checked first
    if args.suite:
        plans = load_suite(args.suite, args.suite_file, device=args.device, threads=args.threads,
                           work_dir=args.work_dir)
    else:
        plans = [BenchPlan(tuple(args.models), backends=args.backends, precisions=args.precision,
                           batch_sizes=args.batch_sizes, seq_len=args.seq_len, warmup=args.warmup, iters=args.iters,
                           task=args.task, random_weights=args.random_weights, seed=args.seed, kernels=args.kernels,
                           allow_new_weights=args.allow_new_weights,
                           device=args.device or "auto", threads=args.threads, compile_mode=args.compile_mode,
                           work_dir=args.work_dir, new_tokens=args.new_tokens)]
    rows, case_errors = [], 0
    with RichProgress(console) as progress:
        for plan in plans:
            try:
                rows += run_bench(plan, progress)
            except VlexportError as e:
                if not args.suite:
                    raise
                case_errors += 1  # a suite goes on with its other cases
                console.print(f"[red]error:[/red] case {', '.join(plan.models)}: {escape(str(e))}")
    title = f"vlexport bench{f' --suite {args.suite}' if args.suite else ''}"
    for renderable in to_rich(rows, title=title):
        out.print(renderable)
    write_reports(rows, title=title, json=args.json, markdown=args.markdown, plot=args.plot, suite=args.suite,
                  argv=sys.argv[1:])
    failed = [r for r in rows if not r.ok]
    if failed or case_errors:
        console.print(f"[red]{len(failed)} row(s) failed parity or errored[/red]"
                      + (f", {case_errors} suite case(s) failed" if case_errors else "")
                      + ": failed variants are reported, never timed.")
        return 1
    return 0


# ---------------------------------------------------------------- regress
def cmd_regress(args: argparse.Namespace) -> int:
    from vlexport.bench import compare, read_rows
    from vlexport.bench.regress import to_rich

    if args.abs_max_slowdown is not None and not args.absolute:
        raise UsageError("--abs-max-slowdown applies with --absolute only.")
    baseline, _ = read_rows(args.baseline)
    current, _ = read_rows(args.current)
    report = compare(baseline, current, max_slowdown=args.max_slowdown, abs_max_slowdown=args.abs_max_slowdown,
                     absolute=args.absolute, allow_missing=args.allow_missing, allow_empty=args.allow_empty,
                     names=(str(args.baseline), str(args.current)))
    table = to_rich(report, show_all=args.all)
    if table.row_count:
        out.print(table)
    if report.failed:
        nothing = any(f.kind == "nothing-compared" for f in report.failures)
        console.print(f"[red]{len(report.failures)} regression(s)[/red] in {report.compared} compared row(s) of "
                      f"{args.current} against {args.baseline}." + (f" {opts.NOTHING_COMPARED}" if nothing else ""))
        return 1
    out.print(f"no regressions: {report.compared} compared row(s) within +{args.max_slowdown:.0%}.")
    return 0


# ---------------------------------------------------------------- run
def _run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("directory", type=Path, help="artifact directory")
    p.add_argument("--image", type=Path, required=True, help="image file (JPEG, PNG, ...)")
    p.add_argument("--text", action="append", default=[],
                   help="prompt / question (generative tasks) or text to score; may be given several times")
    opts.add_ranged(p, "--max-new-tokens", "tokens to generate (default: the artifact's, else 20)")
    opts.add_ranged(p, "--num-beams", "beam search width (default: greedy)")
    p.add_argument("--ids", action="store_true", help="also print the token ids")
    p.add_argument("--raw-prompt", action="store_true", help="BLIP-2: use --text as is, not 'Question: ... Answer:'")
    p.add_argument("--device", default="auto", choices=("cpu", "cuda", "auto"))
    p.add_argument("--verify", action="store_true",
                   help="check every file's sha256 against the manifest first (native code: always checked)")


def cmd_run(args: argparse.Namespace) -> int:
    from vlexport.runtime.run import run_artifact

    result = run_artifact(args.directory, args.image, args.text, max_new_tokens=args.max_new_tokens,
                          num_beams=args.num_beams, device=args.device, raw_prompt=args.raw_prompt,
                          verify=args.verify)
    for line in result.lines:
        prefix = f"{line.text}: " if line.text is not None and (result.kind == "scores" or len(result.lines) > 1) else ""
        if result.kind == "scores":
            out.print(escape(prefix + ", ".join(f"{k} {v:.4f}" for k, v in line.score.items())))
        elif line.output is not None:
            out.print(escape(prefix + line.output))
        if args.ids or line.output is None and result.kind == "generate":
            out.print(f"ids: {line.ids}")
    for note in result.notes:
        console.print(f"[dim]note: {escape(note)}[/dim]")
    return 0


# ---------------------------------------------------------------- main
_EXPORT = (_model_flags, _artifact_flags)
COMMANDS: tuple[Command, ...] = (
    Command("list", "presets, tasks, backends and their precisions", _list_args, cmd_list),
    Command("onnx", "export to ONNX and validate against eager PyTorch", _onnx_args, cmd_onnx,
            (*_EXPORT, _kernel_flags)),
    Command("compile", "AOTInductor package (torch.export + aoti_compile_and_package), validated against eager",
            _compile_args, cmd_compile, (*_EXPORT, _kernel_flags)),
    Command("tensorrt", "TensorRT engine(s) from a model or an ONNX artifact, validated against eager",
            _tensorrt_args, cmd_tensorrt, _EXPORT, aliases=("trt",)),
    Command("quantize", "an fp16 / int8 variant of an fp32 artifact, validated against eager fp32", opts.quantize_args,
            cmd_quantize, (_artifact_flags,)),
    Command("dual-encoder", "combine two local encoders into a VisionTextDualEncoder directory",
            _dual_encoder_args, cmd_dual_encoder),
    Command("validate", "re-run validation of an artifact directory against eager PyTorch", _validate_args,
            cmd_validate),
    Command("run", "caption / answer / score an image with an artifact directory", _run_args, cmd_run),
    Command("triton", "a Triton Inference Server model repository from artifact directories", triton_args, cmd_triton),
    Command("bench", "benchmark backends against eager (interleaved, parity-checked); JSON / Markdown / PNG",
            opts.bench_args, cmd_bench, (_model_flags, _kernel_flags)),
    Command("regress", "compare two bench JSON files; exit 1 on a slowdown, a missing row or a parity failure",
            opts.regress_args, cmd_regress),
)


def build_parser() -> argparse.ArgumentParser:
    parser = opts.Parser(
        prog="vlexport", description="Export, validate and benchmark Hugging Face vision-language models. "
        "Exit codes: 0 ok, 1 failed check, 2 usage error.")
    from vlexport import __version__

    parser.add_argument("--version", action="version", version=f"vlexport {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for c in COMMANDS:
        p = sub.add_parser(c.name, help=c.help, description=c.help, aliases=list(c.aliases),
                           parents=[make() for make in c.parents])
        c.add_args(p)
        p.set_defaults(func=opts.checked(c.run))  # option ranges checked before the command starts
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from vlexport.errors import Interrupted, interrupts_as_exceptions

    parser = build_parser()
    args = parser.parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-tensor "Loading weights" bars drown the CLI's own output
    try:
        with interrupts_as_exceptions():  # SIGTERM / SIGHUP unwind (and clean up) like Ctrl-C, in every command
            return args.func(args)
    except VlexportError as e:
        console.print(f"[red]error:[/red] {escape(str(e))}", soft_wrap=True)  # messages hold [extras]
        return e.exit_code
    except KeyboardInterrupt as e:  # exit 130 / 143 / 129 for SIGINT / SIGTERM / SIGHUP
        stop = e if isinstance(e, Interrupted) else Interrupted(2)  # a bare KeyboardInterrupt is SIGINT's
        done = f"{stop.committed} had been written" if stop.committed else "nothing was written (partial output " \
            "removed)"
        console.print(f"[red]interrupted ({stop.signal_name}):[/red] {escape(done)}.", soft_wrap=True)
        if argv is None:  # the process's own entry point (console script, python -m vlexport.cli)
            # CPython re-raises SIGINT on itself at exit (exit code -2, not ours) when a KeyboardInterrupt crossed a
            # C-level PyRun_* boundary on its way up (torch's export stack has some), even one caught later.
            # os._exit skips that step; what else a normal exit does (atexit hooks, stdio flushes) is done first.
            import atexit

            try:
                atexit._run_exitfuncs()
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(stop.exit_code)
        return stop.exit_code
    except (ValueError, OSError) as e:
        # Library errors we did not anticipate still get one readable paragraph, not a traceback.
        if os.environ.get("VLEXPORT_DEBUG"):
            raise
        console.print(f"[red]error:[/red] {type(e).__name__}: {e}. Re-run with VLEXPORT_DEBUG=1 for a traceback.",
                      soft_wrap=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
