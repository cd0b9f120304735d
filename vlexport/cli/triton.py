"""``vlexport triton``: the verb's arguments and handler."""

from __future__ import annotations

import argparse
from pathlib import Path

from vlexport.cli.common import Command
from vlexport.cli.options import csv


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in csv(text))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a comma list of integers, e.g. 4,8; got {text!r:.40}"
        ) from None


def triton_args(p: argparse.ArgumentParser) -> None:
    from vlexport.serve.triton_config import BACKENDS, KINDS

    p.add_argument(
        "directories", nargs="+", type=Path, metavar="DIR", help="artifact directories (validated exports)"
    )
    p.add_argument(
        "-o", "--output", type=Path, required=True, help="model repository (extended if it exists)"
    )
    p.add_argument(
        "--name", help="model name (default: the artifact directory's name, sanitised); one artifact only"
    )
    p.add_argument(
        "--max-batch-size",
        type=int,
        default=8,
        help="Triton max_batch_size (0: no batching; default 8); for a generation model, the most decoder "
        "rows (requests x beams) one batched step runs",
    )
    p.add_argument(
        "--preferred-batch-sizes",
        type=_int_list,
        default=(),
        metavar="N,...",
        help="dynamic_batching preferred_batch_size",
    )
    p.add_argument(
        "--max-queue-delay-us", type=int, default=100, help="dynamic_batching max queue delay (default 100)"
    )
    p.add_argument("--instances", type=int, default=1, help="instance_group count per model (default 1)")
    p.add_argument(
        "--kind", default="gpu", choices=KINDS, help="instance kind of the component models (default gpu)"
    )
    p.add_argument(
        "--backend",
        choices=BACKENDS,
        default=None,
        help="serving backend (default: what runs the artifact's files: onnxruntime, tensorrt, pytorch); "
        "python-onnxruntime runs ONNX files with ONNX Runtime inside python models",
    )
    p.add_argument(
        "--ensemble",
        action="store_true",
        help="encoders: add pre/post-processing python models and an ensemble taking image bytes + strings",
    )
    p.add_argument("--version", type=int, default=1, help="model version folder (default 1)")
    p.add_argument(
        "--force", action="store_true", help="replace the whole repository instead of extending it"
    )


def cmd_triton(args: argparse.Namespace) -> int:
    from rich.console import Console

    from vlexport.serve.triton_config import ServeOptions
    from vlexport.serve.triton_repo import write_repository

    opts = ServeOptions(
        max_batch_size=args.max_batch_size,
        preferred_batch_sizes=args.preferred_batch_sizes,
        max_queue_delay_us=args.max_queue_delay_us,
        instances=args.instances,
        kind=args.kind,
        backend=args.backend or "onnxruntime",
        version=args.version,
        ensemble=args.ensemble,
    )
    names = write_repository(
        list(args.directories), args.output, opts, name=args.name, backend=args.backend, force=args.force
    )
    Console(highlight=False, soft_wrap=True).print(
        f"{args.output}: wrote Triton model(s) {', '.join(names)}; serve with `tritonserver "
        f"--model-repository {args.output}`"
    )
    return 0


COMMANDS: tuple[Command, ...] = (
    Command(
        "triton",
        "a Triton Inference Server model repository from artifact directories",
        triton_args,
        cmd_triton,
    ),
)
