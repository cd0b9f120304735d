"""ONNX int8-static pass: QDQ graphs with activation scales calibrated ahead of time.

ONNX Runtime's ``quantize_static`` runs the fp32 graph over the calibration set (quantize/calibration.py),
collects each activation's range (minmax, entropy or percentile: ``Int8StaticConfig.method``) and writes
QuantizeLinear / DequantizeLinear pairs around the MatMuls, Convs and Gemms, weights per output channel.
Activations and weights are symmetric int8, the form TensorRT's explicit-quantization int8 builds read
(the QDQ graph is what a TensorRT int8 engine is built from); ONNX Runtime runs it on CPU as well.
Normalisations, softmax and the element-wise ops stay fp32: quantizing their inputs costs accuracy and
saves little. Encoder artifacts (one component) only: a decoder step's calibration would need the cache
of real generations; generative artifacts take int8-weight.

The recipe knobs are int8-dynamic's (quantize/search.py): SmoothQuant first (``smooth``, calibrated on the
smoothed graph), MatMuls kept fp32 (``fp32_nodes``), and ``--search`` for both on the calibration set.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vlexport.contracts.backends import DeriveContext, Derived
from vlexport.contracts.passes import register_pass
from vlexport.contracts.precision import Int8StaticConfig
from vlexport.quantize.calibration import FeedReader, calibration_set
from vlexport.quantize.onnx_rewrite import quantizer_output, rewrite_components, source_view

QUANTIZED_OPS = ["MatMul", "Conv", "Gemm"]


def quantize_static_graph(
    src: Path,
    dst: Path,
    config: Int8StaticConfig,
    feeds: Sequence[Mapping[str, np.ndarray]],
    *,
    exclude: Sequence[str] = (),
    only: Sequence[str] | None = None,
    external: bool = False,
    ranges: Path | None = None,
) -> None:
    """ONNX Runtime's static QDQ quantizer with ``config``'s settings, calibrated on ``feeds``; ``exclude``:
    nodes kept fp32, ``only``: the nodes quantized (None: every node of ``QUANTIZED_OPS``). ``ranges``: a
    file caching the calibrated ranges of ``src`` across calls (the search quantizes one graph many ways; the
    ranges cover every tensor of ``QUANTIZED_OPS`` whichever nodes are quantized), where ONNX Runtime takes
    one (``calibration_cache_path``, 1.32)."""
    import inspect

    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    method = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }[config.method]
    cache = {}
    if ranges is not None and "calibration_cache_path" in inspect.signature(quantize_static).parameters:
        cache["calibration_cache_path"] = ranges
    # The histogram calibrators print their progress on stdout: keep the CLI's output readable.
    with contextlib.redirect_stdout(io.StringIO()):
        quantize_static(
            src,
            dst,
            FeedReader(feeds),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=QUANTIZED_OPS,
            per_channel=True,
            reduce_range=config.reduce_range,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            nodes_to_quantize=list(only) if only is not None else None,
            nodes_to_exclude=list(exclude),
            calibrate_method=method,
            use_external_data_format=external,
            extra_options={
                "ActivationSymmetric": True,
                "WeightSymmetric": True,
                "CalibTensorRangeSymmetric": True,
            },
            calibration_providers=["CPUExecutionProvider"],
            **cache,
        )


class OnnxInt8StaticPass:
    backend = "onnx"
    precision = Int8StaticConfig.name

    def derive(self, ctx: DeriveContext) -> Derived:
        from vlexport.quantize.search import (
            Scheme,
            search,
            smoothed_source,
            unsmoothed,
            write_kept,
            write_report,
        )

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
        details: dict[str, Any] = {}
        files: list[str] = []
        # one calibration per graph searched (the plain one, each smoothed one): every candidate reuses it
        scheme = Scheme(
            write=lambda src, dst, c, exclude: quantize_static_graph(
                src, dst, c, cal.feeds, exclude=exclude, ranges=src.with_suffix(".ranges.json")
            ),
            only=lambda src, dst, c, node: quantize_static_graph(
                src, dst, c, cal.feeds, only=[node], ranges=src.with_suffix(".ranges.json")
            ),
        )

        def write(src: Path, dst: Path, external: bool) -> None:
            with quantizer_output(ctx.out_dir, dst) as out:
                src = source_view(src, out.parent)
                chosen = ctx.job.precision
                if chosen.search:
                    result = search(
                        src,
                        chosen,
                        cal.feeds,
                        out.parent,
                        agreement=ctx.task_spec.agreement,
                        progress=ctx.progress,
                        scheme=scheme,
                    )
                    chosen = result.config
                    files.extend(write_report(result, ctx.out_dir))
                    details["search"] = {**result.record(), "files": files}
                    ctx.job.precision = chosen  # the manifest records the recipe found as the knobs
                source, default_keep, n = smoothed_source(
                    src, chosen.smooth, cal.feeds, out.parent, leave=unsmoothed(chosen, chosen.fp32_nodes)
                )
                exclude = list(chosen.fp32_nodes) if chosen.fp32_nodes is not None else default_keep
                write_kept(
                    lambda s, d, c, e: quantize_static_graph(
                        s, d, c, cal.feeds, exclude=e, external=external
                    ),
                    source,
                    out,
                    chosen,
                    exclude,
                    external=external,
                )
                if exclude:
                    details["fp32_nodes"] = exclude
                    if chosen.kept_as != "fp32":
                        details["kept_as"] = chosen.kept_as
                if chosen.smooth is not None:
                    details["smooth"] = {
                        "alpha": chosen.smooth,
                        "activations_smoothed": n,
                        "kept_fp32": exclude,
                    }

        derived = rewrite_components(ctx, write)
        derived.details.update(
            details, calibration=cal.record(config.method), weight_bits=7 if config.reduce_range else 8
        )
        derived.files.extend(files)
        return derived


register_pass(OnnxInt8StaticPass())
