"""Exporters: ONNX (torch.onnx dynamo), torch.compile / AOTInductor, TensorRT."""

# TensorRT's default min:opt:max per named dynamic axis. It lives here, not in tensorrt.py, so that the
# CLI can show it in --help without importing torch. opt is where TensorRT tunes kernels: a typical
# serving batch and caption length.
TRT_DEFAULT_SHAPES = "batch=1:8:32,sequence=1:32:128"

from vlexport.callables import make_callable  # vlexport.export(...) is vlexport.api.export

make_callable(__name__, "vlexport.api:export")
