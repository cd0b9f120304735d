"""Benchmark rows as a Markdown table and as a rich table; failed rows say why, never how fast."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from vlexport.artifact import atomic_write_text
from vlexport.bench.plot import plot_rows
from vlexport.bench.rows import BenchRow, write_rows

COLUMNS = ("model", "task", "backend", "precision", "batch", "seq", "p50 ms", "p90 ms", "p99 ms", "throughput",
           "speed-up vs eager", "peak MB", "build s", "parity")


def cells(r: BenchRow) -> list[str]:
    backend = r.backend + (f" +{r.kernels}" if r.kernels else "")
    seq = str(r.seq_len) + (f" +{r.new_tokens} new" if r.new_tokens else "")
    if not r.ok:
        verdict = "FAILED parity" if r.status == "failed-parity" else "ERROR"
        return [r.model, r.task, backend, r.precision, str(r.batch), seq, "-", "-", "-", "-", verdict,
                "-", _num(r.build_s, 1), f"{verdict}: {r.detail}"]
    unit = "tok/s" if r.throughput_unit == "tokens/s" else "/s"
    return [r.model, r.task, backend, r.precision, str(r.batch), seq, _num(r.latency_p50_ms, 2),
            _num(r.latency_p90_ms, 2), _num(r.latency_p99_ms, 2), f"{_num(r.throughput, 1)} {unit}",
            f"{r.speedup_vs_eager:.2f}x" if r.speedup_vs_eager is not None else "-", _num(r.peak_memory_mb, 0),
            _num(r.build_s, 1), parity_text(r) + (f"; {r.detail}" if r.detail else "")]


def parity_text(r: BenchRow) -> str:
    if not r.parity:
        return "ok"
    agree = [p["agreement"] for p in r.parity.values() if p.get("max_abs") is None and "agreement" in p]
    if agree:  # generation: tokens against eager fp32
        return f"ok (tokens agree {min(agree):.0%})"
    worst = max((p.get("max_abs") or 0.0 for p in r.parity.values()), default=0.0)
    cos = [p["cosine"] for p in r.parity.values() if p.get("cosine") is not None]
    return f"ok (max abs {worst:.1e}" + (f", cos {min(cos):.4f}" if cos else "") + ")"


def _num(x: float | None, digits: int) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def to_markdown(rows: Sequence[BenchRow], *, title: str = "") -> str:
    lines = [f"### {title}", ""] if title else []
    if rows:
        r0 = rows[0]
        lines += [f"Device: {r0.device} ({r0.device_kind}, {r0.threads} thread{'' if r0.threads == 1 else 's'}); "
                  f"warm-up {r0.warmup}, "
                  f"{r0.iters} timed iterations per variant, interleaved; torch {r0.versions.get('torch', '?')}, "
                  f"onnxruntime {r0.versions.get('onnxruntime', '?')}.", ""]
    lines.append("| " + " | ".join(COLUMNS) + " |")
    lines.append("|" + "|".join("---" if c in ("model", "task", "backend", "precision", "parity") else "--:"
                                for c in COLUMNS) + "|")
    for r in rows:
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells(r)) + " |")
    gen = [r for r in rows if r.new_tokens and r.ok]
    if gen:
        lines += ["", "| model | backend | precision | batch | new tokens | prefill ms | decode ms/token | tokens/s |",
                  "|---|---|---|--:|--:|--:|--:|--:|"]
        lines += [f"| {r.model} | {r.backend} | {r.precision} | {r.batch} | {r.new_tokens} | {_num(r.prefill_ms, 2)} "
                  f"| {_num(r.decode_ms_per_token, 2)} | {_num(r.throughput, 1)} |" for r in gen]
    return "\n".join(lines) + "\n"


def write_reports(rows: Sequence[BenchRow], *, title: str, json: Path | None = None, markdown: Path | None = None,
                  plot: Path | None = None, **meta: Any) -> None:
    """`vlexport bench --json/--markdown/--plot`: each file written whole or not at all; ``meta`` goes in the JSON."""
    if json:
        write_rows(json, list(rows), **meta)
    if markdown:
        atomic_write_text(markdown, to_markdown(rows, title=title))
    if plot and rows:
        plot_rows(rows, plot)


def to_rich(rows: Sequence[BenchRow], *, title: str = "vlexport bench") -> list[Any]:
    """One compact table per (model, task) (fits 80 columns), then a line per failed row saying why."""
    groups: dict[tuple[str, str], list[BenchRow]] = {}
    for r in rows:
        groups.setdefault((r.model, r.task), []).append(r)
    out: list[Any] = []
    for (model, task), rs in groups.items():
        r0 = rs[0]
        shape = f"seq {r0.seq_len}" + (f", {r0.new_tokens} new tokens" if r0.new_tokens else "")
        table = Table(title=f"{title}: {model} {task} ({shape}) on {r0.device}, {r0.threads} thread"
                            f"{'' if r0.threads == 1 else 's'}, {r0.iters} iters")
        # No vertical rules and collapsed padding: the table fits an 80-column terminal (CI logs).
        table.box, table.pad_edge, table.collapse_padding = box.SIMPLE_HEAD, False, True
        unit = "tok/s" if r0.throughput_unit == "tokens/s" else "per s"
        for c in ("variant", "batch", "p50 ms", "p90 ms", unit, "vs eager", "peak MB", "build s", "parity"):
            table.add_column(c, justify="left" if c in ("variant", "parity") else "right", no_wrap=True)
        for r in rs:
            name = r.backend + (f"+{r.kernels}" if r.kernels else "") + ("" if r.precision == "fp32" else
                                                                         f" {r.precision}")
            if not r.ok:
                table.add_row(name, str(r.batch), "-", "-", "-", "-", "-", _num(r.build_s, 1),
                              "FAILED" if r.status == "failed-parity" else "ERROR", style="red")
                continue
            table.add_row(name, str(r.batch), _num(r.latency_p50_ms, 2), _num(r.latency_p90_ms, 2),
                          _num(r.throughput, 1),
                          f"{r.speedup_vs_eager:.2f}x" if r.speedup_vs_eager is not None else "-",
                          _num(r.peak_memory_mb, 0), _num(r.build_s, 1), "ok")
        out.append(table)
        out += [f"[red]{escape(r.label())}: {r.status}[/red] {escape(r.detail)}" for r in rs if not r.ok]
    return out


class RichProgress:
    """The harness's progress protocol on a rich progress bar (one bar for the whole run).

    No background refresh thread: it would render (and take the GIL) in the middle of timed eager calls.
    The bar is redrawn from the harness's own calls, between timed calls, at most every REFRESH_S.
    """

    REFRESH_S = 0.25

    def __init__(self, console: Console):
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), console=console, transient=True, auto_refresh=False)
        self.task = self.bar.add_task("bench", total=None)
        self.last = 0.0

    def __enter__(self) -> RichProgress:
        self.bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.stop()

    def _refresh(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self.last >= self.REFRESH_S:
            self.last = now
            self.bar.refresh()

    def start(self, total: int) -> None:
        total += self.bar.tasks[0].total or 0  # suites call start once per case
        self.bar.update(self.task, total=total)
        self._refresh(force=True)

    def advance(self, n: int = 1) -> None:
        self.bar.advance(self.task, n)
        self._refresh()

    def message(self, text: str) -> None:
        self.bar.update(self.task, description=text)
        self._refresh(force=True)
