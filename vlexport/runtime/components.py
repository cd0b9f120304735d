"""Component callables for non-ONNX files: AOTInductor packages and TensorRT engines.

The backends that write these files (export/aoti.py, export/tensorrt.py) load them with these classes.
A component takes named numpy arrays and returns named numpy arrays (what validation feeds); it also
exposes ``call_tensors`` for the benchmark harness, which times it on device tensors without numpy
round trips.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vlexport.errors import CheckError, MissingToolchain, UsageError

TRT_INSTALL_HINT = (
    "TensorRT 10 is not installed: `pip install 'vlexport[trt]'` (tensorrt>=10) on a machine with "
    "an NVIDIA GPU and CUDA; it is not installable from the registries this machine reaches."
)


class AotiComponent:
    """An AOTInductor package as a callable. Names come from the package metadata written at compile time."""

    def __init__(self, path: str | Path, *, device: str = "auto", threads: int | None = None):
        if threads:
            torch.set_num_threads(threads)  # the package's OpenMP kernels use torch's intra-op pool
        built_for = package_device(path)
        if built_for == "cuda" and not torch.cuda.is_available():
            raise UsageError(
                f"{path} was compiled for CUDA (--device cuda) and torch sees no GPU here: run it on "
                "a machine with an NVIDIA GPU and a CUDA build of torch, or compile again with "
                "--device cpu."
            )
        try:
            self.runner = torch._inductor.aoti_load_package(str(path))
            meta = self.runner.get_metadata()
            self.metadata: dict[str, str] = dict(meta)
            self.input_names: list[str] = json.loads(meta["vlexport.inputs"])
            self.output_names: list[str] = json.loads(meta["vlexport.outputs"])
        except (RuntimeError, KeyError, json.JSONDecodeError) as e:
            raise CheckError(
                f"Cannot load AOTInductor package {path}: {e}. It was built by another torch "
                "version or is damaged; compile the artifact again."
            ) from None
        # A package runs on the device it was compiled for, whatever the caller prefers.
        self.device = torch.device(meta.get("AOTI_DEVICE_KEY") or "cpu")

    def call_tensors(self, *tensors: torch.Tensor) -> Sequence[torch.Tensor]:
        return self.runner(*tensors)

    def __call__(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [n for n in self.input_names if n not in inputs]
        if missing:
            raise CheckError(
                f"Missing inputs {missing} for AOTInductor package expecting {self.input_names}."
            )
        tensors = [
            torch.from_numpy(np.ascontiguousarray(inputs[n])).to(self.device) for n in self.input_names
        ]
        with torch.no_grad():
            outs = self.call_tensors(*tensors)
        return {
            name: o.detach().float().cpu().numpy() if o.is_floating_point() else o.cpu().numpy()
            for name, o in zip(self.output_names, outs)
        }


def package_device(path: str | Path) -> str | None:
    """The device an AOTInductor package was compiled for, read off its metadata without loading it (loading a
    CUDA package without a GPU aborts inside the runtime)."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            names = [n for n in z.namelist() if n.endswith("wrapper_metadata.json")]
            return json.loads(z.read(names[0])).get("AOTI_DEVICE_KEY") if names else None
    except (OSError, zipfile.BadZipFile, KeyError, ValueError):
        return None  # aoti_load_package names what is wrong with the file


def import_tensorrt() -> Any:
    """``import tensorrt``, or a UsageError saying how to get it (never an ImportError traceback)."""
    try:
        import tensorrt as trt
    except (ImportError, OSError) as e:  # OSError: the wheel is there but libnvinfer is not
        raise MissingToolchain(f"{TRT_INSTALL_HINT} ({type(e).__name__}: {e})") from None
    if not hasattr(trt, "Builder"):
        raise MissingToolchain(
            f"{TRT_INSTALL_HINT} (the installed `tensorrt` is a download stub without the builder)"
        )
    return trt


class TensorRTComponent:
    """A serialized TensorRT 10 engine run through an execution context on torch CUDA tensors."""

    def __init__(self, path: str | Path, *, device: str = "auto", threads: int | None = None):
        trt = import_tensorrt()
        if not torch.cuda.is_available():
            raise MissingToolchain("TensorRT engines run on an NVIDIA GPU; torch sees no CUDA device here.")
        self.trt = trt
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = runtime.deserialize_cuda_engine(Path(path).read_bytes())
        if self.engine is None:
            raise CheckError(
                f"TensorRT cannot deserialize {path}: it was built by another TensorRT version or "
                "for another GPU. Build the engine again on this machine with `vlexport trt`."
            )
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.dtypes = {n: _torch_dtype(trt, self.engine.get_tensor_dtype(n)) for n in names}
        self.device = torch.device("cuda")
        self.stream = torch.cuda.Stream()

    def call_tensors(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        """Inputs in ``input_names`` order, on the GPU; returns outputs in ``output_names`` order."""
        keep = []
        for name, t in zip(self.input_names, tensors):
            t = t.to(self.device, self.dtypes[name]).contiguous()
            keep.append(t)
            self.context.set_input_shape(name, tuple(t.shape))
            self.context.set_tensor_address(name, t.data_ptr())
        outs = []
        for name in self.output_names:
            out = torch.empty(
                tuple(self.context.get_tensor_shape(name)), dtype=self.dtypes[name], device=self.device
            )
            self.context.set_tensor_address(name, out.data_ptr())
            outs.append(out)
        self.stream.wait_stream(torch.cuda.current_stream())  # inputs were written on the current stream
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise CheckError("TensorRT execution failed (see the TensorRT log above).")
        torch.cuda.current_stream().wait_stream(self.stream)
        return outs

    def __call__(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [n for n in self.input_names if n not in inputs]
        if missing:
            raise CheckError(f"Missing inputs {missing} for TensorRT engine expecting {self.input_names}.")
        outs = self.call_tensors(
            *(torch.from_numpy(np.ascontiguousarray(inputs[n])) for n in self.input_names)
        )
        torch.cuda.synchronize()
        return {
            n: o.float().cpu().numpy() if o.is_floating_point() else o.cpu().numpy()
            for n, o in zip(self.output_names, outs)
        }


def _torch_dtype(trt: Any, dtype: Any) -> torch.dtype:
    table = {
        trt.float32: torch.float32,
        trt.float16: torch.float16,
        trt.int32: torch.int32,
        trt.int64: torch.int64,
        trt.bool: torch.bool,
        trt.int8: torch.int8,
    }
    if hasattr(trt, "bfloat16"):
        table[trt.bfloat16] = torch.bfloat16
    if dtype not in table:
        raise CheckError(f"TensorRT tensor dtype {dtype} has no torch equivalent in vlexport.")
    return table[dtype]
