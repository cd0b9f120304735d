"""Precisions: one frozen config per precision (torchao-style), and (next) the passes that produce them."""

from vlexport.quantize.precision import (
    PRECISIONS,
    Bf16Config,
    Fp16Config,
    Fp32Config,
    Int8BnbConfig,
    Int8DynamicConfig,
    Int8StaticConfig,
    Int8WeightConfig,
    PrecisionConfig,
    Tolerance,
    get_precision,
    precisions_for_backend,
)

__all__ = ["PRECISIONS", "Bf16Config", "Fp16Config", "Fp32Config", "Int8BnbConfig", "Int8DynamicConfig", "Int8StaticConfig",
           "Int8WeightConfig", "PrecisionConfig", "Tolerance", "get_precision", "precisions_for_backend"]

from vlexport.callables import make_callable  # vlexport.quantize(...) is vlexport.api.quantize

make_callable(__name__, "vlexport.api:quantize")
