"""One definition per precision: a frozen config carrying its dtype, tolerance row and the backends it applies to.

The shape is torchao's (``Int8WeightOnlyConfig(group_size=...)``): a precision is a small dataclass whose
fields are the scheme's knobs, validated in ``__post_init__``; what every instance of a precision shares
(its name, the dtype of its float tensors, how validation judges it, where it can be built) are class
attributes. Validation's tolerance table, the benchmark's dtypes and TensorRT's builder flags are all
read from here (docs/ARCHITECTURE.md, "a new precision"). Imports nothing heavy: the CLI lists these
without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from vlexport.errors import UsageError


@dataclass(frozen=True)
class Tolerance:
    """How an artifact of a precision is judged against eager fp32.

    fp32 compares values elementwise; reduced precisions compare direction (cosine) and task results.
    """

    atol: float | None = None  # elementwise |a - b| <= atol + rtol * |b|
    rtol: float | None = None
    min_cosine: float | None = None  # per-output cosine similarity of the flattened tensors
    min_agreement: float | None = None  # share of rows (or generated samples) whose task-level result agrees

    @property
    def exact_tokens(self) -> bool:
        """Generation must equal HF generate() token for token (value-exact precisions)."""
        return self.atol is not None

    def as_dict(self) -> dict[str, float]:
        return {k: v for k, v in vars(self).items() if v is not None}


@dataclass(frozen=True)
class PrecisionConfig:
    """Base of the precision configs; subclasses set the class attributes below."""

    name: ClassVar[str]
    # numpy-style name of the artifact's float activations ("float32", "float16", "bfloat16"); int8 schemes
    # quantize weights (and maybe activations inside the graph) but keep float32 at the graph's boundary.
    dtype: ClassVar[str]
    tolerance: ClassVar[Tolerance]
    # Where this precision can be produced today: export-backend names (export/backend.py) and the bench's
    # torch runners (eager, compile).
    backends: ClassVar[tuple[str, ...]]
    tensorrt_flags: ClassVar[tuple[str, ...]] = ()  # trt.BuilderFlag names to set
    tensorrt_clear_flags: ClassVar[tuple[str, ...]] = ()  # ... and to clear
    description: ClassVar[str] = ""

    @property
    def torch_dtype(self) -> Any:
        """The torch dtype a torch module is cast to for this precision (None: weights are quantized instead)."""
        import torch

        return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}.get(self.dtype) \
            if not self.name.startswith("int8") else None

    def applies_to(self, backend: str) -> bool:
        return backend in self.backends


# Tolerances. fp32: the exporters reorder float ops (fused matmuls, other reduction orders), so relative
# errors of ~1e-6 are normal; 1e-4 leaves room for deep models without hiding a wrong graph (a wrong mask
# or cache gives errors of 1e-2 or more). fp16 keeps ~3 decimal digits, bf16 ~2: cosines of 0.999 / 0.99
# over whole outputs. int8 dynamic quantization of activations and weights loses more: 0.98, with task
# agreement on top; weight-only int8 keeps activations in float and loses less.
@dataclass(frozen=True)
class Fp32Config(PrecisionConfig):
    name: ClassVar[str] = "fp32"
    dtype: ClassVar[str] = "float32"
    tolerance: ClassVar[Tolerance] = Tolerance(atol=1e-4, rtol=1e-4)
    backends: ClassVar[tuple[str, ...]] = ("eager", "compile", "onnx", "onnx-opt", "aoti", "tensorrt")
    # TF32 is on by default in TensorRT; its 10-bit mantissa misses fp32 tolerances.
    tensorrt_clear_flags: ClassVar[tuple[str, ...]] = ("TF32",)
    description: ClassVar[str] = "reference precision: values within 1e-4 of eager"


@dataclass(frozen=True)
class Fp16Config(PrecisionConfig):
    name: ClassVar[str] = "fp16"
    dtype: ClassVar[str] = "float16"
    tolerance: ClassVar[Tolerance] = Tolerance(min_cosine=0.999, min_agreement=0.99)
    # onnx: quantize/onnx_passes.py; aoti: export/compile.py casts the modules (I/O stays fp32)
    backends: ClassVar[tuple[str, ...]] = ("eager", "compile", "onnx", "aoti", "tensorrt")
    tensorrt_flags: ClassVar[tuple[str, ...]] = ("FP16",)
    description: ClassVar[str] = "half precision weights and activations"


@dataclass(frozen=True)
class Bf16Config(PrecisionConfig):
    name: ClassVar[str] = "bf16"
    dtype: ClassVar[str] = "bfloat16"
    tolerance: ClassVar[Tolerance] = Tolerance(min_cosine=0.99, min_agreement=0.95)
    backends: ClassVar[tuple[str, ...]] = ("eager", "compile", "aoti")  # aoti: export/compile.py casts the modules
    description: ClassVar[str] = "bfloat16 weights and activations (fp32's range, 8-bit mantissa)"


@dataclass(frozen=True)
class Int8DynamicConfig(PrecisionConfig):
    """int8 weights, activations quantized at run time per tensor (ONNX Runtime dynamic quantization)."""

    per_channel: bool = True  # one weight scale per output channel: outlier channels keep their own range
    # SmoothQuant strength (quantize/smoothing.py), None: off. With it, the FFN output MatMuls stay fp32: on real
    # BERT weights plain int8-dynamic keeps a mean embedding cosine of 0.993, this 0.999 (README, Precisions).
    smooth: float | None = None
    # 7-bit weights: x86 CPUs without VNNI (AVX2, AVX-512F) multiply u8 x s8 pairs into saturating int16
    # (vpmaddubsw), which 8-bit weights overflow; measured on an AVX2 EPYC, tiny BridgeTower ITM logits fell
    # to cosine 0.974 with 8 bits and kept 0.9996 with 7. The artifact does not know the CPU it will run on.
    reduce_range: bool = True
    name: ClassVar[str] = "int8-dynamic"
    dtype: ClassVar[str] = "float32"
    tolerance: ClassVar[Tolerance] = Tolerance(min_cosine=0.98, min_agreement=0.9)
    backends: ClassVar[tuple[str, ...]] = ("onnx",)  # quantize/onnx_passes.py
    description: ClassVar[str] = "int8 weights, activations quantized per call (CPU)"

    def __post_init__(self) -> None:
        if self.smooth is not None and not 0 < self.smooth < 1:
            raise UsageError(f"--smooth must be in (0, 1) (SmoothQuant's alpha; 0.7 is a good start), got {self.smooth}.")


CALIBRATION_METHODS = ("minmax", "entropy", "percentile")


@dataclass(frozen=True)
class Int8StaticConfig(PrecisionConfig):
    """int8 weights and activations with scales calibrated ahead of time (QDQ graphs, TensorRT int8)."""

    method: str = "minmax"
    reduce_range: bool = True  # 7-bit weights, as Int8DynamicConfig says why
    name: ClassVar[str] = "int8-static"
    dtype: ClassVar[str] = "float32"
    tolerance: ClassVar[Tolerance] = Tolerance(min_cosine=0.98, min_agreement=0.9)
    backends: ClassVar[tuple[str, ...]] = ("onnx", "tensorrt")  # onnx: quantize/onnx_static.py (QDQ)
    # int8 layers that TensorRT cannot run in int8 fall back to fp16, not fp32.
    tensorrt_flags: ClassVar[tuple[str, ...]] = ("FP16", "INT8")
    description: ClassVar[str] = "int8 weights and activations, calibrated scales"

    def __post_init__(self) -> None:
        if self.method not in CALIBRATION_METHODS:
            raise UsageError(f"Unknown calibration method {self.method!r}: choose {', '.join(CALIBRATION_METHODS)}.")


@dataclass(frozen=True)
class Int8WeightConfig(PrecisionConfig):
    """Int8 weights (activations are never stored quantized): the decode-bandwidth lever for language models.

    On CPU the 8-bit MatMulNBits kernel computes in int8 (``accuracy_level`` 4), quantizing activations
    per ``block_size`` block inside the kernel; it is the only fast x86 path (quantize/onnx_weight_only.py).
    Block 32 keeps real all-MiniLM-L6-v2 embeddings at cosine >= 0.998 (min 0.99847); 128 gives min 0.99390
    (benchmarks/results/real-minilm-precision.json) for a ~10% smaller, faster file.
    """

    block_size: int = 32  # weights sharing one scale along the input dim (MatMulNBits' block_size)
    # MatMulNBits' compute type on CPU: 4 = int8 (the only fast 8-bit x86 kernel); 0 = fp32 reference loop
    accuracy_level: int = 4
    symmetric: bool = False  # a zero point per block: the full 256 levels for skewed blocks
    name: ClassVar[str] = "int8-weight"
    dtype: ClassVar[str] = "float32"
    tolerance: ClassVar[Tolerance] = Tolerance(min_cosine=0.99, min_agreement=0.95)
    # onnx: quantize/onnx_weight_only.py; aoti: torchao Int8WeightOnlyConfig (per channel), export/compile.py
    backends: ClassVar[tuple[str, ...]] = ("onnx", "aoti")
    description: ClassVar[str] = "int8 weights (MatMulNBits; int8 compute on CPU), embeddings fp32"

    def __post_init__(self) -> None:
        if not 16 <= self.block_size <= 256 or self.block_size & (self.block_size - 1):
            # ONNX Runtime's MatMulNBits kernels take 16..256: a larger block failed at load with its own error
            raise UsageError(f"block_size must be a power of two from 16 to 256 (what ONNX Runtime's MatMulNBits "
                             f"runs), got {self.block_size}.")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise UsageError(f"accuracy_level must be 0..4 (MatMulNBits), got {self.accuracy_level}.")


@dataclass(frozen=True)
class Int8BnbConfig(PrecisionConfig):
    """bitsandbytes LLM.int8 (``load_in_8bit=True``, as BLIP-2's docs load it on one GPU): the baseline users
    know. Eager only, CUDA only (quantize/bnb.py); int8 matmuls with fp16 outlier columns."""

    threshold: float = 6.0  # LLM.int8's outlier threshold (BitsAndBytesConfig.llm_int8_threshold)
    name: ClassVar[str] = "int8-bnb"
    dtype: ClassVar[str] = "float16"  # the non-quantized modules run in fp16
    tolerance: ClassVar[Tolerance] = Tolerance(min_cosine=0.99, min_agreement=0.95)
    backends: ClassVar[tuple[str, ...]] = ("eager",)
    description: ClassVar[str] = "bitsandbytes LLM.int8 (load_in_8bit), eager on CUDA"

    def __post_init__(self) -> None:
        if not self.threshold > 0:
            raise UsageError(f"threshold must be positive, got {self.threshold}.")


# The registry: every precision by name, with its default knobs.
PRECISIONS: dict[str, PrecisionConfig] = {
    c.name: c for c in (Fp32Config(), Fp16Config(), Bf16Config(), Int8DynamicConfig(), Int8StaticConfig(),
                        Int8WeightConfig(), Int8BnbConfig())
}
# Names users type that mean a registered precision (TensorRT's CLI said "int8" for calibrated int8).
ALIASES = {"int8": "int8-static"}


def get_precision(name: str | PrecisionConfig) -> PrecisionConfig:
    if isinstance(name, PrecisionConfig):
        return name
    config = PRECISIONS.get(ALIASES.get(name, name))
    if config is None:
        raise UsageError(f"Unknown precision {name!r}: choose from {', '.join(PRECISIONS)}.")
    return config


def precisions_for_backend(backend: str) -> tuple[str, ...]:
    return tuple(name for name, c in PRECISIONS.items() if c.applies_to(backend))
