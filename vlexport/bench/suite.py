"""Named benchmark suites (benchmarks/suites.toml): each suite is a list of cases, each case a BenchPlan."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path
from typing import Any

from vlexport.bench.harness import BenchPlan
from vlexport.errors import UsageError

SUITES_FILE = Path("benchmarks") / "suites.toml"


def default_suites_file() -> Path:
    """./benchmarks/suites.toml, else the one of the source checkout this package runs from."""
    here = Path.cwd() / SUITES_FILE
    if here.is_file():
        return here
    return Path(__file__).resolve().parents[2] / SUITES_FILE


def load_suite(name: str, path: Path | None = None, **overrides: Any) -> list[BenchPlan]:
    """The cases of suite ``name`` as plans; ``overrides`` (not None) replace the cases' own settings."""
    path = path or default_suites_file()
    if not path.is_file():
        raise UsageError(f"Suite file {path} not found; pass --suite-file (see benchmarks/suites.toml).")
    try:
        suites = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"{path} is not valid TOML: {e}") from None
    if name not in suites:
        raise UsageError(f"No suite {name!r} in {path}; suites: {', '.join(suites)}.")
    fields = {f.name for f in dataclasses.fields(BenchPlan)}
    plans = []
    for i, case in enumerate(suites[name]):
        case = {k: v for k, v in case.items() if k != "description"}
        unknown = sorted(set(case) - fields)
        if unknown:
            raise UsageError(f"{path}: suite {name!r} case {i + 1} has unknown key(s) {unknown}; keys: "
                             f"{', '.join(sorted(fields))}.")
        case.update({k: v for k, v in overrides.items() if v is not None})
        plans.append(BenchPlan(**{k: tuple(v) if isinstance(v, list) else v for k, v in case.items()}))
    return plans
