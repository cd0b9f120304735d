"""The one entry point. Thin: parse, call the library, print. Exit codes: 0 ok, 1 failed check, 2 usage.

One module per verb group, each with its arguments beside its handlers and a ``COMMANDS`` tuple: ``export``
(onnx, compile, tensorrt, quantize, dual-encoder), ``inspect`` (list, validate, run), ``triton``,
``bench`` (bench, tune, regress); ``options`` holds the option types and up-front checks they share,
``common`` the consoles and flag groups.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from rich.markup import escape

from vlexport.cli import bench, export, inspect, triton
from vlexport.cli import options as opts
from vlexport.cli.common import Command, console
from vlexport.errors import VlexportError

_ALL = {c.name: c for group in (inspect, export, triton, bench) for c in group.COMMANDS}
# The order `--help` lists them in.
COMMANDS: tuple[Command, ...] = tuple(
    _ALL[n]
    for n in (
        "list",
        "onnx",
        "compile",
        "tensorrt",
        "quantize",
        "dual-encoder",
        "validate",
        "run",
        "triton",
        "bench",
        "tune",
        "regress",
    )
)


def build_parser() -> argparse.ArgumentParser:
    parser = opts.Parser(
        prog="vlexport",
        description="Export, validate and benchmark Hugging Face vision-language models. "
        "Exit codes: 0 ok, 1 failed check, 2 usage error.",
    )
    from vlexport import __version__

    parser.add_argument("--version", action="version", version=f"vlexport {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for c in COMMANDS:
        p = sub.add_parser(
            c.name,
            help=c.help,
            description=c.help,
            aliases=list(c.aliases),
            parents=[make() for make in c.parents],
        )
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
        with (
            interrupts_as_exceptions()
        ):  # SIGTERM / SIGHUP unwind (and clean up) like Ctrl-C, in every command
            return args.func(args)
    except VlexportError as e:
        console.print(f"[red]error:[/red] {escape(str(e))}", soft_wrap=True)  # messages hold [extras]
        return e.exit_code
    except KeyboardInterrupt as e:  # exit 130 / 143 / 129 for SIGINT / SIGTERM / SIGHUP
        stop = e if isinstance(e, Interrupted) else Interrupted(2)  # a bare KeyboardInterrupt is SIGINT's
        done = (
            f"{stop.committed} had been written"
            if stop.committed
            else "nothing was written (partial output removed)"
        )
        console.print(f"[red]interrupted ({stop.signal_name}):[/red] {escape(done)}.", soft_wrap=True)
        if argv is None:  # the process's own entry point (console script, python -m vlexport.cli)
            # CPython re-raises SIGINT on itself at exit (exit code -2, not ours) when a KeyboardInterrupt
            # crossed a C-level PyRun_* boundary on its way up (torch's export stack has some), even one
            # caught later. os._exit skips that step; what else a normal exit does (atexit hooks, stdio
            # flushes) is done first.
            import atexit

            try:
                atexit._run_exitfuncs()
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(stop.exit_code)
        return stop.exit_code
    except Exception as e:
        # Errors we did not anticipate (ours, or a library's: onnx's checker errors are not ValueErrors,
        # ONNX Runtime's are RuntimeErrors) still get one readable paragraph, not a traceback.
        if os.environ.get("VLEXPORT_DEBUG"):
            raise
        report = "" if isinstance(e, OSError) else " If it persists, report it with that traceback."
        console.print(
            f"[red]error:[/red] {type(e).__name__}: {escape(_said(e))}. Nothing half-written was left. "
            f"Re-run with VLEXPORT_DEBUG=1 for a traceback.{report}",
            soft_wrap=True,
        )
        return 1


def _said(e: BaseException) -> str:
    """What an unanticipated error says, without the C++ backtrace torch appends to its errors (an AOTI
    package failing at run time: forty ``frame #`` lines after one line of message)."""
    lines = []
    for line in str(e).splitlines():
        if line.startswith(("Exception raised from", "frame #", "<omitting python frames>")):
            break
        if line.strip():
            lines.append(line.strip())
    return " ".join(lines)[:1200] or type(e).__name__
