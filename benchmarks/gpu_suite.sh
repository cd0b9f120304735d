#!/usr/bin/env bash
# The GPU benchmark suite in one device call, from the repository root of a CUDA machine:
#
#   bash benchmarks/gpu_suite.sh             # on the GPU: results under benchmarks/results/gpu-<device>.*
#   bash benchmarks/gpu_suite.sh --dry-run   # every step on the CPU with tiny twins (CI runs it)
#
# Runs the kernel micro-benchmarks (`python -m vlexport_kernels.bench`, -> gpu-<device>-kernels.json), then
# `vlexport bench --suite gpu --device cuda` (benchmarks/suites.toml) and writes
# benchmarks/results/gpu-<device>.{json,md,png}, then the BLIP-2 generation rows
# (benchmarks/gpu_generation.py -> gpu-<device>-generation.json); copies them to $OUT when that is set.
# vlexport is imported from this checkout (no install). Wheels for missing or too-old packages (vlexport needs
# transformers>=5.23; TensorRT for the tensorrt rows) are installed from ./.whl when that folder exists.
# A row whose toolchain is absent (no TensorRT, no bitsandbytes) is reported as skipped and the others go on;
# any other failure makes the script exit non-zero after the remaining steps ran.
#
# --dry-run: the same steps, the same files (under $OUT, or a temporary folder; never benchmarks/results/),
# on the CPU: kernels under TRITON_INTERPRET=1 at shrunk shapes, the suite's presets swapped for their tiny
# twins with one iteration, the generation rows on the tiny BLIP-2. A lent GPU's one call must not be lost to a
# script bug, so CI runs this (tests/test_gpu_suite_dry_run.py) and checks every file.
set -uo pipefail
cd "$(dirname "$0")/.."

dry_run=0
case "${1:-}" in
  "") ;;
  --dry-run) dry_run=1 ;;
  *) echo "usage: bash benchmarks/gpu_suite.sh [--dry-run]" >&2; exit 2 ;;
esac

if [ -d .whl ] && compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
# kernels/ is the source folder that holds the `vlexport_kernels` package (pyproject maps it).
export PYTHONPATH="$PWD:$PWD/kernels:${PYTHONPATH:-}" PYTHONUNBUFFERED=1

if [ "$dry_run" -eq 1 ]; then
  export TRITON_INTERPRET=1  # read when triton decorates the kernels: before Python starts
  results="${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/gpu-suite-dry-run.XXXXXX")}"
  out="$results/gpu-dry-run"
  work="$results/work"
  flags=(--dry-run)
  echo "gpu_suite: dry run on the CPU, files under $results"
else
  python3 - <<'PY' || exit 1
import sys
import torch
import transformers
from packaging.version import Version

if not torch.cuda.is_available():
    sys.exit("gpu_suite: torch sees no CUDA device (bash benchmarks/gpu_suite.sh --dry-run checks the script on a CPU)")
if Version(transformers.__version__) < Version("5.23"):
    sys.exit(f"gpu_suite: transformers {transformers.__version__} < 5.23 (BridgeTower breaks under tracing); "
             "carry a newer wheel in .whl/")
print(f"gpu_suite: {torch.cuda.get_device_name()}, torch {torch.__version__}, transformers {transformers.__version__}")
PY
  name=$(python3 -c "import re, torch; print(re.sub(r'[^a-z0-9]+', '-', torch.cuda.get_device_name().lower()).strip('-'))")
  out=benchmarks/results/gpu-$name
  work=/tmp/vlexport-bench-work
  flags=()
fi

# Kernel micro-benchmarks first (seconds): ours vs HF eager math vs SDPA at the models' real shapes.
python3 -m vlexport_kernels.bench "${flags[@]}" --json "$out-kernels.json"
rc_kernels=$?
device=(--device cuda)
[ "$dry_run" -eq 1 ] && device=()  # the dry run's suite is on the CPU
python3 -m vlexport.cli bench --suite gpu "${device[@]}" "${flags[@]}" --work-dir "$work/bench" \
  --json "$out.json" --markdown "$out.md" --plot "$out.png"
rc=$?
# BLIP-2 OPT-2.7b batch 1, 64 new tokens: compiled static-cache packages (fp16, int8-weight; CUDA-graph decode step)
# vs HF fp16 generate() and bitsandbytes LLM.int8: tokens/s and peak memory (benchmarks/gpu_generation.py).
python3 benchmarks/gpu_generation.py "${flags[@]}" --work-dir "$work/generation" --out "$out-generation.json"
rc_generation=$?
if [ -n "${OUT:-}" ] && [ "$dry_run" -eq 0 ]; then
  cp "$out".json "$out".md "$out".png "$out-kernels.json" "$out-generation.json" "$OUT"/ 2>/dev/null
fi
echo "gpu_suite: kernels rc=$rc_kernels, bench rc=$rc, generation rc=$rc_generation; files: $out{-kernels.json,.json,.md,.png,-generation.json}"
[ "$rc_kernels" -eq 0 ] || exit "$rc_kernels"
[ "$rc_generation" -eq 0 ] || exit "$rc_generation"
exit $rc
