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
from typing import NoReturn

from vlexport.errors import UsageError
from vlexport.userdata import RANGES, range_text

# export/aoti.py MODES, without importing torch
COMPILE_MODES = (
    "default",
    "reduce-overhead",
    "max-autotune",
)


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
        raise argparse.ArgumentTypeError(
            f"expected an integer in {range_text(name)}, got {text!r:.40}"
        ) from None


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
            raise argparse.ArgumentTypeError(
                f"expected a comma list of integers in {range_text(name)}, got {text!r:.40}"
            )
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
    """The range of every ranged option a command got (RANGES, FRACTIONS), before it starts: UsageError, exit
    2.

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
    directory the command reads (``inputs``: artifacts, models), whose files it would overwrite; creates
    nothing."""
    given = {option: path for option, path in paths.items() if path is not None}
    for option, path in given.items():
        _check_file(option, path)
        for directory in inputs:
            if directory.is_dir() and directory.resolve() in path.resolve().parents:
                raise UsageError(
                    f"{option} {path} is inside {directory}, which this command reads: a report there "
                    "would overwrite or add to its files. Write the report outside it."
                )
    seen: dict[Path, str] = {}
    for option, path in given.items():
        key = path.resolve()
        if key in seen:
            raise UsageError(
                f"{seen[key]} and {option} both name {path}: one would overwrite the other. Give each "
                "report its own file."
            )
        seen[key] = option


def _check_file(option: str, path: Path) -> None:
    try:
        if path.is_dir():
            example = path / {"--plot": "bench.png", "--markdown": "bench.md"}.get(option, "report.json")
            raise UsageError(f"{option} {path} is a directory; give a file path in it, e.g. {example}.")
        if path.exists() and not path.is_file():
            raise UsageError(f"{option} {path} exists and is not a regular file; choose another path.")
        _check_parent(option, path)
    except OSError as e:  # e.g. a parent we may not even look into
        raise UsageError(
            f"{option} {path} cannot be checked ({e.strerror or e}); choose another path."
        ) from None


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
        raise UsageError(
            f"{option} {path} cannot be checked ({e.strerror or e}); choose another path."
        ) from None


def _check_parent(option: str, path: Path) -> None:
    """The nearest existing ancestor must be a writable directory (the rest is created at write time)."""
    parent = next(p for p in path.absolute().parents if p.exists())
    if not parent.is_dir():
        raise UsageError(
            f"Cannot write {option} {path}: {parent} is a file, not a directory. Choose another path."
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"Cannot write {option} {path}: {parent} is not writable. Choose another path.")
    try:  # access() says yes for root on /proc or a read-only mount; a file made and removed at once tells
        fd, probe = tempfile.mkstemp(prefix=".vlexport-probe.", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UsageError(
            f"Cannot write {option} {path}: files cannot be created in {parent} ({e.strerror or e}). "
            "Choose another path."
        ) from None
