"""Benchmarks: harness (interleaved timing with parity against eager), reports, plots and the regress gate.

Variants are the bench's torch runners (``RUNNERS``: eager, compile; add one with ``register_runner``) and
every export backend of the registry (``register_backend`` here is the registry's: a backend registered
there is built, loaded and timed by ``vlexport bench`` with no other change).
"""

from vlexport.bench.harness import BenchPlan, run_bench
from vlexport.bench.regress import RegressReport, compare
from vlexport.bench.rows import BenchRow, read_rows, write_rows
from vlexport.bench.variants import RUNNERS, BenchContext, Variant, register_runner
from vlexport.contracts.backends import register_backend

BACKENDS = RUNNERS  # the earlier name of the runner table (export backends live in the registry)

__all__ = [
    "BACKENDS",
    "RUNNERS",
    "BenchContext",
    "BenchPlan",
    "BenchRow",
    "RegressReport",
    "Variant",
    "compare",
    "read_rows",
    "register_backend",
    "register_runner",
    "run_bench",
    "write_rows",
]

from vlexport.callables import make_callable  # vlexport.bench(...) is vlexport.api.bench

make_callable(__name__, "vlexport.api:bench")
