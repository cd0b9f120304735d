"""ONNX int8-dynamic pass (``Int8DynamicConfig``): ONNX Runtime's ``quantize_dynamic`` with int8 weights (per
output channel by default: outlier channels keep their own scale) and activations quantized per call; the CPU
deployment path, optionally SmoothQuant-ed first (``--smooth``), with chosen MatMuls kept fp32
(``fp32_nodes``), or with a recipe searched on the calibration set (``--search``, quantize/search.py).
Graphs carrying our fused com.microsoft nodes (``--kernels``) quantize the same way: the MatMuls around them
are what the quantizer rewrites. External data is kept for graphs above the exporter's threshold (BLIP-2's
2 GiB protobuf limit).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from vlexport.contracts.backends import DeriveContext, Derived
from vlexport.contracts.passes import register_pass
from vlexport.contracts.precision import Int8DynamicConfig
from vlexport.quantize.onnx_rewrite import quantizer_output, rewrite_components, source_view


class OnnxInt8DynamicPass:
    backend = "onnx"
    precision = Int8DynamicConfig.name

    def derive(self, ctx: DeriveContext) -> Derived:
        from vlexport.quantize.search import build, search, write_report

        config = ctx.job.precision
        assert isinstance(config, Int8DynamicConfig)
        details: dict[str, Any] = {}
        files: list[str] = []
        calibration = functools.cache(lambda: _calibration(ctx, config))

        def write(src: Path, dst: Path, external: bool) -> None:
            with quantizer_output(ctx.out_dir, dst) as out:
                src = source_view(src, out.parent)
                chosen = ctx.job.precision
                if chosen.search:  # one component: Int8DynamicConfig.check_for refused the others
                    result = search(
                        src,
                        chosen,
                        calibration().feeds,
                        out.parent,
                        agreement=ctx.task_spec.agreement,
                        progress=ctx.progress,
                    )
                    chosen = result.config
                    files.extend(write_report(result, ctx.out_dir))
                    details["search"] = {**result.record(), "files": files}
                    # the manifest records the recipe found as the precision's knobs (pipeline reads the job)
                    ctx.job.precision = chosen
                details.update(
                    build(src, out, chosen, lambda: calibration().feeds, out.parent, external=external)
                )
                if chosen.smooth is not None or config.search:
                    details["calibration"] = calibration().record(
                        "search" if config.search else "smoothquant ranges"
                    )

        derived = rewrite_components(ctx, write)
        derived.details.update(details, weight_bits=7 if config.reduce_range else 8)
        derived.files.extend(files)
        return derived


def _calibration(ctx: DeriveContext, config: Int8DynamicConfig) -> Any:
    """The calibration set of the (single) component: the user's directory or the seeded synthetic one."""
    from vlexport.quantize.calibration import calibration_set

    (comp,) = ctx.parent.components.values()
    return calibration_set(
        config.calibration,
        artifact_dir=ctx.parent_dir,
        manifest=ctx.parent,
        task_spec=ctx.task_spec,
        config=ctx.config,
        input_names=tuple(t.name for t in comp.inputs),
    )


register_pass(OnnxInt8DynamicPass())
