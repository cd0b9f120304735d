"""The regression gate: compare a current benchmark file with a baseline, row by row.

Rows are matched by their identity fields. Speed is judged on the speed-up vs eager measured in the
same run (a ratio, robust to a slower or busier machine); when both files come from the same device,
absolute p50 latency is judged too. Missing rows and parity failures are regressions as well.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from rich import box
from rich.table import Table

from vlexport.bench.rows import BenchRow, is_reference

# Finding kinds that fail the gate; the others are information.
FAILING = ("slower", "slower-absolute", "missing", "parity", "error")


@dataclass
class Finding:
    kind: str  # slower | slower-absolute | missing | parity | error | faster | new | ok
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
    same_device: bool = False
    baseline_device: str = ""
    current_device: str = ""

    @property
    def failures(self) -> list[Finding]:
        return [f for f in self.findings if f.failed]

    @property
    def failed(self) -> bool:
        return bool(self.failures)


def file_device(rows: Sequence[BenchRow]) -> str:
    return " / ".join(sorted({r.device for r in rows}))


def compare(baseline: Sequence[BenchRow], current: Sequence[BenchRow], *, max_slowdown: float = 0.10,
            abs_max_slowdown: float | None = None, same_device: bool | None = None,
            allow_missing: bool = False) -> RegressReport:
    """Judge ``current`` against ``baseline``. ``same_device=None``: decided from the rows' device names."""
    abs_limit = max_slowdown if abs_max_slowdown is None else abs_max_slowdown
    report = RegressReport(baseline_device=file_device(baseline), current_device=file_device(current))
    report.same_device = (report.baseline_device == report.current_device and bool(report.baseline_device)
                          if same_device is None else same_device)
    cur = {r.identity: r for r in current}
    base_ids = {r.identity for r in baseline}
    out = report.findings
    for b in baseline:
        c = cur.get(b.identity)
        if c is None:
            out.append(Finding("ok" if allow_missing else "missing", b.label(),
                               detail="row absent from the current run (backend not run or crashed)"))
            continue
        if not c.ok:
            out.append(Finding("parity" if c.status == "failed-parity" else "error", c.label(), detail=c.detail))
            continue
        out.extend(_speed(b, c, max_slowdown, abs_limit if report.same_device else None))
    for c in current:
        if c.identity not in base_ids:
            failed = not c.ok
            out.append(Finding(("parity" if c.status == "failed-parity" else "error") if failed else "new", c.label(),
                               detail=c.detail if failed else "not in the baseline"))
    return report


def _speed(b: BenchRow, c: BenchRow, max_slowdown: float, abs_limit: float | None) -> list[Finding]:
    found: list[Finding] = []
    if not is_reference(b) and b.speedup_vs_eager and c.speedup_vs_eager:
        change = b.speedup_vs_eager / c.speedup_vs_eager - 1.0
        kind = "slower" if change > max_slowdown else ("faster" if change < -max_slowdown else "ok")
        found.append(Finding(kind, c.label(), b.speedup_vs_eager, c.speedup_vs_eager, round(change, 4),
                             max_slowdown, "speed-up vs eager (same-run ratio)"))
    if abs_limit is not None and b.latency_p50_ms and c.latency_p50_ms:
        change = c.latency_p50_ms / b.latency_p50_ms - 1.0
        kind = "slower-absolute" if change > abs_limit else ("faster" if change < -abs_limit else "ok")
        found.append(Finding(kind, c.label(), b.latency_p50_ms, c.latency_p50_ms, round(change, 4), abs_limit,
                             "absolute p50 ms (same device)"))
    return found


def to_rich(report: RegressReport, *, show_all: bool = False) -> Table:
    failed = len(report.failures)
    title = (f"regress: {failed} regression(s)" if failed else "regress: no regressions") + (
        f" — same device ({report.current_device}): ratios and absolute p50" if report.same_device
        else f" — devices differ ({report.baseline_device} vs {report.current_device}): ratios only")
    table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    for col in ("verdict", "row", "check", "baseline", "current", "change", "limit"):
        table.add_column(col, overflow="fold", justify="left" if col in ("verdict", "row", "check") else "right")
    for f in report.findings:
        if not (show_all or f.failed or f.kind in ("faster", "new")):
            continue
        check = {"speed-up vs eager (same-run ratio)": "speed-up", "absolute p50 ms (same device)": "p50 ms"}.get(
            f.detail, f.detail)
        table.add_row(f.kind.upper() if f.failed else f.kind, f.label, check, _fmt(f.baseline), _fmt(f.current),
                      f"{f.change:+.1%}" if f.change is not None else "-",
                      f"+{f.limit:.0%}" if f.limit is not None else "-",
                      style="red" if f.failed else ("green" if f.kind == "faster" else None))
    return table


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}"
