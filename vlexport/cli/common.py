"""What every verb module shares: the consoles, the ``Command`` record, and the flag groups (argparse
parents)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from vlexport.cli import options as opts

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


def model_flags() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--task", help="task / head to export (default: the preset's first task)")
    p.add_argument(
        "--random-weights", action="store_true", help="seeded random weights (no checkpoint needed)"
    )
    opts.add_ranged(p, "--seed", "seed for --random-weights and example inputs", 0)
    p.add_argument(
        "--allow-new-weights",
        type=opts.csv,
        default=(),
        metavar="GLOB,...",
        help="checkpoint tensors that may be missing and get fresh seeded values (e.g. a new head); "
        "recorded in the manifest. Without it a checkpoint that lacks tensors is refused",
    )
    return p


def artifact_flags() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument(
        "-o", "--output", type=Path, help="artifact directory (default: ./<model>-<task>-<backend>)"
    )
    p.add_argument("--no-validate", action="store_true", help="skip validation (the manifest says so)")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    return p


def kernel_flags() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--kernels", type=opts.csv, default=(), help="inject fused kernels: attention,bridge")
    return p


def model_arg(p: argparse.ArgumentParser, *, artifact: bool = False) -> None:
    what = "preset name (`vlexport list`) or a local directory written by save_pretrained"
    p.add_argument("model", help=what + (", or an ONNX artifact directory" if artifact else ""))
