"""What users hand us, checked before any work: the valid ranges of numbers (CLI options and suite values),
and the shape of the JSON / TOML documents we read back (manifests, bench files, suites, configs).

Readers turn a ``ShapeError`` (a location such as ``rows[3].latency_p50_ms`` and what is wrong there) into a
one-paragraph UsageError / CheckError that names the file and says what to do.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import types
import typing
from collections.abc import Collection
from pathlib import Path
from typing import Any

from vlexport.errors import CheckError, VlexportError

# Valid ranges of user-given integers, one table for CLI options and suite-file values alike.
# The upper bounds are far above any sensible run; they stop overflows deep inside torch / numpy.
RANGES: dict[str, tuple[int, int]] = {
    "seed": (0, 2**32 - 1),  # numpy's seed range (torch takes more): one range for every seeded stage
    "batch_sizes": (1, 4096),
    "seq_len": (1, 65536),
    "new_tokens": (1, 65536),
    "max_new_tokens": (1, 65536),
    "warmup": (0, 100_000),
    "iters": (1, 1_000_000),
    "threads": (1, 1024),
    "num_beams": (1, 256),
    "projection_dim": (1, 65536),
    "max_length": (16, 32768),  # static KV-cache slots of a compiled generative package
    "max_batch": (1, 4096),  # decoder rows (batch x beams) a compiled generative package takes
}


def range_text(name: str) -> str:
    lo, hi = RANGES[name]
    return f"{lo}..2**32-1 ({hi})" if hi == 2**32 - 1 else f"{lo}..{hi}"


class ShapeError(ValueError):
    """A document holds a value of the wrong shape; ``str(e)`` says where and what. Callers name the file."""


def kind_of(value: Any) -> str:
    """What a JSON / TOML value is, for messages: 'a list', 'a string ('x')', 'a number (5)'..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, (int, float)):
        return f"a number ({value!r:.40})"
    if isinstance(value, str):
        return f"a string ({value!r:.40})"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


_PLURAL = {
    int: "integers",
    float: "numbers",
    str: "strings",
    bool: "booleans",
    dict: "objects",
    Path: "paths",
}


def _describe(tp: Any) -> str:
    if tp is Any:
        return "anything"
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    origin = typing.get_origin(tp) or tp
    if origin in (list, tuple):
        item = (typing.get_origin(args[0]) or args[0]) if args else None
        plural = "objects" if dataclasses.is_dataclass(item) else _PLURAL.get(item)
        return "a list" + (f" of {plural}" if plural else "")
    return {
        type(None): "null",
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        dict: "an object",
        Path: "a path",
    }.get(origin, "an object")


def _matches(value: Any, tp: Any) -> bool:
    if tp is Any:
        return True
    args = typing.get_args(tp)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if origin in (list, tuple):  # JSON / TOML arrays both become lists
        item = args[0] if args else Any
        return isinstance(value, (list, tuple)) and all(_matches(v, item) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(_matches(v, args[1] if args else Any) for v in value.values())
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:  # bool is an int in Python, never in a document
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if tp is Path:  # a path string in a document, a Path from the CLI
        return isinstance(value, (str, Path))
    if dataclasses.is_dataclass(tp):  # nested records: the caller builds them, here only their container
        return isinstance(value, dict)
    return isinstance(value, tp)


def _check(value: Any, tp: Any, where: str) -> None:
    """Raise ShapeError at the most specific location (``rows[2].parity['x']``) where ``value`` is not
    ``tp``."""
    if _matches(value, tp):
        return
    args = typing.get_args(tp)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        # One container alternative that holds a wrong element (list[int] | None): point at the element.
        inner = [a for a in args if a is not type(None) and typing.get_origin(a) in (list, tuple, dict)]
        if len(inner) == 1 and isinstance(
            value, dict if typing.get_origin(inner[0]) is dict else (list, tuple)
        ):
            _check(value, inner[0], where)
    elif origin in (list, tuple) and isinstance(value, (list, tuple)) and args:
        for i, v in enumerate(value):
            _check(v, args[0], f"{where}[{i}]")
    elif origin is dict and isinstance(value, dict) and args:
        for k, v in value.items():
            _check(v, args[1], f"{where}[{k!r}]")
    raise ShapeError(f"{where} must be {_describe(tp)}, got {kind_of(value)}")


_hints = functools.cache(typing.get_type_hints)  # once per class: a bench file holds thousands of rows


def checked_fields(cls: type, d: Any, where: str, *, optional: Collection[str] = ()) -> dict[str, Any]:
    """The fields of dataclass ``cls`` present in ``d``, each checked against its annotation.

    Unknown keys are dropped (newer files may carry more fields). Raises ShapeError when ``d`` is not an
    object, a required field (one without a default, unless in ``optional``) is missing, or a value has
    the wrong type.
    """
    if not isinstance(d, dict):
        raise ShapeError(f"{where} must be an object, got {kind_of(d)}")
    hints = _hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        if f.name not in d:
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            if required and f.name not in optional:
                raise ShapeError(f"{where} has no {f.name!r}")
            continue
        _check(d[f.name], hints[f.name], f"{where}.{f.name}")
        out[f.name] = d[f.name]
    return out


def check_range(name: str, value: int, where: str) -> None:
    lo, hi = RANGES[name]
    if not lo <= value <= hi:
        raise ShapeError(f"{where} is {value}, out of range: {range_text(name)}")


def read_json(path: Path, *, advice: str, error: type[VlexportError] = CheckError) -> Any:
    """The parsed JSON of ``path``; any read or parse failure is ``error`` naming the file, then
    ``advice``."""
    path = Path(path)
    if path.is_dir():
        raise error(f"{path} is a directory, not a JSON file. {advice}")
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise error(f"{path} does not exist. {advice}") from None
    except OSError as e:
        raise error(f"Cannot read {path} ({e.strerror or e}). {advice}") from None
    except UnicodeDecodeError:
        raise error(f"{path} is not a text file (not UTF-8), so not JSON. {advice}") from None
    except json.JSONDecodeError as e:
        raise error(f"{path} is not valid JSON ({e}). {advice}") from None
    except RecursionError:  # "[[[[...": deeper than the parser's stack
        raise error(f"{path} is nested too deeply to be a file we wrote. {advice}") from None


def brief(e: BaseException, limit: int = 300) -> str:
    """A library's exception as one short line (some span lines and pages) for a one-paragraph message."""
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


def finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
