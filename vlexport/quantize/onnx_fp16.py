"""ONNX fp16 pass (``Fp16Config``) with onnxconverter-common: weights and activations in half precision, with
the range-sensitive ops (normalisations, softmax, the reductions and powers inside them, erf) kept in fp32 and
the graph's inputs and outputs kept fp32 (``keep_io_types``): callers feed and read what they did at fp32.
External data is kept for graphs above the exporter's threshold (BLIP-2's 2 GiB protobuf limit).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import onnx

from vlexport.contracts.backends import DeriveContext, Derived
from vlexport.contracts.passes import register_pass
from vlexport.contracts.precision import Fp16Config
from vlexport.quantize.onnx_rewrite import rewrite_components

# Ops whose fp16 results leave the fp32 tolerance band by orders of magnitude (variance and exp overflow).
FP16_KEEP_FP32 = (
    "LayerNormalization",
    "SkipLayerNormalization",
    "SimplifiedLayerNormalization",
    "Softmax",
    "ReduceMean",
    "Pow",
    "Sqrt",
    "Erf",
    "Exp",
    "Log",
)


class OnnxFp16Pass:
    backend = "onnx"
    precision = Fp16Config.name

    def derive(self, ctx: DeriveContext) -> Derived:
        from onnxconverter_common import float16

        def write(src: Path, dst: Path, external: bool) -> None:
            model = onnx.load(str(src))
            with warnings.catch_warnings():
                # one warning per weight clamped into fp16's range (hundreds per model): validation judges
                # what the clamping costs, the console needs none of them
                warnings.filterwarnings("ignore", message="the float32 number", category=UserWarning)
                half = float16.convert_float_to_float16(
                    model,
                    keep_io_types=True,
                    op_block_list=list(FP16_KEEP_FP32),
                    disable_shape_infer=external,
                )
            onnx.save(
                half,
                str(dst),
                save_as_external_data=external,
                all_tensors_to_one_file=True,
                location=f"{dst.name}.data",
            )

        return rewrite_components(ctx, write)


register_pass(OnnxFp16Pass())
