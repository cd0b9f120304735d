"""Benchmarks: harness (interleaved timing with parity against eager), reports, plots and the regress gate."""

from vlexport.bench.backends import BACKENDS, BenchContext, Variant, register_backend
from vlexport.bench.harness import BenchPlan, run_bench
from vlexport.bench.regress import RegressReport, compare
from vlexport.bench.rows import BenchRow, read_rows, write_rows

__all__ = ["BACKENDS", "BenchContext", "BenchPlan", "BenchRow", "RegressReport", "Variant", "compare",
           "read_rows", "register_backend", "run_bench", "write_rows"]
