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


def outputs_read_inside(model: onnx.ModelProto) -> list[str]:
    """Graph outputs that nodes of the graph also read (a decoder's ``present.*.key``, reshaped for attention
    after it is emitted) given their own Identity, so the outputs alone are graph boundary tensors. With
    ``keep_io_types`` the converter casts such an output back to fp32 under its name and the inner readers
    then read that fp32 tensor while it typed their results fp16: BLIP-2 OPT's fp16 decoder failed to load
    ("Type (tensor(float16)) of output arg ... of node Reshape does not match expected type
    (tensor(float))"). Returns the outputs rewired."""
    graph = model.graph
    outputs = {o.name for o in graph.output}
    read = {i for n in graph.node for i in n.input} & outputs
    for name in sorted(read):
        inner = f"{name}/inner"
        for node in graph.node:
            node.output[:] = [inner if o == name else o for o in node.output]
            node.input[:] = [inner if i == name else i for i in node.input]
        graph.node.append(onnx.helper.make_node("Identity", [inner], [name], name=f"{name}/output"))
    return sorted(read)


class OnnxFp16Pass:
    backend = "onnx"
    precision = Fp16Config.name

    def derive(self, ctx: DeriveContext) -> Derived:
        from onnxconverter_common import float16

        def write(src: Path, dst: Path, external: bool) -> None:
            model = onnx.load(str(src))
            outputs_read_inside(model)
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
