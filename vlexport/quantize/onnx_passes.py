"""ONNX precision passes: fp16 with onnxconverter-common, int8 dynamic with ONNX Runtime's quantizer.

* **fp16** (``Fp16Config``): weights and activations in half precision, with the range-sensitive ops
  (normalisations, softmax, the reductions and powers inside them, erf) kept in fp32 and the graph's
  inputs and outputs kept fp32 (``keep_io_types``): callers feed and read what they did at fp32.
* **int8-dynamic** (``Int8DynamicConfig``): ``quantize_dynamic`` with int8 weights (per output channel
  by default: outlier channels keep their own scale) and activations quantized per call; the CPU
  deployment path. Graphs carrying our fused com.microsoft nodes (``--kernels``) quantize the same way:
  the MatMuls around them are what the quantizer rewrites.

Both keep external data for graphs above the exporter's threshold (BLIP-2's 2 GiB protobuf limit).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import onnx

from vlexport.export.backend import DeriveContext, Derived
from vlexport.quantize.passes import register_pass
from vlexport.quantize.precision import Fp16Config, Int8DynamicConfig, get_precision

# Ops whose fp16 results leave the fp32 tolerance band by orders of magnitude (variance and exp overflow).
FP16_KEEP_FP32 = ("LayerNormalization", "SkipLayerNormalization", "SimplifiedLayerNormalization", "Softmax",
                  "ReduceMean", "Pow", "Sqrt", "Erf", "Exp", "Log")


def _rewrite(ctx: DeriveContext, write) -> Derived:
    """Apply ``write(src_path, dst_path, external)`` per component and describe the results."""
    from vlexport.export.onnx import describe

    specs = {s.name: s for s in ctx.task_spec.components(ctx.config)}
    components = {}
    for name, comp in ctx.parent.components.items():
        ctx.progress(f"{ctx.job.precision}: {name}")
        src, dst = ctx.parent_dir / comp.file, ctx.out_dir / comp.file
        write(src, dst, comp.external_data is not None)
        components[name] = describe(dst, name, specs[name].dynamic_axes, root=ctx.out_dir)
    return Derived(components)


class OnnxFp16Pass:
    backend = "onnx"
    precision = Fp16Config.name

    def derive(self, ctx: DeriveContext) -> Derived:
        from onnxconverter_common import float16

        def write(src: Path, dst: Path, external: bool) -> None:
            model = onnx.load(str(src))
            half = float16.convert_float_to_float16(model, keep_io_types=True, op_block_list=list(FP16_KEEP_FP32),
                                                    disable_shape_infer=external)
            onnx.save(half, str(dst), save_as_external_data=external, all_tensors_to_one_file=True,
                      location=f"{dst.name}.data")

        return _rewrite(ctx, write)


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """The quantizer logs "consider pre-processing" on the root logger at every call; keep the CLI readable."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


@contextlib.contextmanager
def quantizer_output(out_dir: Path, dst: Path) -> Iterator[Path]:
    """The path an ONNX Runtime quantizer writes to, in a scratch dir inside ``out_dir``.

    The quantizers write intermediate files beside their output; only the result (``dst.name`` and its
    external data) moves into the artifact, and the quantizer's root-logger advice stays quiet.
    """
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".quant.") as scratch, _quiet_root_logger():
        yield Path(scratch) / dst.name
        for f in Path(scratch).iterdir():
            if f.name.startswith(dst.name):
                shutil.move(str(f), out_dir / f.name)


def source_view(src: Path, scratch: Path) -> Path:
    """``src`` seen from ``scratch``: symlinks to the graph and its external data, for a quantizer to read.

    ONNX Runtime's quantizers write a shape-inferred copy (``*-inferred.onnx``) beside the path they are given
    and delete it after: given the source artifact's own path, two quantizes of one artifact race on that file
    and a read-only source cannot be quantized. A source artifact is read, never written.
    """
    view = scratch / "source"
    view.mkdir(exist_ok=True)
    for f in src.parent.iterdir():
        if f.name.startswith(src.name) and not (view / f.name).exists():  # the graph and its ``.data``
            (view / f.name).symlink_to(f.resolve())
    return view / src.name


class OnnxInt8DynamicPass:
    backend = "onnx"
    precision = Int8DynamicConfig.name

    def derive(self, ctx: DeriveContext) -> Derived:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        config = Int8DynamicConfig(smooth=ctx.job.smooth) if getattr(ctx.job, "smooth", None) else \
            get_precision(ctx.job.precision)
        assert isinstance(config, Int8DynamicConfig)
        details: dict = {}

        def write(src: Path, dst: Path, external: bool) -> None:
            with quantizer_output(ctx.out_dir, dst) as out:
                exclude: list[str] = []
                src = source_view(src, out.parent)
                if config.smooth is not None:
                    src, exclude = _smoothed(ctx, src, out.parent, config.smooth, details)
                quantize_dynamic(src, out, per_channel=config.per_channel, weight_type=QuantType.QInt8,
                                 reduce_range=config.reduce_range,
                                 use_external_data_format=external, nodes_to_exclude=exclude)

        derived = _rewrite(ctx, write)
        derived.details.update(details, weight_bits=7 if config.reduce_range else 8)
        return derived


def _smoothed(ctx: DeriveContext, src: Path, scratch: Path, alpha: float, details: dict) -> tuple[Path, list[str]]:
    """SmoothQuant ``src`` on the calibration set (quantize/calibration.py); the GELU-fed MatMuls to keep fp32."""
    from vlexport.errors import UsageError
    from vlexport.quantize.calibration import calibration_set
    from vlexport.quantize.smoothing import after_activation_matmuls, smooth

    if len(ctx.parent.components) != 1:
        raise UsageError("--smooth calibrates encoder artifacts (one component); for generative artifacts use "
                         "--precision int8-weight.")
    (comp,) = ctx.parent.components.values()
    cal = calibration_set(ctx.job.calibration, artifact_dir=ctx.parent_dir, manifest=ctx.parent,
                          task_spec=ctx.task_spec, config=ctx.config, input_names=tuple(t.name for t in comp.inputs))
    model = onnx.load(str(src))
    keep = after_activation_matmuls(model)  # before smoothing puts a Mul between the GELU and its MatMul
    n = smooth(model, cal.feeds, alpha)
    path = scratch / f"smoothed-{src.name}"
    onnx.save(model, str(path))
    details.update(smooth={"alpha": alpha, "activations_smoothed": n, "kept_fp32": keep,
                           "calibration": cal.record("minmax")})
    return path, keep


register_pass(OnnxFp16Pass())
register_pass(OnnxInt8DynamicPass())
