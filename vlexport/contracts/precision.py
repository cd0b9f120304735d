"""One definition per precision: a frozen config carrying every fact about it, and its knobs.

The shape is torchao's (``quantize_(model, Int8WeightOnlyConfig(group_size=32))``): a precision is a small
dataclass whose fields are the scheme's knobs, validated in ``__post_init__``; what every instance of a
precision shares (its name, weight bits, activation dtype, compute kind, how validation judges it, where it
can be built, TensorRT's builder flags) are class attributes. The instance is the parameter: the CLI builds
it once with its knobs (:meth:`PrecisionConfig.with_knobs`), and that object travels through ``ExportJob``,
the passes, validation and the manifest (which records :meth:`~PrecisionConfig.knobs` and reads them back
with :func:`precision_from_record`). A name is resolved (:func:`get_precision`) only where it enters the
program: CLI parsing, suite files, manifest reading. Imports nothing heavy: the CLI lists these without
importing torch (docs/ARCHITECTURE.md, "A new precision").
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from vlexport.cpu import exact_int8_dot
from vlexport.errors import UsageError

if TYPE_CHECKING:
    import torch


class ParentArtifact(Protocol):
    """What a precision's ``check_for`` reads of the artifact it would derive from (a
    ``contracts.manifest.Manifest``): named here, so this module does not import the manifest, which imports
    it."""

    @property
    def task(self) -> str: ...

    @property
    def components(self) -> Mapping[str, object]: ...

    @property
    def generation(self) -> Mapping[str, Any]: ...


_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


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
    """Base of the precision configs; subclasses set the class attributes below and declare knobs as
    fields."""

    name: ClassVar[str]
    # numpy-style name of the artifact's float activations ("float32", "float16", "bfloat16"); int8 schemes
    # quantize weights (and maybe activations inside the graph) but keep float32 at the graph's boundary.
    dtype: ClassVar[str]
    # storage width of a weight element (scales add under 1%): sizes and decode bytes
    weight_bits: ClassVar[int]
    # What the matmuls compute in ("fp32", "fp16", "bf16", "int8"): the GEMM peak a bench row is judged
    # against.
    compute: ClassVar[str]
    tolerance: ClassVar[Tolerance]
    # Where this precision can be produced today: export-backend names (contracts/backends.py) and the bench's
    # torch runners (eager, compile).
    backends: ClassVar[tuple[str, ...]]
    tensorrt_flags: ClassVar[tuple[str, ...]] = ()  # trt.BuilderFlag names to set
    tensorrt_clear_flags: ClassVar[tuple[str, ...]] = ()  # ... and to clear
    description: ClassVar[str] = ""

    @property
    def activation_bytes(self) -> int:
        return _DTYPE_BYTES[self.dtype]

    @property
    def weight_bytes(self) -> float:
        return self.weight_bits / 8

    @property
    def quantizes_weights(self) -> bool:
        """Weights are stored narrower than the activations: a quantization scheme, not a cast."""
        return self.weight_bits < 8 * self.activation_bytes

    @property
    def peak_kind(self) -> str:
        """The GEMM peak (bench/peaks.py) a compute-bound row of this precision is judged against."""
        return f"{self.compute}-gemm"

    @property
    def torch_dtype(self) -> torch.dtype | None:
        """The torch dtype a torch module is cast to for this precision (None: weights are quantized
        instead)."""
        import torch

        return None if self.quantizes_weights else getattr(torch, self.dtype)

    def applies_to(self, backend: str) -> bool:
        return backend in self.backends

    # ---------------------------------------------------------------- knobs
    def knobs(self) -> dict[str, Any]:
        """The knob values as plain JSON data (what the manifest records beside the name)."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {k: str(v) if isinstance(v, Path) else v for k, v in values.items()}

    def with_knobs(self, **given: Any) -> PrecisionConfig:
        """A copy with the knobs the user gave (None: not given); a knob this precision lacks is a UsageError
        naming the precisions that take it (``--block-size`` on fp16 is refused, not ignored)."""
        given = {k: v for k, v in given.items() if v is not None}
        own = {f.name for f in dataclasses.fields(self)}
        for knob in given:
            if knob not in own:
                takers = [
                    c.name for c in PRECISIONS.values() if knob in {f.name for f in dataclasses.fields(c)}
                ]
                raise UsageError(
                    f"--{knob.replace('_', '-')} applies to --precision {' or '.join(takers)}, not "
                    f"{self.name}. Drop the option."
                )
        return dataclasses.replace(self, **given)

    def check_for(self, backend: str, artifact: ParentArtifact | None) -> None:
        """Refuse (UsageError) what this precision cannot build from ``artifact`` (a parent's manifest; None
        when a model is exported) with ``backend``, before any work."""
        return

    def describe_knobs(self) -> str:
        """The knobs that differ from the defaults, for messages ("block_size=128"), or ""."""
        default = type(self)()
        return ", ".join(f"{k}={v}" for k, v in self.knobs().items() if v != default.knobs().get(k))


@dataclass(frozen=True)
class TargetedPrecision(PrecisionConfig):
    """A precision judged by cosine and task agreement, whose users may ask for more than its defaults.

    ``min_cosine`` / ``min_agreement`` (``--min-cosine`` / ``--min-agreement``) replace the class's
    ``tolerance`` on this instance, so validation, the accuracy report, ``vlexport validate`` (the manifest
    records them) and bench parity judge the variant by them. Looser than the default is refused: a variant
    below its precision's thresholds is kept only with ``--accept-degraded``, marked degraded.
    """

    min_cosine: float | None = None
    min_agreement: float | None = None

    def __post_init__(self) -> None:
        default = type(self).tolerance
        for knob, value, floor in (
            ("min_cosine", self.min_cosine, default.min_cosine),
            ("min_agreement", self.min_agreement, default.min_agreement),
        ):
            flag = "--" + knob.replace("_", "-")
            if value is None:
                continue
            if not 0 < value <= 1:
                raise UsageError(f"{flag} must be in (0, 1], got {value}.")
            if floor is not None and value < floor:
                raise UsageError(
                    f"{flag} {value} is looser than {self.name}'s own {floor}: targets may only be stricter. "
                    "To keep a variant below the precision's thresholds, pass --accept-degraded (the "
                    "manifest marks it degraded)."
                )
        if self.min_cosine is not None or self.min_agreement is not None:
            strict = dataclasses.replace(
                default,
                min_cosine=self.min_cosine if self.min_cosine is not None else default.min_cosine,
                min_agreement=self.min_agreement if self.min_agreement is not None else default.min_agreement,
            )
            object.__setattr__(self, "tolerance", strict)  # the instance's targets shadow the class default


def _recipe_knobs(config: Int8DynamicConfig | Int8StaticConfig) -> None:
    """The SmoothQuant / fp32-MatMul / --search / weight-range knobs the two int8 activation schemes share,
    checked; an unset ``reduce_range`` becomes this CPU's (the value travels resolved, so every stage and
    the manifest see the same graph's recipe)."""
    if config.reduce_range is None:
        object.__setattr__(config, "reduce_range", not exact_int8_dot())
    if config.smooth is not None and not 0 < config.smooth < 1:
        raise UsageError(
            f"--smooth must be in (0, 1) (SmoothQuant's alpha; 0.7 is a good start), got {config.smooth}."
        )
    if config.fp32_nodes is not None:  # a manifest or recipe file gives a JSON list
        object.__setattr__(config, "fp32_nodes", tuple(str(n) for n in config.fp32_nodes))
    if config.kept_as not in KEPT_AS:
        raise UsageError(
            f"kept_as takes {' or '.join(KEPT_AS)} (how the MatMuls left out of int8 are kept), got "
            f"{config.kept_as!r}."
        )
    if config.search and (config.smooth is not None or config.fp32_nodes is not None):
        raise UsageError(
            "--search chooses the SmoothQuant strength and the fp32 MatMuls itself; drop --smooth "
            "(or replay a recipe with --recipe FILE, without --search)."
        )


def _path_knob(config: PrecisionConfig, name: str) -> None:
    """A path knob read back from a manifest (a string) becomes a Path again."""
    value = getattr(config, name)
    if value is not None and not isinstance(value, Path):
        object.__setattr__(config, name, Path(value))


# Tolerances. fp32: the exporters reorder float ops (fused matmuls, other reduction orders), so relative
# errors of ~1e-6 are normal; 1e-4 leaves room for deep models without hiding a wrong graph (a wrong mask
# or cache gives errors of 1e-2 or more). fp16 keeps ~3 decimal digits, bf16 ~2: cosines of 0.999 / 0.99
# over whole outputs. int8 dynamic quantization of activations and weights loses more: 0.98, with task
# agreement on top; weight-only int8 keeps activations in float and loses less.
@dataclass(frozen=True)
class Fp32Config(PrecisionConfig):
    name: ClassVar[str] = "fp32"
    dtype: ClassVar[str] = "float32"
    weight_bits: ClassVar[int] = 32
    compute: ClassVar[str] = "fp32"
    tolerance: ClassVar[Tolerance] = Tolerance(atol=1e-4, rtol=1e-4)
    backends: ClassVar[tuple[str, ...]] = ("eager", "compile", "onnx", "onnx-opt", "aoti", "tensorrt")
    # TF32 is on by default in TensorRT; its 10-bit mantissa misses fp32 tolerances.
    tensorrt_clear_flags: ClassVar[tuple[str, ...]] = ("TF32",)
    description: ClassVar[str] = "reference precision: values within 1e-4 of eager"


@dataclass(frozen=True)
class Fp16Config(TargetedPrecision):
    name: ClassVar[str] = "fp16"
    dtype: ClassVar[str] = "float16"
    weight_bits: ClassVar[int] = 16
    compute: ClassVar[str] = "fp16"
    tolerance: ClassVar[Tolerance] = Tolerance(min_cosine=0.999, min_agreement=0.99)
    # onnx: quantize/onnx_fp16.py; aoti: export/aoti.py casts the modules (I/O stays fp32)
    backends: ClassVar[tuple[str, ...]] = ("eager", "compile", "onnx", "aoti", "tensorrt")
    tensorrt_flags: ClassVar[tuple[str, ...]] = ("FP16",)
    description: ClassVar[str] = "half precision weights and activations"


@dataclass(frozen=True)
class Bf16Config(TargetedPrecision):
    name: ClassVar[str] = "bf16"
    dtype: ClassVar[str] = "bfloat16"
    weight_bits: ClassVar[int] = 16
    compute: ClassVar[str] = "bf16"
    tolerance: ClassVar[Tolerance] = Tolerance(min_cosine=0.99, min_agreement=0.95)
    # aoti: export/aoti.py casts the modules
    backends: ClassVar[tuple[str, ...]] = (
        "eager",
        "compile",
        "aoti",
    )
    description: ClassVar[str] = "bfloat16 weights and activations (fp32's range, 8-bit mantissa)"


ACTIVATION_SCALES = ("per-tensor", "per-token")  # Int8DynamicConfig.activations, cheapest first
# How the int8 activation schemes keep the MatMuls they leave out (``fp32_nodes``): in fp32, or as 8-bit
# weight-only MatMulNBits, whose int8 kernel quantizes activations per row and block (so an outlier row or
# channel costs only its own block's precision). Real MiniLM: --search keeps 5 MatMuls fp32 or 8 as
# int8-weight (block 128), and times the second faster (README.md, "Accuracy targets and recipe search").
KEPT_AS = ("fp32", "int8-weight")


@dataclass(frozen=True)
class Int8DynamicConfig(TargetedPrecision):
    """int8 weights, activations quantized at run time per tensor (ONNX Runtime dynamic quantization) or per
    token (quantize/onnx_per_token.py)."""

    per_channel: bool = True  # one weight scale per output channel: outlier channels keep their own range
    # SmoothQuant strength (quantize/smoothing.py), None: off. With it, the FFN output MatMuls stay fp32: on
    # real BERT weights plain int8-dynamic keeps a mean embedding cosine of 0.993, this 0.999 (README,
    # Precisions).
    smooth: float | None = None
    # 7-bit weights: x86 CPUs without VNNI (AVX2, AVX-512F) multiply u8 x s8 pairs into saturating int16
    # (vpmaddubsw), which 8-bit weights overflow; measured on an AVX2 EPYC, tiny BridgeTower ITM logits fell
    # to cosine 0.974 with 8 bits and kept 0.9996 with 7. None: the building machine's CPU decides (cpu.py:
    # 8 bits where VNNI / AMX / ARM multiply exactly), and the manifest records the choice; loading 8-bit
    # weights on a saturating CPU is refused (runtime.load_artifact), since its outputs would be wrong.
    reduce_range: bool | None = None
    # the activation scale: "per-tensor" (ONNX Runtime's DynamicQuantizeLinear: one per call) or "per-token"
    # (one per row, quantize/onnx_per_token.py: real MiniLM mean cosine 0.9920 -> 0.9973, for ~0.15x of fp32's
    # time). --search tries per-tensor first, then per-token.
    activations: str = "per-tensor"
    # --smooth's (and --search's) calibration set: a directory of images (and .txt prompts); None: a seeded
    # synthetic set
    calibration: Path | None = None
    # MatMul node names left out of int8 (ONNX Runtime's nodes_to_exclude); None: the default rule (with
    # --smooth, the GELU-fed MatMuls; else none). A recipe found by --search names them (quantize/search.py).
    fp32_nodes: tuple[str, ...] | None = None
    kept_as: str = "fp32"  # how fp32_nodes are kept: fp32, or int8-weight (KEPT_AS)
    # --search: when the plain scheme misses the targets, search SmoothQuant strength and fp32 nodes on the
    # calibration set; the pass replaces this knob by the recipe it found (search=False, smooth, fp32_nodes,
    # kept_as).
    search: bool = False
    name: ClassVar[str] = "int8-dynamic"
    dtype: ClassVar[str] = "float32"
    weight_bits: ClassVar[int] = 8
    compute: ClassVar[str] = "int8"  # activations quantized per call: int8 GEMMs
    tolerance: ClassVar[Tolerance] = Tolerance(min_cosine=0.98, min_agreement=0.9)
    backends: ClassVar[tuple[str, ...]] = ("onnx",)  # quantize/onnx_dynamic.py
    description: ClassVar[str] = "int8 weights, activations quantized per call (CPU)"

    def __post_init__(self) -> None:
        super().__post_init__()
        _path_knob(self, "calibration")
        if self.calibration is not None and self.smooth is None and not self.search:
            raise UsageError(
                "--calibration applies to --precision int8-static (calibrated activations) or "
                "int8-dynamic --smooth / --search, not plain int8-dynamic. Drop the option or add --smooth."
            )
        if self.activations not in ACTIVATION_SCALES:
            raise UsageError(
                f"--activations takes {' or '.join(ACTIVATION_SCALES)} (one activation scale per call, or "
                f"one per token), got {self.activations!r}."
            )
        _recipe_knobs(self)

    def check_for(self, backend: str, artifact: ParentArtifact | None) -> None:
        if (
            (self.smooth is not None or self.search)
            and artifact is not None
            and len(artifact.components) != 1
        ):
            raise UsageError(
                f"--{'search' if self.search else 'smooth'} calibrates encoder artifacts (one component); "
                "for generative artifacts use --precision int8-weight."
            )


CALIBRATION_METHODS = ("minmax", "entropy", "percentile")


@dataclass(frozen=True)
class Int8StaticConfig(TargetedPrecision):
    """int8 weights and activations with scales calibrated ahead of time (QDQ graphs, TensorRT int8)."""

    method: str = "minmax"
    reduce_range: bool | None = None  # 7-bit weights; None: this CPU decides, as Int8DynamicConfig says
    calibration: Path | None = None  # a directory of images (and .txt prompts); None: a seeded synthetic set
    # SmoothQuant strength before calibration, MatMuls kept fp32 and --search: as Int8DynamicConfig's (the
    # recipe of quantize/search.py, calibrated here instead of quantized per call)
    smooth: float | None = None
    fp32_nodes: tuple[str, ...] | None = None
    kept_as: str = "fp32"
    search: bool = False
    name: ClassVar[str] = "int8-static"
    dtype: ClassVar[str] = "float32"
    weight_bits: ClassVar[int] = 8
    compute: ClassVar[str] = "int8"
    tolerance: ClassVar[Tolerance] = Tolerance(min_cosine=0.98, min_agreement=0.9)
    backends: ClassVar[tuple[str, ...]] = ("onnx", "tensorrt")  # onnx: quantize/onnx_static.py (QDQ)
    # int8 layers that TensorRT cannot run in int8 fall back to fp16, not fp32.
    tensorrt_flags: ClassVar[tuple[str, ...]] = ("FP16", "INT8")
    description: ClassVar[str] = "int8 weights and activations, calibrated scales"

    def __post_init__(self) -> None:
        super().__post_init__()
        _path_knob(self, "calibration")
        if self.method not in CALIBRATION_METHODS:
            raise UsageError(
                f"Unknown calibration method {self.method!r}: choose {', '.join(CALIBRATION_METHODS)}."
            )
        _recipe_knobs(self)

    def check_for(self, backend: str, artifact: ParentArtifact | None) -> None:
        if backend != "onnx" and (self.search or self.smooth is not None or self.fp32_nodes is not None):
            raise UsageError(
                f"--search / --smooth / fp32 MatMuls shape ONNX int8-static graphs; {backend} builds its own "
                "int8 from calibration. Drop them, or quantize the onnx artifact."
            )
        # A decoder step's calibration would need the cache of real generations.
        if (
            artifact is not None
            and (len(artifact.components) != 1 or artifact.generation)
            and backend == "onnx"
        ):
            raise UsageError(
                f"int8-static calibrates encoder artifacts (one component); this is a "
                f"{'generative ' if artifact.generation else ''}{artifact.task} artifact "
                f"({', '.join(artifact.components)}). Use --precision int8-weight (weights only, any "
                "component) or int8-dynamic."
            )


@dataclass(frozen=True)
class WeightOnlyConfig(TargetedPrecision):
    """The knobs of ONNX Runtime's ``MatMulNBits`` weight-only schemes (int8-weight, int4-weight; not
    registered itself): ``weight_bits``-wide weights in blocks along the input dim, activations never stored
    quantized."""

    block_size: int = 32  # weights sharing one scale along the input dim (MatMulNBits' block_size)
    # MatMulNBits' compute type on CPU: 0 / 1 = fp32, 2 = fp16, 3 = bf16, 4 = int8 (activations quantized
    # per block inside the kernel, per call); which one runs fast: benchmarks/matmulnbits_micro.py
    accuracy_level: int = 4
    symmetric: bool = False  # a zero point per block: every level is used for skewed blocks
    # Embedding tables (constant Gathers) as GatherBlockQuantized at the same width and blocks, a tied lm_head
    # sharing the table's bytes (quantize/matmul_nbits.py). Off by default: the token table is a tenth of
    # BLIP-2 OPT's weights and the lookups cost no compute, so it only saves bytes
    quantize_embeddings: bool = False
    # --search: when the default block misses the targets, try blocks from the cheapest (128) down
    # (quantize/search.py BLOCK_GRID); the pass replaces this knob by the block it found (search=False)
    search: bool = False
    dtype: ClassVar[str] = "float32"
    compute: ClassVar[str] = (
        "fp32"  # judged against its activation dtype's GEMM, as before int8 compute on CPU
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 16 <= self.block_size <= 256 or self.block_size & (self.block_size - 1):
            # ONNX Runtime's MatMulNBits kernels take 16..256: a larger block failed at load with its own
            # error
            raise UsageError(
                f"block_size must be a power of two from 16 to 256 (what ONNX Runtime's MatMulNBits "
                f"runs), got {self.block_size}."
            )
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise UsageError(f"accuracy_level must be 0..4 (MatMulNBits), got {self.accuracy_level}.")

    def check_for(self, backend: str, artifact: ParentArtifact | None) -> None:
        if self.search and backend != "onnx":
            raise UsageError(
                f"--search scores MatMulNBits block sizes with ONNX Runtime; {backend} {self.name} takes "
                "--block-size N (16..256) instead."
            )
        if self.search and artifact is not None and len(artifact.components) != 1 and not artifact.generation:
            raise UsageError(
                "--search scores block sizes on a calibration set of one-component encoder artifacts (or by "
                f"generating, for generative ones); {artifact.task} has {len(artifact.components)} "
                "components: give --block-size N (32 keeps the most accuracy)."
            )


@dataclass(frozen=True)
class Int8WeightConfig(WeightOnlyConfig):
    """Int8 weights (activations are never stored quantized): the decode-bandwidth lever for language models.

    On CPU the 8-bit MatMulNBits kernel computes in int8 (``accuracy_level`` 4), quantizing activations
    per ``block_size`` block inside the kernel; it is the only fast x86 path (quantize/matmul_nbits.py).
    Block 32 keeps real all-MiniLM-L6-v2 embeddings at cosine >= 0.998 (min 0.99847); 128 gives min 0.99390
    (benchmarks/results/real-minilm-precision.json) for a ~10% smaller, faster file.
    """

    name: ClassVar[str] = "int8-weight"
    weight_bits: ClassVar[int] = 8
    tolerance: ClassVar[Tolerance] = Tolerance(min_cosine=0.99, min_agreement=0.95)
    # onnx: quantize/onnx_weight_only.py; aoti: torchao Int8WeightOnlyConfig (per channel), export/aoti.py
    backends: ClassVar[tuple[str, ...]] = ("onnx", "aoti")
    description: ClassVar[str] = "int8 weights (MatMulNBits; int8 compute on CPU); embeddings fp32 by default"


@dataclass(frozen=True)
class Int4WeightConfig(WeightOnlyConfig):
    """Int4 weights (uint4 blocks with a scale and a 4-bit zero point each): half int8-weight's bytes per
    decode step. ONNX Runtime's 4-bit MatMulNBits is fast on x86 at accuracy level 4 (int8 compute), at one
    row and at several (benchmarks/results/matmulnbits-micro.json); the accuracy cost is measured on real
    weights in benchmarks/results/real-minilm-precision.json.
    """

    name: ClassVar[str] = "int4-weight"
    weight_bits: ClassVar[int] = 4
    # 16 levels per block instead of 256: one random 2560 x 10240 weight keeps a product cosine of 0.9967 at
    # block 32 (0.99998 at 8 bits), and the error compounds over layers: tiny random presets end at output /
    # per-step logit cosines of 0.958 (blip2-flan-t5) to 0.992 (blip caption). A wrong graph (packing, zero
    # points, transposes) gives cosines far below 0.9; task agreement as int8-dynamic's.
    tolerance: ClassVar[Tolerance] = Tolerance(min_cosine=0.95, min_agreement=0.9)
    # onnx: quantize/onnx_weight_only.py; aoti: torchao int4 weight-only linears (CPU packing), export/aoti.py
    backends: ClassVar[tuple[str, ...]] = ("onnx", "aoti")
    description: ClassVar[str] = "int4 weights (MatMulNBits; int8 compute on CPU); embeddings fp32 by default"

    def check_for(self, backend: str, artifact: ParentArtifact | None) -> None:
        super().check_for(backend, artifact)
        if backend == "aoti" and self.block_size < 32:  # torchao's int4 groups are 32..256
            raise UsageError(
                f"block_size {self.block_size}: compiled int4 packages (torchao) take 32 to 256; give 32 "
                "or more."
            )


# The registry: every precision by name, with its default knobs.
PRECISIONS: dict[str, PrecisionConfig] = {
    c.name: c
    for c in (
        Fp32Config(),
        Fp16Config(),
        Bf16Config(),
        Int8DynamicConfig(),
        Int8StaticConfig(),
        Int8WeightConfig(),
        Int4WeightConfig(),
    )
}
# Names users type that mean a registered precision (TensorRT's CLI said "int8" for calibrated int8).
ALIASES = {"int8": "int8-static"}


def get_precision(name: str) -> PrecisionConfig:
    """The config of a precision name as a user or a file spells it, with default knobs (names enter here)."""
    config = PRECISIONS.get(ALIASES.get(name, name))
    if config is None:
        raise UsageError(f"Unknown precision {name!r}: choose from {', '.join(PRECISIONS)}.")
    return config


def precision_from_record(name: str, knobs: Mapping[str, Any] | None) -> PrecisionConfig:
    """The config a manifest recorded (name + knobs); knobs it no longer has are dropped (older manifests)."""
    config = get_precision(name)
    own = {f.name for f in dataclasses.fields(config)}
    return dataclasses.replace(config, **{k: v for k, v in (knobs or {}).items() if k in own})


def precision_from_recipe(path: Path) -> PrecisionConfig:
    """The config a recipe file names: ``{"precision": NAME, "knobs": {...}}`` (what ``--search`` writes as
    ``search/recipe.json``), or a variant's ``manifest.json`` (its ``precision`` and ``precision_knobs``)."""
    from vlexport.userdata import kind_of, read_json

    advice = (
        "Pass the search/recipe.json of an artifact built with --search (or its manifest.json), or a file "
        '{"precision": "int8-dynamic", "knobs": {"smooth": 0.7, "fp32_nodes": [...]}}.'
    )
    doc = read_json(path, advice=advice, error=UsageError)
    knobs = doc.get("knobs", doc.get("precision_knobs")) if isinstance(doc, dict) else None
    if not isinstance(doc, dict) or not isinstance(doc.get("precision"), str) or not isinstance(knobs, dict):
        raise UsageError(f"{path} is {kind_of(doc)} without a precision name and its knobs. {advice}")
    config = get_precision(doc["precision"])
    own = {f.name for f in dataclasses.fields(config)}
    unknown = sorted(set(knobs) - own)
    if unknown:
        raise UsageError(f"{path}: {config.name} has no knob(s) {', '.join(unknown)}. {advice}")
    try:
        return dataclasses.replace(config, **knobs)
    except (TypeError, ValueError) as e:
        raise UsageError(f"{path}: its knobs do not fit {config.name} ({e}). {advice}") from None


def loosest(configs: Iterable[PrecisionConfig]) -> PrecisionConfig:
    """The config whose tolerance accepts the most error (the one that judges an artifact mixing them):
    value-exact ones are the strictest, then the higher minimum cosine, then the higher agreement."""

    def strictness(c: PrecisionConfig) -> tuple[float, float, float]:
        t = c.tolerance
        exact = 1.0 if t.exact_tokens else 0.0
        return (exact, t.min_cosine or 1.0, t.min_agreement or 1.0)

    return min(configs, key=strictness)


def per_component(
    given: Mapping[str, str | PrecisionConfig],
    components: Sequence[str],
    default: str | None,
    knobs: Mapping[str, Any],
) -> dict[str, PrecisionConfig]:
    """Every component's config for ``quantize --components``: the ``given`` ones, the others at ``default``
    (None: fp32, unchanged); each name's config takes the ``knobs`` it has (None values: not given), and a
    knob no config takes is refused as :meth:`PrecisionConfig.with_knobs` refuses it."""
    unknown = sorted(set(given) - set(components))
    if unknown:
        raise UsageError(
            f"--components names {', '.join(unknown)}, which this artifact does not have; its components: "
            f"{', '.join(components)}."
        )
    knobs = {k: v for k, v in knobs.items() if v is not None}

    def config(name: str) -> PrecisionConfig:
        c = given.get(name, default or "fp32")
        return c if isinstance(c, PrecisionConfig) else get_precision(c)

    configs = {name: config(name) for name in components}
    own = {name: {f.name for f in dataclasses.fields(c)} for name, c in configs.items()}
    if set(knobs) - set().union(*own.values()):  # the config's own message names the precisions taking it
        next(iter(configs.values())).with_knobs(**knobs)
    mapping = {
        name: c.with_knobs(**{k: v for k, v in knobs.items() if k in own[name]})
        for name, c in configs.items()
    }
    if all(c.name == "fp32" for c in mapping.values()):
        raise UsageError(
            "--components leaves every component fp32: name a reduced precision for one of them."
        )
    return mapping


def precisions_for_backend(backend: str) -> tuple[str, ...]:
    return tuple(name for name, c in PRECISIONS.items() if c.applies_to(backend))


def precision_names(*, aliases: bool = False) -> tuple[str, ...]:
    """Every registered name (and the aliases users may type), for CLI choices."""
    return (*PRECISIONS, *ALIASES) if aliases else tuple(PRECISIONS)


def register_precision(config: PrecisionConfig) -> PrecisionConfig:
    """Add ``config`` (default knobs) under its name; tests register throwaway precisions the same way."""
    PRECISIONS[config.name] = config
    return config


def unregister_precision(name: str) -> None:
    PRECISIONS.pop(name, None)
