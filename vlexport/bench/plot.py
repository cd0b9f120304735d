"""PNG of a benchmark: latency vs batch per backend, speed-up vs eager, and fraction of the machine's peak
(matplotlib, Agg backend).

One row of three panels per (model, task). Failed variants get no line or bar: they are listed in the
panel's note instead, so nothing that missed parity looks fast.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from vlexport.bench.rows import BenchRow, is_reference
from vlexport.errors import UsageError


def variant_name(r: BenchRow) -> str:
    return (
        r.backend
        + (f"+{r.kernels}" if r.kernels else "")
        + ("" if r.precision == "fp32" else f" {r.precision}")
    )


def check_available() -> None:
    """UsageError when matplotlib is missing: `vlexport bench --plot` asks before the benchmark runs."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display; must precede pyplot
        import matplotlib.pyplot
        from matplotlib.ticker import FuncFormatter  # noqa: F401  (checked here, used in _panels)
    except ImportError:
        raise UsageError("--plot needs matplotlib: pip install 'vlexport[plot]'.") from None


def plot_rows(rows: Sequence[BenchRow], path: str | Path) -> None:
    """Write the PNG whole or not at all (a temp file beside ``path``, renamed into place)."""
    check_available()
    import matplotlib.pyplot as plt

    groups: dict[tuple[str, str], list[BenchRow]] = defaultdict(list)
    for r in rows:
        groups[(r.model, r.task)].append(r)
    fig, axes = plt.subplots(len(groups), 3, figsize=(18, 4.2 * len(groups)), squeeze=False)
    for (model, task), (ax_lat, ax_speed, ax_peak) in zip(groups, axes):
        _panels(groups[(model, task)], model, task, ax_lat, ax_speed)
        _peak_panel(groups[(model, task)], model, task, ax_peak)
    r0 = rows[0] if rows else None
    if r0 is not None:
        fig.suptitle(
            f"vlexport bench — {r0.device} ({r0.device_kind}, {r0.threads} threads), "
            f"{r0.iters} iters interleaved, p50 with p90 whiskers",
            fontsize=10,
        )
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, dpi=110, format="png")  # the format explicitly: the temp name ends in .partial
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it 0600; a report gets the usual permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    finally:
        plt.close(fig)


def _panels(rows: list[BenchRow], model: str, task: str, ax_lat, ax_speed) -> None:
    from matplotlib.ticker import FuncFormatter

    by_variant: dict[str, list[BenchRow]] = defaultdict(list)
    for r in rows:
        by_variant[variant_name(r)].append(r)
    ok = {name: sorted((r for r in rs if r.ok), key=lambda r: r.batch) for name, rs in by_variant.items()}
    failed = sorted({f"{name} ({r.status})" for name, rs in by_variant.items() for r in rs if not r.ok})
    batches = sorted({r.batch for r in rows})
    unit = "generate latency" if any(r.new_tokens for r in rows) else "latency"

    for name, rs in ok.items():
        if not rs:
            continue
        xs = [r.batch for r in rs]
        p50 = [r.latency_p50_ms for r in rs]
        err = [max(0.0, r.latency_p90_ms - r.latency_p50_ms) for r in rs]
        style = {"color": "black", "linewidth": 2.2} if name == "eager" else {}
        ax_lat.errorbar(xs, p50, yerr=[[0] * len(err), err], marker="o", capsize=3, label=name, **style)
    ax_lat.set_xscale("log", base=2)
    ax_lat.set_yscale("log")
    plain = FuncFormatter(lambda v, _: f"{v:g}")  # "20" rather than "2 x 10^1" on the log axis
    ax_lat.yaxis.set_major_formatter(plain)
    ax_lat.yaxis.set_minor_formatter(plain)
    ax_lat.tick_params(axis="y", which="minor", labelsize=7)
    ax_lat.set_xticks(batches, [str(b) for b in batches])
    ax_lat.set_xlabel("batch size")
    ax_lat.set_ylabel(f"{unit} p50 (ms, log)")
    seq = rows[0].seq_len
    ax_lat.set_title(f"{model} {task}: {unit} vs batch (seq {seq})", fontsize=10)
    ax_lat.grid(True, which="both", alpha=0.3)
    ax_lat.legend(fontsize=8)

    others = [name for name, rs in ok.items() if rs and not all(is_reference(r) for r in rs)]
    width = 0.8 / max(1, len(others))
    for i, name in enumerate(others):
        pts = [
            (batches.index(r.batch), r.speedup_vs_eager) for r in ok[name] if r.speedup_vs_eager is not None
        ]
        if not pts:
            continue
        xs = [x + (i - (len(others) - 1) / 2) * width for x, _ in pts]
        bars = ax_speed.bar(xs, [s for _, s in pts], width=width, label=name)
        ax_speed.bar_label(bars, labels=[f"{s:.2f}x" for _, s in pts], fontsize=7, padding=2)
    ax_speed.axhline(1.0, color="black", linewidth=1, linestyle="--", label="eager fp32 = 1.0")
    ax_speed.set_xticks(range(len(batches)), [str(b) for b in batches])
    ax_speed.set_xlabel("batch size")
    ax_speed.set_ylabel("speed-up vs eager fp32 (p50 ratio, same run)")
    ax_speed.set_title(f"{model} {task}: speed-up vs eager (higher is better)", fontsize=10)
    ax_speed.grid(True, axis="y", alpha=0.3)
    ax_speed.legend(fontsize=8)
    ax_speed.set_ylim(bottom=0)
    if failed:
        ax_speed.text(
            0.01,
            0.98,
            "not plotted, failed: " + ", ".join(failed),
            transform=ax_speed.transAxes,
            va="top",
            fontsize=8,
            color="red",
            wrap=True,
        )


def _peak_panel(rows: list[BenchRow], model: str, task: str, ax) -> None:
    """Achieved / peak per variant and batch; the bar label gives the achieved rate and the peak's kind."""
    batches = sorted({r.batch for r in rows})
    by_variant: dict[str, list[BenchRow]] = defaultdict(list)
    for r in rows:
        if r.ok and r.peak_fraction is not None:
            by_variant[variant_name(r)].append(r)
    width = 0.8 / max(1, len(by_variant))
    others = iter(range(len(by_variant)))
    for i, (name, rs) in enumerate(by_variant.items()):
        xs = [batches.index(r.batch) + (i - (len(by_variant) - 1) / 2) * width for r in rs]
        color = "black" if all(is_reference(r) for r in rs) else f"C{next(others)}"  # as in the other panels
        bars = ax.bar(xs, [100 * r.peak_fraction for r in rs], width=width, label=name, color=color)
        rate = [
            f"{r.achieved_gbps:.3g} GB/s" if r.peak_kind == "memory" else f"{r.achieved_gflops:.3g}"
            for r in rs
        ]
        ax.bar_label(
            bars,
            labels=[f"{100 * r.peak_fraction:.0f}%\n{t}" for r, t in zip(rs, rate)],
            fontsize=6,
            padding=2,
        )
    kinds = sorted({f"{r.peak_kind} {r.peak_value:.4g}" for rs in by_variant.values() for r in rs})
    ax.axhline(100, color="black", linewidth=1, linestyle="--")
    ax.set_xticks(range(len(batches)), [str(b) for b in batches])
    ax.set_xlabel("batch size")
    ax.set_ylabel("% of this machine's peak (same run)")
    gen = any(r.new_tokens for r in rows)
    ax.set_title(
        f"{model} {task}: "
        + ("decode GB/s" if gen else "achieved GFLOP/s")
        + " as % of peak\n("
        + "; ".join(kinds)
        + ")",
        fontsize=9,
    )
    ax.grid(True, axis="y", alpha=0.3)
    ax.set_ylim(bottom=0)
    if by_variant:
        ax.legend(fontsize=8)
    else:
        ax.text(
            0.5, 0.5, "no work counted / no peak measured", transform=ax.transAxes, ha="center", fontsize=9
        )
