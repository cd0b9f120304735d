"""ONNX int8-static pass: QDQ graphs with activation scales calibrated ahead of time.

ONNX Runtime's ``quantize_static`` runs the fp32 graph over the calibration set (quantize/calibration.py),
collects each activation's range (minmax, entropy or percentile: ``Int8StaticConfig.method``) and writes
QuantizeLinear / DequantizeLinear pairs around the MatMuls, Convs and Gemms, weights per output channel.
Activations and weights are symmetric int8, the form TensorRT's explicit-quantization int8 builds read
(the QDQ graph is what a TensorRT int8 engine is built from); ONNX Runtime runs it on CPU as well.
Normalisations, softmax and the element-wise ops stay fp32: quantizing their inputs costs accuracy and
saves little. Encoder artifacts (one component) only: a decoder step's calibration would need the cache
of real generations; generative artifacts take int8-weight.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

from vlexport.contracts.backends import DeriveContext, Derived
from vlexport.contracts.passes import register_pass
from vlexport.contracts.precision import Int8StaticConfig
from vlexport.quantize.calibration import FeedReader, calibration_set
from vlexport.quantize.onnx_rewrite import quantizer_output, rewrite_components, source_view

QUANTIZED_OPS = ["MatMul", "Conv", "Gemm"]


class OnnxInt8StaticPass:
    backend = "onnx"
    precision = Int8StaticConfig.name

    def derive(self, ctx: DeriveContext) -> Derived:
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

        config = ctx.job.precision
        assert isinstance(config, Int8StaticConfig)
        (comp,) = ctx.parent.components.values()  # one: Int8StaticConfig.check_for refused the others
        cal = calibration_set(
            config.calibration,
            artifact_dir=ctx.parent_dir,
            manifest=ctx.parent,
            task_spec=ctx.task_spec,
            config=ctx.config,
            input_names=tuple(t.name for t in comp.inputs),
        )
        ctx.progress(f"int8-static: calibrating on {len(cal.feeds)} {cal.source} sample(s), {config.method}")
        method = {
            "minmax": CalibrationMethod.MinMax,
            "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile,
        }[config.method]

        def write(src: Path, dst: Path, external: bool) -> None:
            # The histogram calibrators print their progress on stdout: keep the CLI's output readable.
            with quantizer_output(ctx.out_dir, dst) as out, contextlib.redirect_stdout(io.StringIO()):
                src = source_view(src, out.parent)
                src = source_view(src, out.parent)
                quantize_static(
                    src,
                    out,
                    FeedReader(cal.feeds),
                    quant_format=QuantFormat.QDQ,
                    op_types_to_quantize=QUANTIZED_OPS,
                    per_channel=True,
                    reduce_range=config.reduce_range,
                    activation_type=QuantType.QInt8,
                    weight_type=QuantType.QInt8,
                    calibrate_method=method,
                    use_external_data_format=external,
                    extra_options={
                        "ActivationSymmetric": True,
                        "WeightSymmetric": True,
                        "CalibTensorRangeSymmetric": True,
                    },
                    calibration_providers=["CPUExecutionProvider"],
                )

        derived = rewrite_components(ctx, write)
        derived.details.update(
            calibration=cal.record(config.method), weight_bits=7 if config.reduce_range else 8
        )
        return derived


register_pass(OnnxInt8StaticPass())
