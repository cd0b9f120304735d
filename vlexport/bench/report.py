"""Benchmark rows as a Markdown table and as a rich table; failed rows say why, never how fast."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Self

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from vlexport.artifact import atomic_write_text
from vlexport.bench.peaks import measured
from vlexport.bench.plot import plot_rows
from vlexport.bench.rows import BenchRow, write_rows

COLUMNS = (
    "model",
    "task",
    "backend",
    "precision",
    "batch",
    "seq",
    "p50 ms",
    "p90 ms",
    "p99 ms",
    "throughput",
    "speed-up vs eager",
    "work",
    "achieved",
    "of peak",
    "peak MB",
    "build s",
    "parity",
)
WORK_NOTE = (
    "Work: FLOPs of one call of the eager fp32 forward (torch FlopCounterMode), the same for every backend "
    "of a shape; generation: bytes one decode step reads (weights + KV cache). Of peak: achieved / the "
    "peak of the row's compute dtype (memory bandwidth for decode)."
)


def cells(r: BenchRow) -> list[str]:
    backend = r.backend + (f" +{r.kernels}" if r.kernels else "")
    seq = str(r.seq_len) + (f" +{r.new_tokens} new" if r.new_tokens else "")
    if not r.ok:
        verdict = "FAILED parity" if r.status == "failed-parity" else "ERROR"
        return [
            r.model,
            r.task,
            backend,
            r.precision,
            str(r.batch),
            seq,
            "-",
            "-",
            "-",
            "-",
            verdict,
            "-",
            "-",
            "-",
            "-",
            _num(r.build_s, 1),
            f"{verdict}: {r.detail}",
        ]
    unit = "tok/s" if r.throughput_unit == "tokens/s" else "/s"
    return [
        r.model,
        r.task,
        backend,
        r.precision,
        str(r.batch),
        seq,
        _num(r.latency_p50_ms, 2),
        _num(r.latency_p90_ms, 2),
        _num(r.latency_p99_ms, 2),
        f"{_num(r.throughput, 1)} {unit}",
        f"{r.speedup_vs_eager:.2f}x" if r.speedup_vs_eager is not None else "-",
        work_text(r),
        achieved_text(r),
        fraction_text(r, long=True),
        _num(r.peak_memory_mb, 0),
        _num(r.build_s, 1),
        parity_text(r) + (f"; {r.detail}" if r.detail else ""),
    ]


def work_text(r: BenchRow) -> str:
    """The work of one call: GFLOP (encoders) or GB read per decode step (generation)."""
    if r.work_bytes_per_step:
        return f"{r.work_bytes_per_step / 1e9:.3g} GB/step"
    return f"{r.work_flops / 1e9:.3g} GFLOP" if r.work_flops else "-"


def achieved_text(r: BenchRow, short: bool = False) -> str:
    if r.peak_kind == "memory" or (r.achieved_gbps is not None and r.achieved_gflops is None):
        return "-" if r.achieved_gbps is None else f"{r.achieved_gbps:.3g}" + ("" if short else " GB/s")
    unit = "GOP/s" if r.peak_kind == "int8-gemm" else "GFLOP/s"
    return "-" if r.achieved_gflops is None else f"{r.achieved_gflops:.3g}" + ("" if short else f" {unit}")


def fraction_text(r: BenchRow, long: bool = False) -> str:
    """``73%`` (``73% of fp32-gemm 231`` when long); "-" when the work or the peak is unknown."""
    if r.peak_fraction is None:
        return "-"
    return f"{r.peak_fraction:.0%}" + (f" of {r.peak_kind} {r.peak_value:.4g}" if long else "")


def peaks_text(peaks: Sequence[dict[str, Any]]) -> str:
    """One line per measurement of the machine's peaks (bench/peaks.py), for report headers."""
    lines = []
    for m in peaks:
        found = "; ".join(f"{k} {p['value']:.4g} {p['unit']} ({p['method']})" for k, p in m["peaks"].items())
        missing = f"; not measured: {', '.join(m['notes'])}" if m.get("notes") else ""
        lines.append(
            f"Peaks of this machine, measured in this run ({m['device']}, {m['threads']} thread(s), "
            f"{m['seconds']:.1f} s, best of {m.get('samples', 1)} measurement(s)): {found}{missing}."
        )
    return "\n\n".join(lines)


def parity_text(r: BenchRow) -> str:
    if not r.parity:
        return "ok"
    agree = [p["agreement"] for p in r.parity.values() if p.get("max_abs") is None and "agreement" in p]
    if agree:  # generation: tokens against eager fp32
        return f"ok (tokens agree {min(agree):.0%})"
    worst = max((p.get("max_abs") or 0.0 for p in r.parity.values()), default=0.0)
    cos = [p["cosine"] for p in r.parity.values() if p.get("cosine") is not None]
    return f"ok (max abs {worst:.1e}" + (f", cos {min(cos):.4f}" if cos else "") + ")"


def _sig(x: float | None) -> str:
    """4 significant digits, whole numbers from 1000 up (11296, 974.2, 0.0213): narrow columns, no
    exponents."""
    return "-" if x is None else f"{x:.4g}" if abs(x) < 1e3 else f"{x:.0f}"


def _num(x: float | None, digits: int) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def to_markdown(rows: Sequence[BenchRow], *, title: str = "", peaks: Sequence[dict[str, Any]] = ()) -> str:
    lines = [f"### {title}", ""] if title else []
    if rows:
        r0 = rows[0]
        lines += [
            (
                f"Device: {r0.device} ({r0.device_kind}, {r0.threads} "
                f"thread{'' if r0.threads == 1 else 's'}); "
                f"warm-up {r0.warmup}, "
                f"{r0.iters} timed iterations per variant, interleaved; torch "
                f"{r0.versions.get('torch', '?')}, "
                f"onnxruntime {r0.versions.get('onnxruntime', '?')}."
            ),
            "",
        ]
    if peaks:
        lines += [peaks_text(peaks), "", WORK_NOTE, ""]
    lines.append("| " + " | ".join(COLUMNS) + " |")
    lines.append(
        "|"
        + "|".join(
            "---" if c in ("model", "task", "backend", "precision", "parity") else "--:" for c in COLUMNS
        )
        + "|"
    )
    for r in rows:
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells(r)) + " |")
    gen = [r for r in rows if r.new_tokens and r.ok]
    if gen:
        lines += [
            "",
            "| model | backend | precision | batch | new tokens | prefill ms | decode ms/token | tokens/s |",
            "|---|---|---|--:|--:|--:|--:|--:|",
        ]
        lines += [
            f"| {r.model} | {r.backend} | {r.precision} | {r.batch} | {r.new_tokens} | "
            f"{_num(r.prefill_ms, 2)} "
            f"| {_num(r.decode_ms_per_token, 2)} | {_num(r.throughput, 1)} |"
            for r in gen
        ]
    return "\n".join(lines) + "\n"


def write_reports(
    rows: Sequence[BenchRow],
    *,
    title: str,
    json: Path | None = None,
    markdown: Path | None = None,
    plot: Path | None = None,
    **meta: Any,
) -> None:
    """`vlexport bench --json/--markdown/--plot`: each file written whole or not at all; ``meta`` goes in the
    JSON, with the machine peaks this process measured (bench/peaks.py) unless ``meta`` names its own."""
    meta.setdefault("peaks", measured())
    if json:
        write_rows(json, list(rows), **meta)
    if markdown:
        atomic_write_text(markdown, to_markdown(rows, title=title, peaks=meta["peaks"]))
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
        table = Table(
            title=f"{title}: {model} {task} ({shape}) on {r0.device}, {r0.threads} thread"
            f"{'' if r0.threads == 1 else 's'}, {r0.iters} iters"
        )
        # No vertical rules and collapsed padding: the table fits an 80-column terminal (CI logs).
        table.box, table.pad_edge, table.collapse_padding = box.SIMPLE_HEAD, False, True
        unit = "tok/s" if r0.throughput_unit == "tokens/s" else "per s"
        rate = "GB/s" if r0.new_tokens else "GF/s"
        # p90, build s and the peak kinds are in the Markdown / JSON: 80 columns hold the rest, and a long
        # variant name (onnx+attention,bridge int8-dynamic) folds onto a second line while numbers never do.
        for c in ("variant", "batch", "p50 ms", unit, "vs eager", rate, "%peak", "MB", "parity"):
            table.add_column(
                c,
                justify="left" if c in ("variant", "parity") else "right",
                no_wrap=c != "variant",
                overflow="fold" if c == "variant" else "ellipsis",
                min_width=18 if c == "variant" else None,
            )
        for r in rs:
            name = (
                r.backend
                + (f"+{r.kernels}" if r.kernels else "")
                + ("" if r.precision == "fp32" else f" {r.precision}")
            )
            if not r.ok:
                table.add_row(
                    name,
                    str(r.batch),
                    "-",
                    "-",
                    "-",
                    "-",
                    "-",
                    "-",
                    "FAILED" if r.status == "failed-parity" else "ERROR",
                    style="red",
                )
                continue
            table.add_row(
                name,
                str(r.batch),
                _sig(r.latency_p50_ms),
                _sig(r.throughput),
                f"{r.speedup_vs_eager:.2f}x" if r.speedup_vs_eager is not None else "-",
                achieved_text(r, short=True),
                fraction_text(r),
                _num(r.peak_memory_mb, 0),
                "ok",
            )
        out.append(table)
        out += [f"[red]{escape(r.label())}: {r.status}[/red] {escape(r.detail)}" for r in rs if not r.ok]
    kinds = sorted({r.peak_kind for r in rows if r.peak_value})
    if kinds:  # what "of peak" was measured against
        first = {k: next(r for r in rows if r.peak_kind == k and r.peak_value) for k in kinds}
        out.append(
            "of peak: achieved / this machine's "
            + ", ".join(
                f"{k} {r.peak_value:.4g}"
                + (" GB/s" if k == "memory" else (" GOP/s" if k == "int8-gemm" else " GFLOP/s"))
                for k, r in first.items()
            )
            + " (measured in this run; vlexport/bench/peaks.py)"
        )
    return out


class RichProgress:
    """The harness's progress protocol on a rich progress bar (one bar for the whole run).

    No background refresh thread: it would render (and take the GIL) in the middle of timed eager calls.
    The bar is redrawn from the harness's own calls, between timed calls, at most every REFRESH_S.
    """

    REFRESH_S = 0.25

    def __init__(self, console: Console):
        self.bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=True,
            auto_refresh=False,
        )
        self.task = self.bar.add_task("bench", total=None)
        self.last = 0.0

    def __enter__(self) -> Self:
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
