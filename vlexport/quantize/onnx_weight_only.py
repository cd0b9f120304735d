"""The ONNX weight-only passes (int8-weight, int4-weight): each component rewritten by the MatMulNBits writer
(quantize/matmul_nbits.py), after a block-size ``--search`` on the calibration set when asked, then given ONNX
Runtime's fused attention and normalization ops (export/ort_fusions.py): MatMulNBits already runs on ONNX
Runtime alone, so its graphs lose no consumer by them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vlexport.contracts.backends import DeriveContext, Derived
from vlexport.contracts.passes import register_pass
from vlexport.contracts.precision import Int4WeightConfig, Int8WeightConfig, WeightOnlyConfig
from vlexport.errors import UsageError
from vlexport.export.ort_fusions import fuse_for_ort
from vlexport.models.host import DECODER
from vlexport.quantize.matmul_nbits import check_runtime, weight_only_nbits
from vlexport.quantize.onnx_rewrite import rewrite_components


class OnnxWeightOnlyPass:
    """The pass of one weight-only precision (its config class says the width)."""

    backend = "onnx"

    def __init__(self, config: type[WeightOnlyConfig]) -> None:
        self.config_type, self.precision = config, config.name

    def derive(self, ctx: DeriveContext) -> Derived:
        check_runtime(self.precision)
        config = ctx.job.precision
        assert isinstance(config, self.config_type)
        counts: dict[str, int] = {}
        gathers: dict[str, int] = {}
        fused: dict[str, dict[str, int]] = {}
        details: dict[str, Any] = {}
        files: list[str] = []

        def write(src: Path, dst: Path, external: bool) -> None:
            nonlocal config
            if config.search:  # one component: WeightOnlyConfig.check_for refused the others
                config = self._search(ctx, config, src, dst.parent, details, files)
            # external data where the parent had it: the writer streams into it, one weight at a time
            written = weight_only_nbits(src, dst, config, external=external)
            counts[dst.stem], gathers[dst.stem] = (
                written["MatMulNBits"],
                written.get("GatherBlockQuantized", 0),
            )
            fused[dst.stem] = fuse_for_ort(dst, external=external, decode_step=dst.stem == DECODER)

        derived = rewrite_components(ctx, write)
        if not any(counts.values()):
            raise UsageError(
                f"{self.precision} found no MatMul with a constant weight in this artifact: nothing to "
                "quantize. Use --precision fp16 or int8-dynamic."
            )
        derived.details.update(details)
        derived.files.extend(files)
        derived.fused_ops.update(fused)
        derived.details.update(
            {
                "block_size": config.block_size,
                "bits": config.weight_bits,
                "accuracy_level": config.accuracy_level,
                "matmul_nbits": counts,
            }
        )
        if config.quantize_embeddings:
            derived.details["gather_block_quantized"] = gathers
        return derived

    def _search(
        self,
        ctx: DeriveContext,
        config: WeightOnlyConfig,
        src: Path,
        scratch_parent: Path,
        details: dict[str, Any],
        files: list[str],
    ) -> WeightOnlyConfig:
        """The block size ``--search`` finds on the calibration set (quantize/search.py); the job's config
        becomes it, so the manifest records the block as a knob."""
        import tempfile

        from vlexport.quantize.calibration import calibration_set
        from vlexport.quantize.search import search_block_size, write_report

        (comp,) = ctx.parent.components.values()
        cal = calibration_set(
            None,
            artifact_dir=ctx.parent_dir,
            manifest=ctx.parent,
            task_spec=ctx.task_spec,
            config=ctx.config,
            input_names=tuple(t.name for t in comp.inputs),
        )
        # scratch inside the staging dir: an interrupted search leaves nothing behind
        with tempfile.TemporaryDirectory(dir=scratch_parent, prefix=".search.") as scratch:
            result = search_block_size(
                src,
                config,
                cal.feeds,
                Path(scratch),
                lambda s, d, c: weight_only_nbits(s, d, c, external=False),
                agreement=ctx.task_spec.agreement,
                progress=ctx.progress,
            )
        files.extend(write_report(result, ctx.out_dir))
        details["search"] = {**result.record(), "files": files}
        details["calibration"] = cal.record("search")
        ctx.job.precision = result.config
        return result.config


register_pass(OnnxWeightOnlyPass(Int8WeightConfig))
register_pass(OnnxWeightOnlyPass(Int4WeightConfig))
