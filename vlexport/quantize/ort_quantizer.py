"""ONNX Runtime's ``quantize_dynamic`` (the per-tensor int8-dynamic scheme), guarded against running the
machine out of memory.

The quantizer holds the whole graph several times over: 3.1-3.4x the fp32 weights' bytes on a chain of
MatMuls (a 2.15 GB graph peaked at 6.59 GB RSS, ORT 1.32), and BLIP-2 OPT-2.7b's 4.4 GB image encoder was
killed by the kernel past 23.9 GB. So:

* below ``PEAK_PER_WEIGHT_BYTE`` x the weights of free memory it cannot succeed: refused before it starts
  (``InsufficientMemory``, which `vlexport tune` lists as a skipped candidate);
* a graph above ``ISOLATE_ABOVE`` bytes is quantized in a child process that offers itself to the kernel's
  OOM killer first (``oom_score_adj`` 1000): when memory runs out the quantizer dies, not vlexport, whose
  cleanup removes the half-built variant and says what to do. Small graphs (the search's per-MatMul sweeps
  call the quantizer once per MatMul) stay in process.

The per-token scheme streams one weight at a time (quantize/onnx_per_token.py) and needs none of this.
"""

from __future__ import annotations

import functools
import json
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import onnx

from vlexport.errors import CheckError, InsufficientMemory
from vlexport.memory import available_bytes

PEAK_PER_WEIGHT_BYTE = 3.0  # the measured floor (module doc): less free than this cannot succeed
ISOLATE_ABOVE = 1 << 30  # weights (bytes) above which the quantizer runs in a child process

# the child: first in line for the OOM killer, then ONNX Runtime's quantizer with the parent's arguments
_CHILD = """
import json, sys
try:
    with open("/proc/self/oom_score_adj", "w") as f:
        f.write("1000")
except OSError:
    pass
from onnxruntime.quantization import QuantType, quantize_dynamic
a = json.loads(sys.argv[1])
quantize_dynamic(a.pop("src"), a.pop("dst"), weight_type=QuantType.QInt8, **a)
"""


def weight_bytes(path: Path) -> int:
    """The graph's bytes: its protobuf plus the external data its initializers point at."""
    st = path.stat()
    return _weight_bytes(str(path), st.st_mtime_ns, st.st_size)


# keyed by the file's identity: the sensitivity sweep quantizes one source once per MatMul, and a graph with
# its weights inline would otherwise be parsed again each time only to be sized
@functools.lru_cache(maxsize=16)
def _weight_bytes(path: str, mtime_ns: int, size: int) -> int:
    model = onnx.load(path, load_external_data=False)
    external = 0
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in t.external_data}
            external += int(info.get("length", 0))
    return size + external


def quantize_dynamic(
    src: Path,
    dst: Path,
    *,
    per_channel: bool,
    reduce_range: bool,
    external: bool,
    exclude: Sequence[str] = (),
    only: str | None = None,
) -> None:
    """``onnxruntime.quantization.quantize_dynamic`` with int8 weights, checked and isolated (module doc)."""
    size = weight_bytes(src)
    need, free = PEAK_PER_WEIGHT_BYTE * size, available_bytes()
    advice = (
        "Quantize it with --activations per-token (vlexport's own rewrite, one weight at a time) or at "
        "int8-weight, keep this component at another precision (--components), or use a machine with more "
        "memory."
    )
    if free is not None and need > free:
        raise InsufficientMemory(
            f"Not enough memory to quantize {src.name} at per-tensor int8-dynamic: ONNX Runtime's "
            f"quantize_dynamic holds about {PEAK_PER_WEIGHT_BYTE:g}x the graph's {size / 1e9:.2f} GB of "
            f"weights ({need / 1e9:.1f} GB) and {free / 1e9:.1f} GB is free. {advice}"
        )
    args = {
        "per_channel": per_channel,
        "reduce_range": reduce_range,
        "use_external_data_format": external,
        "nodes_to_exclude": list(exclude),
        "nodes_to_quantize": None if only is None else [only],
    }
    if size <= ISOLATE_ABOVE:
        from onnxruntime.quantization import QuantType
        from onnxruntime.quantization import quantize_dynamic as ort_quantize_dynamic

        from vlexport.quantize.onnx_rewrite import quiet_root_logger

        with quiet_root_logger():
            ort_quantize_dynamic(src, dst, weight_type=QuantType.QInt8, **args)
        return
    child = [sys.executable, "-c", _CHILD, json.dumps({"src": str(src), "dst": str(dst), **args})]
    # check=False: the exit status is read below; an exception in the parent (Ctrl-C) kills the child
    done = subprocess.run(child, check=False, capture_output=True, text=True)
    if done.returncode == -signal.SIGKILL:
        raise InsufficientMemory(
            f"ONNX Runtime's quantize_dynamic was killed (SIGKILL, as the kernel's out-of-memory killer "
            f"does) while quantizing {src.name} ({size / 1e9:.2f} GB of fp32 weights) at per-tensor "
            f"int8-dynamic; nothing was written. {advice}"
        )
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        raise CheckError(
            f"ONNX Runtime's quantize_dynamic failed on {src.name} (exit {done.returncode}): "
            f"{lines[-1] if lines else 'no message'}. The fp32 parent is unchanged; check it with "
            "`vlexport validate` and report the failure with this message."
        )
