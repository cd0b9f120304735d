"""Precision passes: the ONNX rewrites (fp16, int8 dynamic / static / weight-only), calibration, SmoothQuant.
The configs and the pass registry are contracts (vlexport/contracts/)."""
