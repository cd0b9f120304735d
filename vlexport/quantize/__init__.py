"""Precision passes: the ONNX rewrites (fp16, int8 dynamic / static / weight-only), calibration, SmoothQuant.
The configs and the pass registry are contracts (vlexport/contracts/)."""

from vlexport.callables import make_callable  # vlexport.quantize(...) is vlexport.api.quantize

make_callable(__name__, "vlexport.api:quantize")
