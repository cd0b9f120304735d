#!/usr/bin/env bash
# The GPU benchmark suite in one device call, from the repository root of a CUDA machine:
#
#   bash benchmarks/gpu_suite.sh
#
# Runs the kernel micro-benchmarks (`python -m vlexport_kernels.bench`, -> gpu-<device>-kernels.json), then
# `vlexport bench --suite gpu --device cuda` (benchmarks/suites.toml) and writes
# benchmarks/results/gpu-<device>.{json,md,png}, then the BLIP-2 generation rows (-> gpu-<device>-generation.json); copies them to $OUT when that is set. vlexport is
# imported from this checkout (no install). Wheels for missing or too-old packages (vlexport needs
# transformers>=5.23; TensorRT for the tensorrt rows) are installed from ./.whl when that folder exists.
# A case that cannot run (no TensorRT, a preset config not shipped yet) is reported and the others go on.
set -uo pipefail
cd "$(dirname "$0")/.."

if [ -d .whl ] && compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
# kernels/ is the source folder that holds the `vlexport_kernels` package (pyproject maps it).
export PYTHONPATH="$PWD:$PWD/kernels:${PYTHONPATH:-}" PYTHONUNBUFFERED=1

python3 - <<'PY' || exit 1
import sys
import torch
import transformers
from packaging.version import Version

if not torch.cuda.is_available():
    sys.exit("gpu_suite: torch sees no CUDA device")
if Version(transformers.__version__) < Version("5.23"):
    sys.exit(f"gpu_suite: transformers {transformers.__version__} < 5.23 (BridgeTower breaks under tracing); "
             "carry a newer wheel in .whl/")
print(f"gpu_suite: {torch.cuda.get_device_name()}, torch {torch.__version__}, transformers {transformers.__version__}")
PY

name=$(python3 -c "import re, torch; print(re.sub(r'[^a-z0-9]+', '-', torch.cuda.get_device_name().lower()).strip('-'))")
out=benchmarks/results/gpu-$name
# Kernel micro-benchmarks first (seconds): ours vs HF eager math vs SDPA at the models' real shapes.
python3 -m vlexport_kernels.bench --json "$out-kernels.json"
rc_kernels=$?
python3 -m vlexport.cli bench --suite gpu --device cuda --work-dir /tmp/vlexport-bench-work \
  --json "$out.json" --markdown "$out.md" --plot "$out.png"
rc=$?
# BLIP-2 OPT-2.7b batch 1, 64 new tokens: compiled static-cache packages (fp16, int8-weight; CUDA-graph decode step)
# vs HF fp16 generate() and bitsandbytes LLM.int8: tokens/s and peak memory (benchmarks/gpu_generation.py).
python3 benchmarks/gpu_generation.py --out "$out-generation.json"
rc_generation=$?
if [ -n "${OUT:-}" ]; then
  cp "$out".json "$out".md "$out".png "$out-kernels.json" "$out-generation.json" "$OUT"/ 2>/dev/null
fi
[ "$rc_kernels" -eq 0 ] || exit "$rc_kernels"
[ "$rc_generation" -eq 0 ] || exit "$rc_generation"
exit $rc
