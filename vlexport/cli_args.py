"""Option types and up-front checks for `vlexport`: a bad value fails before any work, with exit 2 and one
paragraph that names the option and its valid range (ranges: vlexport.userdata.RANGES)."""

from __future__ import annotations

import argparse
import functools
import math
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, NoReturn

from vlexport.errors import UsageError
from vlexport.userdata import RANGES, range_text

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")  # export/compile.py MODES, without importing torch
NOTHING_COMPARED = ("Nothing was compared (every baseline row missing, skipped, failed or without a speed-up vs "
                    "eager): check that both files come from one suite, or pass --allow-empty to accept that.")


class Parser(argparse.ArgumentParser):
    """argparse with a one-paragraph error (no usage dump): what is wrong, then where the help is."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {self.prog}: {message.rstrip('.')}. See `{self.prog} --help`.\n")


def csv(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


def _int(text: str, name: str) -> int:
    try:
        return int(text.strip())
    except ValueError:  # also a number with more digits than int() takes
        raise argparse.ArgumentTypeError(f"expected an integer in {range_text(name)}, got {text!r:.40}") from None


def ranged(name: str) -> Callable[[str], int]:
    """argparse type: an integer; its range (``RANGES[name]``) is checked by ``check_options``."""
    def parse(text: str) -> int:
        return _int(text, name)

    parse.__name__ = name  # argparse names the type in some of its own messages
    return parse


def ranged_list(name: str) -> Callable[[str], tuple[int, ...]]:
    """argparse type: a non-empty comma list of integers (each in ``RANGES[name]``, see ``check_options``)."""
    def parse(text: str) -> tuple[int, ...]:
        items = csv(text)
        if not items:
            raise argparse.ArgumentTypeError(f"expected a comma list of integers in {range_text(name)}, got "
                                             f"{text!r:.40}")
        try:
            return tuple(_int(v, name) for v in items)
        except argparse.ArgumentTypeError as e:
            raise argparse.ArgumentTypeError(f"{e} (in a comma list, e.g. 1,8,32)") from None

    parse.__name__ = name
    return parse


def add_ranged(p: argparse.ArgumentParser, flag: str, what: str, default: object = None) -> None:
    """An integer option (a comma list for --batch-sizes) whose help and errors state its range."""
    name = flag.removeprefix("--").replace("-", "_")
    parse = ranged_list(name) if name == "batch_sizes" else ranged(name)
    p.add_argument(flag, type=parse, default=default, help=f"{what}; {range_text(name)}")


FRACTION = "a finite fraction >= 0 (0.10 = 10%)"
FRACTIONS = ("max_slowdown", "abs_max_slowdown")


def fraction(text: str) -> float:
    """argparse type: a number; ``check_options`` refuses nan, inf and negatives."""
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {FRACTION}, got {text!r:.40}") from None


def check_options(args: argparse.Namespace) -> None:
    """The range of every ranged option a command got (RANGES, FRACTIONS), before it starts: UsageError, exit 2.

    Here rather than in the argparse types so that ``main()`` returns 2 like for every other usage error.
    """
    for dest, value in vars(args).items():
        flag = "--" + dest.replace("_", "-")
        if dest in RANGES and value is not None:
            lo, hi = RANGES[dest]
            for v in value if isinstance(value, tuple) else (value,):
                if not lo <= v <= hi:
                    what = "a positive integer" if lo == 1 else "an integer"
                    each = " each" if isinstance(value, tuple) else ""
                    raise UsageError(f"{flag} must be {what} in {range_text(dest)}{each}, got {str(v)[:40]}.")
        elif dest in FRACTIONS and value is not None and not (math.isfinite(value) and value >= 0):
            why = ": nan or inf would let every row pass" if not math.isfinite(value) else ""
            raise UsageError(f"{flag} must be {FRACTION}, got {value}{why}.")


def checked(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """A command that first checks its options' ranges (``check_options``)."""
    @functools.wraps(run)
    def command(args: argparse.Namespace) -> int:
        check_options(args)
        return run(args)

    return command


def check_report_paths(paths: Mapping[str, Path | None], inputs: Iterable[Path] = ()) -> None:
    """Each report file (option -> path) can be written, no two options share one, and none lies inside a
    directory the command reads (``inputs``: artifacts, models), whose files it would overwrite; creates nothing."""
    given = {option: path for option, path in paths.items() if path is not None}
    for option, path in given.items():
        _check_file(option, path)
        for directory in inputs:
            if directory.is_dir() and directory.resolve() in path.resolve().parents:
                raise UsageError(f"{option} {path} is inside {directory}, which this command reads: a report there "
                                 "would overwrite or add to its files. Write the report outside it.")
    seen: dict[Path, str] = {}
    for option, path in given.items():
        key = path.resolve()
        if key in seen:
            raise UsageError(f"{seen[key]} and {option} both name {path}: one would overwrite the other. Give each "
                             "report its own file.")
        seen[key] = option


def check_bench_args(args: argparse.Namespace) -> None:
    """`vlexport bench`: report paths, --work-dir, matplotlib for --plot, MODEL vs --suite; creates nothing."""
    check_report_paths({"--json": args.json, "--markdown": args.markdown, "--plot": args.plot},
                       inputs=[Path(m) for m in args.models])
    check_dir("--work-dir", args.work_dir)
    if args.plot:
        from vlexport.bench.plot import check_available

        check_available()
    if args.suite and args.models:
        raise UsageError(f"Give MODEL arguments or --suite, not both: suite {args.suite!r} names its own models.")
    if args.suite_file and not args.suite:
        raise UsageError("--suite-file names where the suites are; also give --suite NAME to run one of them.")


def _check_file(option: str, path: Path) -> None:
    try:
        if path.is_dir():
            example = path / {"--plot": "bench.png", "--markdown": "bench.md"}.get(option, "report.json")
            raise UsageError(f"{option} {path} is a directory; give a file path in it, e.g. {example}.")
        if path.exists() and not path.is_file():
            raise UsageError(f"{option} {path} exists and is not a regular file; choose another path.")
        _check_parent(option, path)
    except OSError as e:  # e.g. a parent we may not even look into
        raise UsageError(f"{option} {path} cannot be checked ({e.strerror or e}); choose another path.") from None


def check_dir(option: str, path: Path | None) -> None:
    """A directory option (``--work-dir``) names a directory, or a path where one can be created."""
    if path is None:
        return
    try:
        if path.exists() and not path.is_dir():
            raise UsageError(f"{option} {path} exists and is not a directory; choose another path.")
        if path.is_dir():
            if not os.access(path, os.W_OK | os.X_OK):
                raise UsageError(f"{option} {path} is not writable; choose another directory.")
            return
        _check_parent(option, path)
    except OSError as e:
        raise UsageError(f"{option} {path} cannot be checked ({e.strerror or e}); choose another path.") from None


def _check_parent(option: str, path: Path) -> None:
    """The nearest existing ancestor must be a writable directory (the rest is created at write time)."""
    parent = next(p for p in path.absolute().parents if p.exists())
    if not parent.is_dir():
        raise UsageError(f"Cannot write {option} {path}: {parent} is a file, not a directory. Choose another path.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"Cannot write {option} {path}: {parent} is not writable. Choose another path.")
    try:  # access() says yes for root on /proc or a read-only mount; a file made and removed at once tells
        fd, probe = tempfile.mkstemp(prefix=".vlexport-probe.", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UsageError(f"Cannot write {option} {path}: files cannot be created in {parent} ({e.strerror or e}). "
                         "Choose another path.") from None


# ---------------------------------------------------------------- argument definitions of the longer verbs
def bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("models", nargs="*", metavar="MODEL|DIR",
                   help="presets / model directories (variants built per --backends) or artifact directories")
    from vlexport.export.backend import backend_names

    p.add_argument("--backends", type=csv, default=("eager", "onnx"),
                   help=f"comma list of eager, compile (torch, no artifact), {', '.join(backend_names())} "
                        "(eager fp32 always runs)")
    p.add_argument("--precision", type=csv, default=("fp32",), help="comma list of precisions (default fp32)")
    add_ranged(p, "--batch-sizes", "comma list of batch sizes", (1, 8, 32))
    add_ranged(p, "--seq-len", "text tokens per sample (padded masks)", 32)
    add_ranged(p, "--new-tokens", "generation: tokens decoded per sample", 16)
    add_ranged(p, "--warmup", "untimed calls per variant and shape", 3)
    add_ranged(p, "--iters", "timed calls per variant and shape", 20)
    add_ranged(p, "--threads", "intra-op threads for torch and ONNX Runtime (default: torch's)")
    p.add_argument("--device", default=None, choices=("cpu", "cuda", "auto"), help="default: auto")
    p.add_argument("--compile-mode", default="default", choices=COMPILE_MODES, help="torch.compile / AOTI mode")
    p.add_argument("--work-dir", type=Path, help="keep built artifacts here and reuse them (default: temp dir)")
    p.add_argument("--suite", help="run a named suite from benchmarks/suites.toml instead of MODEL args")
    p.add_argument("--suite-file", type=Path, help="suites file (default: benchmarks/suites.toml)")
    p.add_argument("--json", type=Path, help="write rows as JSON (input of `vlexport regress`)")
    p.add_argument("--markdown", type=Path, help="write a Markdown table")
    p.add_argument("--plot", type=Path, help="write a PNG: latency vs batch and speed-up vs eager")


def compile_args(p: argparse.ArgumentParser) -> None:
    """`vlexport compile` options after the model argument (defaults: export/compile.py)."""
    p.add_argument("--precision", default="fp32", choices=("fp32", "fp16", "bf16", "int8-weight"),
                   help="fp16 / bf16: the modules cast (I/O stays fp32); int8-weight: torchao int8 weight-only "
                        "linears (needs torchao)")
    p.add_argument("--mode", default="default", choices=COMPILE_MODES,
                   help="torch.compile mode applied to the AOT compile; reduce-overhead: the runtime captures the "
                        "static-cache decode step in a CUDA graph per batch size (CUDA packages)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="device the package is compiled for")
    add_ranged(p, "--max-length", "generative tasks: static KV-cache slots (prompt + new tokens); default 64")
    add_ranged(p, "--max-batch", "generative tasks: decoder rows (batch x beams) the package takes; default 16")


def regress_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("baseline", type=Path, help="baseline JSON written by `vlexport bench --json`")
    p.add_argument("current", type=Path, help="current JSON written by `vlexport bench --json`")
    p.add_argument("--max-slowdown", type=fraction, default=0.10,
                   help="allowed loss of speed-up vs eager, as a fraction (0.10 = 10%%)")
    p.add_argument("--absolute", action="store_true",
                   help="also judge absolute p50 latency (only meaningful on the same, quiet machine: machines of "
                        "one kind differ 2-4x in speed)")
    p.add_argument("--abs-max-slowdown", type=fraction,
                   help="allowed absolute p50 slowdown with --absolute (default: --max-slowdown)")
    p.add_argument("--allow-missing", action="store_true", help="rows absent from CURRENT are not regressions")
    p.add_argument("--allow-empty", action="store_true",
                   help="pass even when no row could be compared (by default a gate that compared nothing fails)")
    p.add_argument("--all", action="store_true", help="list every comparison, not only regressions")


def quantize_args(p: argparse.ArgumentParser) -> None:
    """`vlexport quantize`: the variant and its knobs (quantize/precision.py)."""
    from vlexport.quantize.precision import CALIBRATION_METHODS

    p.add_argument("model", metavar="DIR", help="an fp32 artifact directory (vlexport onnx)")
    p.add_argument("--precision", required=True,
                   help="the variant: fp16 (range-sensitive ops and I/O stay fp32), int8-dynamic (CPU), int8-weight "
                        "(MatMul weights only, language models), int8-static (calibrated QDQ, TensorRT int8); "
                        "`vlexport list` shows what each backend builds")
    p.add_argument("--calibration", type=Path, metavar="DIR",
                   help="int8-static: a directory of images (and .txt files of prompts/captions, one per line); "
                        "default: a seeded synthetic set (the manifest says which)")
    p.add_argument("--method", choices=CALIBRATION_METHODS, help="int8-static: how activation ranges are "
                   "calibrated (default minmax)")
    p.add_argument("--smooth", type=float, metavar="ALPHA",
                   help="int8-dynamic: SmoothQuant activation outliers into the weights (alpha in (0, 1), e.g. 0.7; "
                        "calibrated on --calibration or a synthetic set) and keep the FFN output MatMuls fp32")
    p.add_argument("--block-size", type=int, metavar="N",
                   help="int8-weight: weights sharing one scale (a power of two >= 16; default 32). 128 makes "
                        "BLIP-2's language model ~10%% smaller and its decode faster, at the cost of accuracy "
                        "(README, Precisions)")
    p.add_argument("--accept-degraded", action="store_true",
                   help="keep a variant below its accuracy thresholds (exit 0, the manifest marks it degraded)")


def check_quantize_source(args: argparse.Namespace, manifest: Any) -> None:
    """What `quantize` can make from this artifact, said before anything loads: fp32 is the source, not a
    variant, and only backends with a precision pass (ONNX) are quantized from their files; without one the
    pipeline would rebuild from weights a compiled package does not carry, and blame missing safetensors."""
    from vlexport.quantize.passes import BUILTIN, precision_pass
    from vlexport.quantize.precision import get_precision

    name = get_precision(args.precision).name
    if name == "fp32":
        raise UsageError(f"--precision fp32 is what `quantize` starts from, not a variant: {args.model} is "
                         f"{manifest.backend} {manifest.precision} already. Name a variant (fp16, int8-dynamic, "
                         "int8-weight, int8-static).")
    from vlexport.export.backend import get_backend

    if precision_pass(manifest.backend, name) is None and get_backend(manifest.backend).parent is None:
        passes = sorted({f"{b} {p}" for b, p in BUILTIN})
        verb = {"aoti": "compile", "tensorrt": "tensorrt"}.get(manifest.backend, manifest.backend)
        raise UsageError(f"`vlexport quantize` has no {name} pass for {manifest.backend} artifacts such as "
                         f"{args.model} (it has: {', '.join(passes)}). Build the variant from the model instead: "
                         f"`vlexport {verb} MODEL --precision {name}`.")


def check_quantize_args(args: argparse.Namespace) -> None:
    """Knobs that do not apply to the precision are an error, not silently ignored (before anything loads)."""
    from vlexport.quantize.precision import Int8WeightConfig, get_precision

    name = get_precision(args.precision).name
    if args.smooth is not None and name != "int8-dynamic":
        raise UsageError(f"--smooth applies to --precision int8-dynamic, not {name}. Drop the option.")
    if args.block_size is not None:
        if name != "int8-weight":
            raise UsageError(f"--block-size applies to --precision int8-weight, not {name}. Drop the option.")
        Int8WeightConfig(block_size=args.block_size)  # a bad size is refused before anything loads
    calibrated = name == "int8-static" or args.smooth is not None
    given = [f for f, v in (("--calibration", args.calibration), ("--method", args.method)) if v is not None]
    if given == ["--calibration"] and calibrated:
        return
    if given and name != "int8-static":
        raise UsageError(f"{' and '.join(given)} appl{'ies' if len(given) == 1 else 'y'} to --precision int8-static "
                         f"(calibrated activations){' or int8-dynamic --smooth' if given == ['--calibration'] else ''}"
                         f", not {name}. Drop the option.")
