"""Load ONNX components of an artifact as callables on ONNX Runtime."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from vlexport.errors import CheckError


def available_providers(device: str = "auto") -> list[str]:
    have = ort.get_available_providers()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device in ("auto", "cuda") and "CUDAExecutionProvider" in have:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device == "cuda":
        raise CheckError(
            "CUDA was requested but this onnxruntime has no CUDAExecutionProvider: "
            "pip install 'vlexport[gpu]' (onnxruntime-gpu) on a machine with a GPU."
        )
    return ["CPUExecutionProvider"]


# ONNX Runtime graph optimizers a decode-step session leaves out. MatMulScaleFusion folds the attention scale
# (a Div or Mul by a scalar) into FusedMatMul's alpha; MLAS runs a one-row product through its GEMV kernels
# only when alpha is 1, so in a decode step (one query row per head) the fused node packs the cached keys on
# every call instead. blip-image-captioning-base decoder, 2 threads, AMD EPYC: FusedMatMul 12.8 -> 5.3 ms per
# step at batch 8 (ORT profile); the decode loop 0.85x the time per token at batch 8 and 1.0x at batch 1
# (interleaved). BLIP-2 OPT-2.7b (the scale on q, a short self-attention, no cross-attention): no change
# (int4 decode 0.99x / 1.04x at batch 1 / 4). Encoders keep the fusion: their many query rows take the GEMM
# path, and the separate Div cost their vision encoder 4-7%.
DECODE_STEP_DISABLED_OPTIMIZERS = ("MatMulScaleFusion",)


# How long an intra-op thread spins for the next operator's work before it sleeps (a key of recent ORT
# releases, measured on 1.32; older ones ignore it and spin unbounded within a run). Within a run the gap
# between two operators is microseconds, and a sleeping thread costs a wake-up per parallel operator; on a
# loaded machine a spinning one holds a core another process needs.
# blip-image-captioning-base decode loop, 2 threads, AMD EPYC, ms/token, never spinning / 30 us within a run /
# ORT's default: quiet, batch 1 16.3 / 14.3 / 14.2, batch 8 32.7 / 29.0 / 28.7; beside two busy loops,
# batch 1 30.9 / 32.7 / 52.7 (docs/ARCHITECTURE.md, "Thread pools that wait by spinning").
SPIN_US = 30


def session_options(
    threads: int | None = None, *, spin: bool = True, decode_step: bool = False
) -> tuple[ort.SessionOptions, list[str]]:
    """The SessionOptions and the disabled optimizers (an InferenceSession argument) of a component.

    ``spin``: the pool's threads spin between the operators of a run, for at most SPIN_US each time, and stop
    when the run returns; else they never spin (serving: the cores are shared with the server and other
    models, run by run)."""
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    if spin:
        # ORT's pool would go on spinning after each run by default: whatever runs next on the cores (torch
        # beside the benchmark's ORT variants, the caller's own work) was measured 2x slower beside it
        opts.add_session_config_entry("session.force_spinning_stop", "1")
        opts.add_session_config_entry("session.intra_op.spin_duration_us", str(SPIN_US))
    else:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opts, list(DECODE_STEP_DISABLED_OPTIMIZERS if decode_step else ())


class OnnxComponent:
    """One ONNX graph as a callable: named numpy inputs in, named numpy outputs out.

    Feeds only the inputs the graph declares: optimized graphs may drop unused ones (pixel_mask).
    ``decode_step``: the graph is a generative decoder called once per new token (one query row).
    """

    def __init__(
        self,
        path: str | Path,
        *,
        providers: Sequence[str] | None = None,
        threads: int | None = None,
        spin: bool = True,
        decode_step: bool = False,
    ):
        self.decode_step = decode_step
        opts, disabled = session_options(threads, spin=spin, decode_step=decode_step)
        try:
            self.session = ort.InferenceSession(
                str(path),
                sess_options=opts,
                providers=list(providers or available_providers()),
                disabled_optimizers=disabled,
            )
        except Exception as e:  # noqa: BLE001  ORT raises its own Fail/InvalidGraph types
            raise load_error(path, e) from None
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self._input_types = {i.name: i.type for i in self.session.get_inputs()}

    def __call__(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [n for n in self.input_names if n not in inputs]
        if missing:
            raise CheckError(f"Missing inputs {missing} for ONNX graph expecting {self.input_names}.")
        feed = {n: np.ascontiguousarray(inputs[n]) for n in self.input_names}
        return dict(zip(self.output_names, self.session.run(None, feed)))


# What ONNX Runtime says when the graph is sound but this build of it cannot run it (an operator or opset
# newer than it, a contrib op it was built without): an onnxruntime to upgrade, not a file to re-export
_RUNTIME_TOO_OLD = re.compile(
    r"Could not find an implementation|is not a registered function/op|No Op registered|"
    r"Unsupported model IR version|opset \d+ is under development|only guarantees support",
    re.IGNORECASE,
)


# What ONNX Runtime says when the protobuf parsed but its types or shapes do not check: a graph written wrong
# (by a pass, or edited by hand), not a truncated file
_GRAPH_INCONSISTENT = re.compile(r"Type Error|ShapeInferenceError|\[TypeInferenceError\]", re.IGNORECASE)


def load_error(path: str | Path, error: Exception) -> CheckError:
    """One paragraph for a graph ONNX Runtime refused, naming the cause its message gives."""
    said = " ".join(str(error).split())[:400]
    if _RUNTIME_TOO_OLD.search(said):
        return CheckError(
            f"ONNX Runtime {ort.__version__} cannot run {path}: {said}. The graph is intact but needs an "
            "operator or opset this onnxruntime lacks: upgrade it (pip install -U onnxruntime, or "
            "onnxruntime-gpu for CUDA) on the machine that runs the artifact."
        )
    if _GRAPH_INCONSISTENT.search(said):
        return CheckError(
            f"ONNX Runtime cannot load {path}: {said}. The file reads, but its graph does not type-check: "
            "if vlexport has just built it, the pass that wrote it is at fault (report it with this "
            "message); an artifact changed after export needs exporting again."
        )
    return CheckError(
        f"ONNX Runtime cannot load {path}: {said}. The file is damaged or incomplete; export the artifact "
        "again."
    )
