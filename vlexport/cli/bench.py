"""The benchmark verbs: `bench` and `regress`, with their arguments and up-front checks."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.markup import escape

from vlexport.cli import options as opts
from vlexport.cli.common import Command, console, kernel_flags, model_flags, out
from vlexport.contracts.precision import precision_names
from vlexport.errors import UsageError, VlexportError

NOTHING_COMPARED = (
    "Nothing was compared (every baseline row missing, skipped, failed or without a speed-up vs "
    "eager): check that both files come from one suite, or pass --allow-empty to accept that."
)


def bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "models",
        nargs="*",
        metavar="MODEL|DIR",
        help="presets / model directories (variants built per --backends) or artifact directories",
    )
    from vlexport.contracts.backends import backend_names

    p.add_argument(
        "--backends",
        type=opts.csv,
        default=("eager", "onnx"),
        help=f"comma list of eager, compile (torch, no artifact), {', '.join(backend_names())} "
        "(eager fp32 always runs)",
    )
    p.add_argument(
        "--precision",
        type=opts.csv,
        default=("fp32",),
        help=f"comma list of precisions: {', '.join(precision_names())} (default fp32)",
    )
    opts.add_ranged(p, "--batch-sizes", "comma list of batch sizes", (1, 8, 32))
    opts.add_ranged(p, "--seq-len", "text tokens per sample (padded masks)", 32)
    opts.add_ranged(p, "--new-tokens", "generation: tokens decoded per sample", 16)
    opts.add_ranged(p, "--warmup", "untimed calls per variant and shape", 3)
    opts.add_ranged(p, "--iters", "timed calls per variant and shape", 20)
    opts.add_ranged(p, "--threads", "intra-op threads for torch and ONNX Runtime (default: torch's)")
    p.add_argument("--device", default=None, choices=("cpu", "cuda", "auto"), help="default: auto")
    p.add_argument(
        "--compile-mode", default="default", choices=opts.COMPILE_MODES, help="torch.compile / AOTI mode"
    )
    p.add_argument(
        "--work-dir", type=Path, help="keep built artifacts here and reuse them (default: temp dir)"
    )
    p.add_argument("--suite", help="run a named suite from benchmarks/suites.toml instead of MODEL args")
    p.add_argument("--suite-file", type=Path, help="suites file (default: benchmarks/suites.toml)")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="with --suite: every case on the CPU with tiny twins and one iteration (checks a GPU suite "
        "and its reports without the GPU; variants whose toolchain is absent are left out)",
    )
    p.add_argument("--json", type=Path, help="write rows as JSON (input of `vlexport regress`)")
    p.add_argument("--markdown", type=Path, help="write a Markdown table")
    p.add_argument("--plot", type=Path, help="write a PNG: latency vs batch and speed-up vs eager")


def check_bench_args(args: argparse.Namespace) -> None:
    """`vlexport bench`: report paths, --work-dir, matplotlib for --plot, MODEL vs --suite; creates
    nothing."""
    opts.check_report_paths(
        {"--json": args.json, "--markdown": args.markdown, "--plot": args.plot},
        inputs=[Path(m) for m in args.models],
    )
    opts.check_dir("--work-dir", args.work_dir)
    if args.plot:
        from vlexport.bench.plot import check_available

        check_available()
    if args.suite and args.models:
        raise UsageError(
            f"Give MODEL arguments or --suite, not both: suite {args.suite!r} names its own models."
        )
    if args.dry_run and not args.suite:
        raise UsageError("--dry-run runs a suite at CI size on the CPU; give --suite NAME with it.")
    if args.suite_file and not args.suite:
        raise UsageError(
            "--suite-file names where the suites are; also give --suite NAME to run one of them."
        )


def cmd_bench(args: argparse.Namespace) -> int:
    from vlexport.bench import BenchPlan, run_bench
    from vlexport.bench.report import RichProgress, to_rich, write_reports
    from vlexport.bench.rows import busy_notes
    from vlexport.bench.suite import dry_run, load_suite

    check_bench_args(args)  # whatever would lose the results after minutes of benchmarking, checked first
    if args.suite:
        plans = load_suite(
            args.suite, args.suite_file, device=args.device, threads=args.threads, work_dir=args.work_dir
        )
        if args.dry_run:
            plans, notes = dry_run(plans)
            for note in notes:
                console.print(f"[yellow]note:[/yellow] {escape(note)}")
    else:
        plans = [
            BenchPlan(
                tuple(args.models),
                backends=args.backends,
                precisions=args.precision,
                batch_sizes=args.batch_sizes,
                seq_len=args.seq_len,
                warmup=args.warmup,
                iters=args.iters,
                task=args.task,
                random_weights=args.random_weights,
                seed=args.seed,
                kernels=args.kernels,
                allow_new_weights=args.allow_new_weights,
                device=args.device or "auto",
                threads=args.threads,
                compile_mode=args.compile_mode,
                work_dir=args.work_dir,
                new_tokens=args.new_tokens,
            )
        ]
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
    for note in busy_notes(rows):
        console.print(f"[yellow]note:[/yellow] {escape(note)}")
    suite = f" --suite {args.suite}" if args.suite else ""
    title = f"vlexport bench{suite}{' --dry-run' if args.dry_run else ''}"
    for renderable in to_rich(rows, title=title):
        out.print(renderable)
    write_reports(
        rows,
        title=title,
        json=args.json,
        markdown=args.markdown,
        plot=args.plot,
        suite=args.suite,
        argv=sys.argv[1:],
    )
    failed = [r for r in rows if not r.ok]
    if failed or case_errors:
        console.print(
            f"[red]{len(failed)} row(s) failed parity or errored[/red]"
            + (f", {case_errors} suite case(s) failed" if case_errors else "")
            + ": failed variants are reported, never timed."
        )
        return 1
    return 0


def regress_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("baseline", type=Path, help="baseline JSON written by `vlexport bench --json`")
    p.add_argument("current", type=Path, help="current JSON written by `vlexport bench --json`")
    p.add_argument(
        "--max-slowdown",
        type=opts.fraction,
        default=0.10,
        help="allowed loss of speed-up vs eager, as a fraction (0.10 = 10%%)",
    )
    p.add_argument(
        "--absolute",
        action="store_true",
        help="also judge absolute p50 latency (only meaningful on the same, quiet machine: machines of "
        "one kind differ 2-4x in speed)",
    )
    p.add_argument(
        "--abs-max-slowdown",
        type=opts.fraction,
        help="allowed absolute p50 slowdown with --absolute (default: --max-slowdown)",
    )
    p.add_argument(
        "--allow-missing", action="store_true", help="rows absent from CURRENT are not regressions"
    )
    p.add_argument(
        "--allow-empty",
        action="store_true",
        help="pass even when no row could be compared (by default a gate that compared nothing fails)",
    )
    p.add_argument("--all", action="store_true", help="list every comparison, not only regressions")


def cmd_regress(args: argparse.Namespace) -> int:
    from vlexport.bench import compare, read_rows
    from vlexport.bench.regress import to_rich

    if args.abs_max_slowdown is not None and not args.absolute:
        raise UsageError("--abs-max-slowdown applies with --absolute only.")
    baseline, _ = read_rows(args.baseline)
    current, _ = read_rows(args.current)
    report = compare(
        baseline,
        current,
        max_slowdown=args.max_slowdown,
        abs_max_slowdown=args.abs_max_slowdown,
        absolute=args.absolute,
        allow_missing=args.allow_missing,
        allow_empty=args.allow_empty,
        names=(str(args.baseline), str(args.current)),
    )
    table = to_rich(report, show_all=args.all)
    if table.row_count:
        out.print(table)
    if report.failed:
        nothing = any(f.kind == "nothing-compared" for f in report.failures)
        console.print(
            f"[red]{len(report.failures)} regression(s)[/red] in {report.compared} compared row(s) of "
            f"{args.current} against {args.baseline}." + (f" {NOTHING_COMPARED}" if nothing else "")
        )
        return 1
    out.print(f"no regressions: {report.compared} compared row(s) within +{args.max_slowdown:.0%}.")
    return 0


def tune_args(p: argparse.ArgumentParser) -> None:
    from vlexport.bench.tune import DEVICES, KERNEL_MODES, OBJECTIVES

    p.add_argument("model", metavar="MODEL|DIR", help="preset, save_pretrained directory, or its fp32 export")
    p.add_argument("-o", "--output", type=Path, required=True, help="where the chosen variant is written")
    opts.add_ranged(p, "--batch-sizes", "batch sizes to serve: judged and benched", (1, 8))
    p.add_argument(
        "--seq-lens",
        type=opts.csv,
        default=("32",),
        metavar="N,...",
        help="text lengths to serve: judged (benched at the longest); generative tasks: prompt text tokens",
    )
    p.add_argument(
        "--objective", choices=OBJECTIVES, default="latency", help="how to pick among those that pass"
    )
    p.add_argument(
        "--min-cosine", type=float, metavar="X", help="accuracy target stricter than each precision's"
    )
    p.add_argument("--min-agreement", type=float, metavar="Y", help="task agreement target, as --min-cosine")
    p.add_argument(
        "--backends", type=opts.csv, default=(), help="comma list (default: every registered backend)"
    )
    p.add_argument(
        "--precisions",
        type=opts.csv,
        default=(),
        help="comma list (default: every precision each backend builds)",
    )
    opts.add_ranged(p, "--warmup", "untimed calls per candidate and batch size", 3)
    opts.add_ranged(p, "--iters", "timed calls per candidate and batch size", 20)
    opts.add_ranged(p, "--new-tokens", "generative tasks: tokens per sample, judged and benched", 16)
    p.add_argument(
        "--kernels",
        choices=KERNEL_MODES,
        default="auto",
        help="fused-kernel injection: auto (candidates with and without, where the family has injection "
        "rules), on, off",
    )
    p.add_argument(
        "--device",
        choices=DEVICES,
        default="cpu",
        help="build, judge and bench for this device (cuda without a GPU: refused, exit 2)",
    )
    p.add_argument(
        "--max-minutes",
        type=float,
        metavar="M",
        help="time budget: no candidate starts building after M minutes (the first always does); the choice "
        "is made among those measured, the report lists the others as not built",
    )
    p.add_argument(
        "--work-dir",
        type=Path,
        help="keep candidates here; a re-run (e.g. after an interruption) reuses those built (default: temp)",
    )
    p.add_argument("--force", action="store_true", help="replace an existing output directory")


def cmd_tune(args: argparse.Namespace) -> int:
    from vlexport.bench.tune import TunePlan, run_tune

    try:
        seq_lens = tuple(int(s) for s in args.seq_lens)
    except ValueError:
        raise UsageError(
            f"--seq-lens takes a comma list of integers, got {','.join(args.seq_lens)}."
        ) from None
    if not seq_lens or min(seq_lens) < 1:
        raise UsageError("--seq-lens takes positive integers.")
    plan = TunePlan(
        args.model,
        args.output,
        task=args.task,
        batch_sizes=tuple(args.batch_sizes),
        seq_lens=seq_lens,
        objective=args.objective,
        min_cosine=args.min_cosine,
        min_agreement=args.min_agreement,
        backends=tuple(args.backends),
        precisions=tuple(args.precisions),
        random_weights=args.random_weights,
        seed=args.seed,
        work_dir=args.work_dir,
        warmup=args.warmup,
        iters=args.iters,
        force=args.force,
        kernels=args.kernels,
        device=args.device,
        max_minutes=args.max_minutes,
        new_tokens=args.new_tokens,
    )
    with console.status("tuning") as status:
        report = run_tune(plan, progress=lambda msg: status.update(escape(msg)))
    for c in report["candidates"]:
        p50 = ", ".join(f"b{b} {ms:.2f} ms" for b, ms in c["p50_ms"].items())
        verdict = "passed" if c["passed"] else escape(c["reason"])
        out.print(f"{escape(c['name'])}: {verdict}" + (f"; p50 {p50}" if p50 else ""), highlight=False)
    chosen = report["chosen"]
    out.print(
        f"chosen: {escape(chosen['name'])} -> {args.output} (report: {args.output / 'tune' / 'report.md'})",
        highlight=False,
    )
    return 0


COMMANDS: tuple[Command, ...] = (
    Command(
        "bench",
        "benchmark backends against eager (interleaved, parity-checked); JSON / Markdown / PNG",
        bench_args,
        cmd_bench,
        (model_flags, kernel_flags),
    ),
    Command(
        "tune",
        "build every backend x precision that runs here, keep those that meet the accuracy targets at the "
        "shapes to serve, bench them, write the fastest",
        tune_args,
        cmd_tune,
        (model_flags,),
    ),
    Command(
        "regress",
        "compare two bench JSON files; exit 1 on a slowdown, a missing row or a parity failure",
        regress_args,
        cmd_regress,
    ),
)
