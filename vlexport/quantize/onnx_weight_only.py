"""ONNX int8 weight-only pass: every MatMul with a constant weight becomes ONNX Runtime's ``MatMulNBits``.

``MatMulNBitsQuantizer(bits=8)`` stores each weight as int8 blocks of ``block_size`` values along the input
dimension, one scale (and zero point) per block, and dequantizes inside the kernel: activations stay fp32,
so the error is the weights' rounding only. ORT >= 1.22 has x86 kernels for 8 bits; an older ORT is refused
up front (its CPU provider would fail on the first call). This covers every component with constant
weights: vision encoders, Q-Formers, BLIP's text decoders and BLIP-2's language models (OPT and Flan-T5,
decoder steps included, so the KV-cache loop of vlexport/runtime runs them unchanged). Embedding Gathers
stay fp32 (a quantized Gather saves disk but not memory, ORT's docstring says). Big graphs keep external
data (the 2 GiB protobuf limit).
"""

from __future__ import annotations

from pathlib import Path

import onnx

from vlexport.errors import UsageError
from vlexport.export.backend import DeriveContext, Derived
from vlexport.quantize.onnx_passes import _quiet_root_logger, _rewrite
from vlexport.quantize.passes import register_pass
from vlexport.quantize.precision import Int8WeightConfig, get_precision

MIN_ORT = (1, 22)  # the first ONNX Runtime with x86 kernels for 8-bit MatMulNBits
PROTOBUF_LIMIT = 2 * 1024**3


def check_runtime() -> None:
    import onnxruntime

    version = tuple(int(p) for p in onnxruntime.__version__.split(".")[:2])
    if version < MIN_ORT:
        raise UsageError(f"int8-weight needs ONNX Runtime >= {'.'.join(map(str, MIN_ORT))} (8-bit MatMulNBits "
                         f"kernels on x86); {onnxruntime.__version__} is installed. Upgrade onnxruntime, or use "
                         "--precision int8-dynamic.")


def weight_only_int8(model: onnx.ModelProto, block_size: int, *, exclude: tuple[str, ...] = ()) -> onnx.ModelProto:
    """``model`` with its constant-weight MatMuls as 8-bit MatMulNBits (``exclude``: node names kept fp32)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    with _quiet_root_logger():
        q = MatMulNBitsQuantizer(model, bits=8, block_size=block_size, is_symmetric=False,
                                 nodes_to_exclude=list(exclude), op_types_to_quantize=("MatMul",))
        q.process()
    return q.model.model


def quantized_matmuls(model: onnx.ModelProto) -> int:
    return sum(n.op_type == "MatMulNBits" for n in model.graph.node)


class OnnxInt8WeightPass:
    backend = "onnx"
    precision = Int8WeightConfig.name

    def derive(self, ctx: DeriveContext) -> Derived:
        check_runtime()
        config = get_precision(ctx.job.precision)
        assert isinstance(config, Int8WeightConfig)
        counts: dict[str, int] = {}

        def write(src: Path, dst: Path, external: bool) -> None:
            model = weight_only_int8(onnx.load(str(src)), config.block_size)
            counts[dst.stem] = quantized_matmuls(model)
            weights = sum(len(t.raw_data) for t in model.graph.initializer)
            external = external and weights >= PROTOBUF_LIMIT // 2  # int8 may bring it well under the limit
            onnx.save(model, str(dst), save_as_external_data=external, all_tensors_to_one_file=True,
                      location=f"{dst.name}.data")

        derived = _rewrite(ctx, write)
        if not any(counts.values()):
            raise UsageError("int8-weight found no MatMul with a constant weight in this artifact: nothing to "
                             "quantize. Use --precision fp16 or int8-dynamic.")
        derived.details.update({"block_size": config.block_size, "bits": 8, "matmul_nbits": counts})
        return derived


register_pass(OnnxInt8WeightPass())
