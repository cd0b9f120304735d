"""Named benchmark suites (benchmarks/suites.toml): each suite is a list of cases, each case a BenchPlan."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import tomllib

from vlexport.bench.harness import BenchPlan
from vlexport.errors import MissingToolchain, UsageError
from vlexport.userdata import RANGES, ShapeError, check_range, checked_fields, kind_of

SUITES_FILE = Path("benchmarks") / "suites.toml"


def default_suites_file() -> Path:
    """./benchmarks/suites.toml, else the one of the source checkout this package runs from."""
    here = Path.cwd() / SUITES_FILE
    if here.is_file():
        return here
    return Path(__file__).resolve().parents[2] / SUITES_FILE


def read_suites(path: Path) -> dict[str, Any]:
    """The parsed suites file; UsageError naming the file when it cannot be read or parsed."""
    if path.is_dir():
        raise UsageError(f"Suite file {path} is a directory; pass the TOML file itself with --suite-file.")
    if not path.is_file():
        raise UsageError(f"Suite file {path} not found; pass --suite-file (see benchmarks/suites.toml).")
    try:
        return tomllib.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise UsageError(
            f"{path} is not a UTF-8 text file, so not TOML; pass a suites file (see benchmarks/suites.toml)."
        ) from None
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"{path} is not valid TOML: {e}") from None
    except OSError as e:
        raise UsageError(f"Cannot read suite file {path} ({e.strerror or e}).") from None


def load_suite(name: str, path: Path | None = None, **overrides: Any) -> list[BenchPlan]:
    """The cases of suite ``name`` as plans; ``overrides`` (not None) replace the cases' own settings."""
    path = path or default_suites_file()
    suites = read_suites(path)
    if name not in suites:
        raise UsageError(f"No suite {name!r} in {path}; suites: {', '.join(suites)}.")
    cases = suites[name]
    # [[NAME]] is an array of tables; [NAME], NAME = 5 or NAME = ["a"] are not suites.
    if not isinstance(cases, list) or not cases:
        got = (
            "an empty list"
            if cases == []
            else ("a single table" if isinstance(cases, dict) else kind_of(cases))
        )
        raise UsageError(
            f"{path}: suite {name!r} must be a non-empty array of tables, one [[{name}]] header per "
            f"case; got {got}."
        )
    fields = {f.name for f in dataclasses.fields(BenchPlan)}
    plans = []
    for i, case in enumerate(cases):
        where = f"{path}: suite {name!r} case {i + 1}"
        if not isinstance(case, dict):
            raise UsageError(
                f"{where} is {kind_of(case)}, not a table of BenchPlan keys (write each case under "
                f"its own [[{name}]] header)."
            )
        case = {k: v for k, v in case.items() if k != "description"}
        unknown = sorted(set(case) - fields)
        if unknown:
            raise UsageError(f"{where} has unknown key(s) {unknown}; keys: {', '.join(sorted(fields))}.")
        case.update({k: v for k, v in overrides.items() if v is not None})
        try:
            values = checked_fields(BenchPlan, case, "case")
            _check_ranges(values)
        except ShapeError as e:
            what = str(e).removeprefix("case")  # " has no 'models'" or ".iters must be an integer, got ..."
            raise UsageError(
                f"{where}{what if what.startswith(' ') else ': ' + what[1:]}. Fix the suite file "
                "(keys as in vlexport.bench.BenchPlan)."
            ) from None
        try:
            plans.append(BenchPlan(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}))
        except UsageError as e:
            raise UsageError(f"{where}: {e}") from None
    return plans


def dry_run(plans: list[BenchPlan]) -> tuple[list[BenchPlan], list[str]]:
    """The suite at CI size on this CPU: every step and report of a GPU suite, without the GPU.

    Each preset becomes its tiny twin, the device the CPU, batch 1 (torch.compile recompiles per batch size:
    minutes on a CPU for nothing the dry run checks), no warm-up and one timed call, a few new tokens,
    torch.compile's default mode (CUDA graphs need CUDA). A variant whose toolchain this machine lacks
    (TensorRT, CUDA: :class:`MissingToolchain`) is left out and named in the notes; any other problem still
    fails, which is the point: the day a GPU is lent, its one call must not be lost to a suite or script bug.
    """
    from vlexport.bench.variants import check_backends
    from vlexport.presets import PRESETS

    out, notes = [], []
    for plan in plans:
        kept = []
        for name in plan.backends:
            try:
                check_backends([name], plan.configs, device="cpu")
            except MissingToolchain as e:
                notes.append(f"{', '.join(plan.models)} {name}: left out of the dry run ({e})")
            else:
                kept.append(name)
        if not kept:
            continue
        models = tuple((PRESETS[m].tiny or m) if m in PRESETS else m for m in plan.models)
        out.append(
            dataclasses.replace(
                plan,
                models=models,
                backends=tuple(kept),
                device="cpu",
                compile_mode="default",
                warmup=0,
                iters=1,
                batch_sizes=(1,),
                seq_len=min(plan.seq_len, 16),
                new_tokens=min(plan.new_tokens, 4),
            )
        )
    return out, notes


def _check_ranges(values: dict[str, Any]) -> None:
    """The CLI's ranges (userdata.RANGES) for the same settings given in a suite."""
    for key, value in values.items():
        if key in RANGES and value is not None:
            for j, v in enumerate(value) if isinstance(value, list) else [(None, value)]:
                check_range(key, v, f"case.{key}" if j is None else f"case.{key}[{j}]")
