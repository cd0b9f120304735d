"""ONNX int8-dynamic pass (``Int8DynamicConfig``): ONNX Runtime's ``quantize_dynamic`` with int8 weights (per
output channel by default: outlier channels keep their own scale) and activations quantized per call; the CPU
deployment path, optionally SmoothQuant-ed first (``--smooth``). Graphs carrying our fused com.microsoft nodes
(``--kernels``) quantize the same way: the MatMuls around them are what the quantizer rewrites. External data
is kept for graphs above the exporter's threshold (BLIP-2's 2 GiB protobuf limit).
"""

from __future__ import annotations

from pathlib import Path

import onnx

from vlexport.contracts.backends import DeriveContext, Derived
from vlexport.contracts.passes import register_pass
from vlexport.contracts.precision import Int8DynamicConfig
from vlexport.quantize.onnx_rewrite import quantizer_output, rewrite_components, source_view


class OnnxInt8DynamicPass:
    backend = "onnx"
    precision = Int8DynamicConfig.name

    def derive(self, ctx: DeriveContext) -> Derived:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        config = ctx.job.precision
        assert isinstance(config, Int8DynamicConfig)
        details: dict = {}

        def write(src: Path, dst: Path, external: bool) -> None:
            with quantizer_output(ctx.out_dir, dst) as out:
                exclude: list[str] = []
                src = source_view(src, out.parent)
                if config.smooth is not None:
                    src, exclude = _smoothed(ctx, src, out.parent, config, details)
                quantize_dynamic(
                    src,
                    out,
                    per_channel=config.per_channel,
                    weight_type=QuantType.QInt8,
                    reduce_range=config.reduce_range,
                    use_external_data_format=external,
                    nodes_to_exclude=exclude,
                )

        derived = rewrite_components(ctx, write)
        derived.details.update(details, weight_bits=7 if config.reduce_range else 8)
        return derived


def _smoothed(
    ctx: DeriveContext, src: Path, scratch: Path, config: Int8DynamicConfig, details: dict
) -> tuple[Path, list[str]]:
    """SmoothQuant ``src`` on the calibration set (quantize/calibration.py); the GELU-fed MatMuls to keep
    fp32.

    One component only (``Int8DynamicConfig.check_for`` refused the others before any work)."""
    from vlexport.quantize.calibration import calibration_set
    from vlexport.quantize.smoothing import after_activation_matmuls, smooth

    alpha = config.smooth
    (comp,) = ctx.parent.components.values()
    cal = calibration_set(
        config.calibration,
        artifact_dir=ctx.parent_dir,
        manifest=ctx.parent,
        task_spec=ctx.task_spec,
        config=ctx.config,
        input_names=tuple(t.name for t in comp.inputs),
    )
    model = onnx.load(str(src))
    keep = after_activation_matmuls(model)  # before smoothing puts a Mul between the GELU and its MatMul
    n = smooth(model, cal.feeds, alpha)
    path = scratch / f"smoothed-{src.name}"
    onnx.save(model, str(path))
    details.update(
        smooth={
            "alpha": alpha,
            "activations_smoothed": n,
            "kept_fp32": keep,
            "calibration": cal.record("minmax"),
        }
    )
    return path, keep


register_pass(OnnxInt8DynamicPass())
