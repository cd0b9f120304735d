"""The regression gate: compare a current benchmark file with a baseline, row by row.

Rows are matched by their identity fields. Speed is judged on the speed-up vs eager measured in the
same run (a ratio, robust to a slower or busier machine). Absolute p50 latency is judged only when the
caller asks for it (``absolute=True``): machines with the same device name differ 2-4x in speed, so a
name match proves nothing. Missing rows, parity failures and a gate that compared no row at all are
regressions as well.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from rich import box
from rich.table import Table

from vlexport.bench.rows import BenchRow, is_reference
from vlexport.errors import CheckError

# Finding kinds that fail the gate; the others are information.
FAILING = ("slower", "slower-absolute", "missing", "parity", "error", "nothing-compared")

RATIO_CHECK = "speed-up vs eager (same-run ratio)"
ABSOLUTE_CHECK = "absolute p50 ms"


@dataclass
class Finding:
    # slower | slower-absolute | missing | parity | error | nothing-compared (fail);
    # faster | new | skipped | unchecked | ok (information)
    kind: str
    label: str
    baseline: float | None = None  # speed-up (ratio checks) or p50 ms (absolute checks)
    current: float | None = None
    change: float | None = None  # fractional slowdown: +0.25 means 25% slower
    limit: float | None = None
    detail: str = ""

    @property
    def failed(self) -> bool:
        return self.kind in FAILING


@dataclass
class RegressReport:
    findings: list[Finding] = field(default_factory=list)
    same_device: bool = False  # reported in the table title only: it never turns absolute checks on
    baseline_device: str = ""
    current_device: str = ""
    absolute: bool = False  # whether absolute p50 latencies were judged
    compared: int = 0  # baseline rows that got at least one speed check (ratio, or absolute when asked)

    @property
    def failures(self) -> list[Finding]:
        return [f for f in self.findings if f.failed]

    @property
    def failed(self) -> bool:
        return bool(self.failures)

    @property
    def skipped(self) -> int:
        """Baseline rows absent from the current run and let pass by ``allow_missing``."""
        return sum(f.kind == "skipped" for f in self.findings)


def file_device(rows: Sequence[BenchRow]) -> str:
    return " / ".join(sorted({r.device for r in rows}))


# The figures the gate judges: a NaN compares False both ways (it would pass), a negative speed-up reads
# faster.
_JUDGED = ("speedup_vs_eager", "latency_p50_ms")


def check_inputs(rows: Sequence[BenchRow], name: str) -> None:
    """A file the gate can trust: judged figures finite and positive, each row identity once (CheckError
    naming the rows otherwise). A duplicate would silently keep its last value: a file listing every row
    twice, slow first, would pass."""
    bad = [
        f"{r.label()} ({k} {getattr(r, k)!r})"
        for r in rows
        for k in _JUDGED
        if getattr(r, k) is not None
        and not (
            isinstance(getattr(r, k), (int, float)) and math.isfinite(getattr(r, k)) and getattr(r, k) > 0
        )
    ]
    seen: dict[tuple, int] = {}
    for r in rows:
        seen[r.identity] = seen.get(r.identity, 0) + 1
    dups = [
        f"{r.label()} (x{seen[r.identity]})"
        for r in {r.identity: r for r in rows}.values()
        if seen[r.identity] > 1
    ]
    problems = (
        [
            f"non-finite or non-positive figures in {len(bad)} row(s): {'; '.join(bad[:6])}"
            + (" ..." if len(bad) > 6 else "")
        ]
        if bad
        else []
    ) + (
        [
            f"{len(dups)} row(s) listed more than once: {'; '.join(dups[:6])}"
            + (" ..." if len(dups) > 6 else "")
        ]
        if dups
        else []
    )
    if problems:
        raise CheckError(
            f"{name} cannot be judged: {' and '.join(problems)}. The gate compares nothing from it; "
            "write the file again with `vlexport bench --json` (one row per identity, measured "
            "figures only)."
        )


def compare(
    baseline: Sequence[BenchRow],
    current: Sequence[BenchRow],
    *,
    max_slowdown: float = 0.10,
    absolute: bool = False,
    abs_max_slowdown: float | None = None,
    same_device: bool | None = None,
    allow_missing: bool = False,
    allow_empty: bool = False,
    names: tuple[str, str] = ("baseline", "current"),
) -> RegressReport:
    """Judge ``current`` against ``baseline``.

    ``absolute``: judge absolute p50 latencies too, with ``abs_max_slowdown`` (default ``max_slowdown``)
    as their limit. ``same_device``: what the report says about the devices; ``None`` decides it from the
    rows' device names. It is information only. ``allow_missing``: baseline rows absent from ``current``
    are skipped, not regressions (and not comparisons). ``allow_empty``: a gate that compared no row
    passes; by default it fails with a ``nothing-compared`` finding.
    """
    check_inputs(baseline, names[0])
    check_inputs(current, names[1])
    abs_limit = max_slowdown if abs_max_slowdown is None else abs_max_slowdown
    report = RegressReport(
        baseline_device=file_device(baseline), current_device=file_device(current), absolute=absolute
    )
    report.same_device = (
        report.baseline_device == report.current_device and bool(report.baseline_device)
        if same_device is None
        else same_device
    )
    cur = {r.identity: r for r in current}
    base_ids = {r.identity for r in baseline}
    out = report.findings
    for b in baseline:
        c = cur.get(b.identity)
        if c is None:
            if allow_missing:  # information, and not a comparison: it must not count towards `compared`
                out.append(
                    Finding("skipped", b.label(), detail="absent from the current run; allowed, not compared")
                )
            else:
                out.append(
                    Finding(
                        "missing",
                        b.label(),
                        detail="row absent from the current run (backend not run or crashed)",
                    )
                )
            continue
        if not c.ok:
            out.append(
                Finding("parity" if c.status == "failed-parity" else "error", c.label(), detail=c.detail)
            )
            continue
        checks = _speed(b, c, max_slowdown, abs_limit if absolute else None)
        if checks:
            report.compared += 1
        elif not is_reference(b):  # a row that should have been judged but had no numbers to judge
            checks = [
                Finding(
                    "unchecked",
                    c.label(),
                    b.speedup_vs_eager,
                    c.speedup_vs_eager,
                    detail="no speed-up vs eager in one of the files: not compared",
                )
            ]
        out.extend(checks)
    for c in current:
        if c.identity not in base_ids:
            failed = not c.ok
            out.append(
                Finding(
                    ("parity" if c.status == "failed-parity" else "error") if failed else "new",
                    c.label(),
                    detail=c.detail if failed else "not in the baseline",
                )
            )
    if not report.compared and not allow_empty:
        # Otherwise a run that lost every row (or a baseline with none) would pass as "no regressions".
        out.append(
            Finding(
                "nothing-compared",
                f"{len(baseline)} baseline row(s)",
                detail="no row compared: all missing, skipped, failed or without speed-up",
            )
        )
    return report


def _speed(b: BenchRow, c: BenchRow, max_slowdown: float, abs_limit: float | None) -> list[Finding]:
    found: list[Finding] = []
    if not is_reference(b) and b.speedup_vs_eager and c.speedup_vs_eager:
        change = b.speedup_vs_eager / c.speedup_vs_eager - 1.0
        kind = "slower" if change > max_slowdown else ("faster" if change < -max_slowdown else "ok")
        found.append(
            Finding(
                kind,
                c.label(),
                b.speedup_vs_eager,
                c.speedup_vs_eager,
                round(change, 4),
                max_slowdown,
                RATIO_CHECK,
            )
        )
    if abs_limit is not None and b.latency_p50_ms and c.latency_p50_ms:
        change = c.latency_p50_ms / b.latency_p50_ms - 1.0
        kind = "slower-absolute" if change > abs_limit else ("faster" if change < -abs_limit else "ok")
        found.append(
            Finding(
                kind,
                c.label(),
                b.latency_p50_ms,
                c.latency_p50_ms,
                round(change, 4),
                abs_limit,
                ABSOLUTE_CHECK,
            )
        )
    return found


def to_rich(report: RegressReport, *, show_all: bool = False) -> Table:
    failed = len(report.failures)
    devices = (
        f"same device ({report.current_device})"
        if report.same_device
        else f"devices differ ({report.baseline_device} vs {report.current_device})"
    )
    title = (f"regress: {failed} regression(s)" if failed else "regress: no regressions") + (
        f" in {report.compared} compared row(s) — {devices}: "
        + ("ratios and absolute p50" if report.absolute else "ratios only")
    )
    table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    for col in ("verdict", "row", "check", "baseline", "current", "change", "limit"):
        table.add_column(
            col, overflow="fold", justify="left" if col in ("verdict", "row", "check") else "right"
        )
    for f in report.findings:
        if not (show_all or f.failed or f.kind in ("faster", "new", "skipped", "unchecked")):
            continue
        check = {RATIO_CHECK: "speed-up", ABSOLUTE_CHECK: "p50 ms"}.get(f.detail, f.detail)
        table.add_row(
            f.kind.upper() if f.failed else f.kind,
            f.label,
            check,
            _fmt(f.baseline),
            _fmt(f.current),
            f"{f.change:+.1%}" if f.change is not None else "-",
            f"+{f.limit:.0%}" if f.limit is not None else "-",
            style="red" if f.failed else ("green" if f.kind == "faster" else None),
        )
    return table


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}"
