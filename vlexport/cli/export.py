"""The export verbs: `onnx`, `compile`, `tensorrt`, `quantize`, `dual-encoder`, with their arguments.

The precision config is built here once, with the knobs the verb's options set (``precision_config``), and
travels in ``ExportJob`` from then on (contracts/precision.py)."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from vlexport.artifact import check_output_dir
from vlexport.cli import options as opts
from vlexport.cli.common import Command, artifact_flags, console, kernel_flags, model_arg, model_flags, out
from vlexport.contracts.precision import (
    ALIASES,
    CALIBRATION_METHODS,
    PRECISIONS,
    PrecisionConfig,
    get_precision,
    loosest,
    per_component,
    precision_from_recipe,
    precisions_for_backend,
)
from vlexport.errors import UsageError


def precision_choices(backend: str, *, aliases: bool = False) -> tuple[str, ...]:
    """What ``--precision`` takes for a backend: the configs that name it (and the aliases of those, for the
    verbs that always took them: TensorRT's ``int8``)."""
    names = precisions_for_backend(backend)
    return (*names, *(alias for alias, name in ALIASES.items() if aliases and name in names))


def precision_config(args: argparse.Namespace) -> PrecisionConfig:
    """The config of ``--precision`` with the knobs the verb's options set (``--block-size`` -> block_size).

    A knob the precision lacks, or a value out of range, is the config's own UsageError
    (contracts/precision.py): refused before anything loads, never silently ignored."""
    knobs = {name for config in PRECISIONS.values() for name in (f.name for f in dataclasses.fields(config))}
    given = {k: v for k, v in vars(args).items() if k in knobs}
    return get_precision(args.precision).with_knobs(**given)


def _onnx_args(p: argparse.ArgumentParser) -> None:
    model_arg(p)
    p.add_argument(
        "--precision",
        default="fp32",
        choices=precision_choices("onnx"),
        help="fp32, or a variant of the fp32 export (as `vlexport quantize` makes it)",
    )
    p.add_argument(
        "--optimize",
        action="store_true",
        help="ONNX Runtime graph optimizations and fusions (backend onnx-opt)",
    )
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default 18)")


def _export(
    args: argparse.Namespace,
    backend: str,
    verb: str,
    precision: PrecisionConfig | None = None,
    *,
    per_component: dict[str, PrecisionConfig] | None = None,
    **options: object,
) -> int:
    from vlexport.display import artifact_summary
    from vlexport.pipeline import ExportJob, run_export

    job = ExportJob(
        args.model,
        args.output,
        backend=backend,
        task=getattr(args, "task", None),
        precision=loosest(per_component.values()) if per_component else (precision or precision_config(args)),
        component_precisions=per_component or {},
        random_weights=getattr(args, "random_weights", False),
        seed=getattr(args, "seed", 0),
        allow_new_weights=getattr(args, "allow_new_weights", ()),
        kernels=getattr(args, "kernels", ()),
        force=args.force,
        validate=not args.no_validate,
        options={k: v for k, v in options.items() if v is not None},
        accept_degraded=getattr(args, "accept_degraded", False),
    )
    with console.status(verb) as status:
        manifest = run_export(job, progress=lambda msg: status.update(msg))
    for line in artifact_summary(job.output, manifest):
        out.print(line)
    if (manifest.derived_from or {}).get("search"):
        for line in _search_lines(str(args.model), job.output, manifest.derived_from["search"]):
            out.print(line, highlight=False)
    return 0


def quantize_config(args: argparse.Namespace) -> PrecisionConfig:
    """``--precision`` with its knobs, or the recipe ``--recipe FILE`` names, with the targets beside."""
    if args.recipe is None:
        if args.precision is None:
            raise UsageError(
                "Name the variant: --precision P, --components COMPONENT=P,..., or --recipe FILE (a searched "
                "recipe to replay)."
            )
        return precision_config(args)
    config = precision_from_recipe(args.recipe)
    if args.precision is not None and get_precision(args.precision).name != config.name:
        raise UsageError(
            f"--recipe {args.recipe} is a {config.name} recipe, not {args.precision}. Drop --precision."
        )
    graph_knobs = (
        "smooth",
        "activations",
        "block_size",
        "method",
        "reduce_range",
        "search",
    )  # the recipe is the graph; these would change it
    given = [k for k in graph_knobs if getattr(args, k, None) not in (None, False)]
    if given:
        raise UsageError(
            "--recipe replays a recipe as it was found; drop "
            + ", ".join("--" + k.replace("_", "-") for k in given)
            + "."
        )
    return config.with_knobs(
        min_cosine=args.min_cosine, min_agreement=args.min_agreement, calibration=args.calibration
    )


def cmd_quantize(args: argparse.Namespace) -> int:
    from vlexport.contracts.manifest import Manifest
    from vlexport.pipeline import check_variant_source

    if args.components:
        if args.recipe is not None:
            raise UsageError(
                "--recipe replays one precision's recipe; it does not combine with --components."
            )
        manifest = Manifest.read(args.model)
        mapping = component_configs(args, list(manifest.components))
        check_variant_source(args.model, manifest, loosest(mapping.values()))
        return _export(args, manifest.backend, "quantizing", per_component=mapping)
    config = quantize_config(args)  # the knobs' rules, before the artifact is read
    manifest = Manifest.read(args.model)
    check_variant_source(args.model, manifest, config)
    return _export(args, manifest.backend, "quantizing", precision=config)


def _search_lines(source: str, output: Path, search: dict) -> list[str]:
    """The recipe ``--search`` chose, and how to replay it."""
    r = search["recipe"]
    if "block_size" in r:  # weight-only: the block is the recipe
        found = f"search: recipe block_size={r['block_size']}; candidates in {output / 'search'}"
    else:
        nodes = r["fp32_nodes"]
        grain = f"{r['activations']} activations, " if "activations" in r else ""
        found = (
            f"search: recipe {grain}smooth={r['smooth']}, {len(nodes)} MatMul(s) kept "
            f"{r.get('kept_as', 'fp32')}"
            + (f" ({', '.join(nodes)})" if nodes else "")
            + f"; sensitivity table and plot in {output / 'search'}"
        )
    return [
        found,
        f"replay: vlexport quantize {source} -o OUT --recipe {output / 'search' / 'recipe.json'}",
    ]


def component_configs(args: argparse.Namespace, components: list[str]) -> dict[str, PrecisionConfig]:
    """``--components decoder=int4-weight,image_encoder=fp32`` parsed, resolved by the contract's
    ``per_component`` with the verb's knob options (unlisted components at ``--precision``, else fp32)."""
    given: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in args.components.split(","))):
        name, sep, precision = (x.strip() for x in item.partition("="))
        if not sep or not name or not precision:
            raise UsageError(
                f"--components takes COMPONENT=PRECISION pairs separated by commas (e.g. "
                f"decoder=int4-weight,image_encoder=fp32), got {item!r}."
            )
        given[name] = precision
    fields = {f.name for config in PRECISIONS.values() for f in dataclasses.fields(config)}
    knobs = {k: v for k, v in vars(args).items() if k in fields}
    return per_component(given, components, args.precision, knobs)


def cmd_onnx(args: argparse.Namespace) -> int:
    return _export(args, "onnx-opt" if args.optimize else "onnx", "exporting", opset=args.opset)


def _compile_args(p: argparse.ArgumentParser) -> None:
    model_arg(p)
    compile_args(p)


def compile_args(p: argparse.ArgumentParser) -> None:
    """`vlexport compile` options after the model argument (defaults: export/aoti.py)."""
    p.add_argument(
        "--precision",
        default="fp32",
        choices=precision_choices("aoti"),
        help="fp16 / bf16: the modules cast (I/O stays fp32); int8-weight / int4-weight: torchao weight-only "
        "linears (needs torchao)",
    )
    p.add_argument(
        "--mode",
        default="default",
        choices=opts.COMPILE_MODES,
        help="torch.compile mode applied to the AOT compile; reduce-overhead: the runtime captures the "
        "static-cache decode step in a CUDA graph per batch size (CUDA packages)",
    )
    p.add_argument(
        "--device", default="cpu", choices=("cpu", "cuda"), help="device the package is compiled for"
    )
    opts.add_ranged(
        p, "--max-length", "generative tasks: static KV-cache slots (prompt + new tokens); default 64"
    )
    opts.add_ranged(
        p, "--max-batch", "generative tasks: decoder rows (batch x beams) the package takes; default 16"
    )
    p.add_argument(
        "--freeze",
        choices=("auto", "yes", "no"),
        help="CPU fp32 decoders: freeze the weights into the package, where Inductor packs them for oneDNN; "
        "auto (default) times oneDNN's and MKL's GEMMs at the decoder's shapes on this machine and keeps "
        "the faster",
    )


def cmd_compile(args: argparse.Namespace) -> int:
    return _export(
        args,
        "aoti",
        "compiling",
        mode=args.mode,
        device=args.device,
        max_length=args.max_length,
        max_batch=args.max_batch,
        freeze=args.freeze,
    )


def _tensorrt_args(p: argparse.ArgumentParser) -> None:
    from vlexport.export import TRT_DEFAULT_SHAPES  # not export.tensorrt: it imports torch

    model_arg(p, artifact=True)
    p.add_argument(
        "--precision",
        default="fp32",
        choices=precision_choices("tensorrt", aliases=True),
        help="engine precision (int8 = int8-static: calibrated, or the scales of a QDQ graph)",
    )
    p.add_argument(
        "--shapes",
        default=TRT_DEFAULT_SHAPES,
        help=f"optimization profile per dynamic axis, AXIS=MIN:OPT:MAX (default {TRT_DEFAULT_SHAPES})",
    )


def cmd_tensorrt(args: argparse.Namespace) -> int:
    return _export(args, "tensorrt", "building TensorRT engines", shapes=args.shapes)


def quantize_args(p: argparse.ArgumentParser) -> None:
    """`vlexport quantize`: the variant and its knobs (contracts/precision.py)."""
    p.add_argument("model", metavar="DIR", help="an fp32 artifact directory (vlexport onnx)")
    p.add_argument(
        "--precision",
        help="the variant (or, with --components, the precision of the components it does not name): fp16 "
        "(range-sensitive ops and I/O stay fp32), int8-dynamic (CPU), int8-weight / "
        "int4-weight (MatMul weights only, language models), int8-static (calibrated QDQ, TensorRT int8); "
        "`vlexport list` shows what each backend builds",
    )
    p.add_argument(
        "--components",
        metavar="COMPONENT=PRECISION,...",
        help="generative artifacts: a precision per component, e.g. decoder=int4-weight,image_encoder=fp32 "
        "(the others at --precision, else fp32); the manifest records the mapping, and the loosest "
        "precision's thresholds judge the whole",
    )
    p.add_argument(
        "--calibration",
        type=Path,
        metavar="DIR",
        help="int8-static, int8-dynamic --smooth / --search: a directory of images (and .txt files of "
        "prompts/captions, one per line); "
        "default: a seeded synthetic set (the manifest says which)",
    )
    p.add_argument(
        "--method",
        choices=CALIBRATION_METHODS,
        help="int8-static: how activation ranges are calibrated (default minmax)",
    )
    p.add_argument(
        "--smooth",
        type=float,
        metavar="ALPHA",
        help="int8-dynamic / int8-static: SmoothQuant activation outliers into the weights (alpha in "
        "(0, 1), e.g. 0.7; "
        "calibrated on --calibration or a synthetic set) and keep the FFN output MatMuls fp32",
    )
    p.add_argument(
        "--activations",
        choices=("per-tensor", "per-token"),
        help="int8-dynamic: one activation scale per call (ONNX Runtime's DynamicQuantizeLinear, default) or "
        "one per token (more accurate where a few tokens have large values; ~0.15x of fp32's time slower)",
    )
    p.add_argument(
        "--reduce-range",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="int8-dynamic / int8-static: 7-bit weights (--reduce-range), which x86 CPUs without VNNI need "
        "(their u8 x s8 multiply saturates 8-bit ones), or 8-bit (--no-reduce-range: VNNI, AMX, ARM). "
        "Default: this machine's CPU decides and the manifest records it; an artifact built here for "
        "another machine names that machine's choice",
    )
    p.add_argument(
        "--block-size",
        type=int,
        metavar="N",
        help="int8-weight / int4-weight: weights sharing one scale (a power of two 16..256; default 32). "
        "128 makes BLIP-2's language model ~10%% smaller and its decode faster, at the cost of accuracy "
        "(README, Precisions)",
    )
    p.add_argument(
        "--min-cosine",
        type=float,
        metavar="X",
        help="accuracy target stricter than the precision's own: every output's cosine vs eager fp32 >= X "
        "(recorded in the manifest; `vlexport validate` re-checks it)",
    )
    p.add_argument(
        "--min-agreement",
        type=float,
        metavar="Y",
        help="accuracy target stricter than the precision's own: task agreement (argmax, retrieval, "
        "tokens) >= Y",
    )
    p.add_argument(
        "--search",
        action="store_true",
        default=None,
        help="int8-dynamic / int8-static: when the plain scheme misses the targets, search SmoothQuant "
        "strength and MatMuls kept fp32 on the calibration set (--calibration or a synthetic set); the "
        "recipe is recorded, its per-MatMul sensitivity table and plot written under OUT/search/. "
        "int8-weight / int4-weight: the largest block size (128, 64, 32, 16) that meets the targets",
    )
    p.add_argument(
        "--recipe",
        type=Path,
        metavar="FILE",
        help="replay a recipe without searching: OUT/search/recipe.json of a --search build (or a variant's "
        "manifest.json); gives the same graph",
    )
    p.add_argument(
        "--quantize-embeddings",
        action="store_true",
        default=None,
        help="int8-weight / int4-weight: embedding tables too (ONNX Runtime GatherBlockQuantized, same bits "
        "and blocks; a tied lm_head shares the quantized table)",
    )
    p.add_argument(
        "--accept-degraded",
        action="store_true",
        help="keep a variant below its accuracy thresholds (exit 0, the manifest marks it degraded)",
    )


def _dual_encoder_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "vision", type=Path, help="vision encoder directory (save_pretrained: ViT, CLIP vision, ...)"
    )
    p.add_argument("text", type=Path, help="text encoder directory (save_pretrained: BERT, RoBERTa, ...)")
    p.add_argument("-o", "--output", type=Path, required=True, help="where to save the combined model")
    opts.add_ranged(p, "--projection-dim", "size of the shared embedding", 512)
    opts.add_ranged(p, "--seed", "seed for the new projection layers", 0)
    p.add_argument("--force", action="store_true", help="replace an existing output directory")


def cmd_dual_encoder(args: argparse.Namespace) -> int:
    from vlexport.compose import compose_dual_encoder

    check_output_dir(args.output, force=args.force)  # before both encoders load, not after
    path = compose_dual_encoder(
        args.vision,
        args.text,
        args.output,
        projection_dim=args.projection_dim,
        seed=args.seed,
        force=args.force,
    )
    out.print(
        f"{path}: VisionTextDualEncoder (new projections, seed {args.seed}); export it with "
        f"`vlexport onnx {path}`"
    )
    return 0


_EXPORT = (model_flags, artifact_flags)
COMMANDS: tuple[Command, ...] = (
    Command(
        "onnx",
        "export to ONNX and validate against eager PyTorch",
        _onnx_args,
        cmd_onnx,
        (*_EXPORT, kernel_flags),
    ),
    Command(
        "compile",
        "AOTInductor package (torch.export + aoti_compile_and_package), validated against eager",
        _compile_args,
        cmd_compile,
        (*_EXPORT, kernel_flags),
    ),
    Command(
        "tensorrt",
        "TensorRT engine(s) from a model or an ONNX artifact, validated against eager",
        _tensorrt_args,
        cmd_tensorrt,
        _EXPORT,
        aliases=("trt",),
    ),
    Command(
        "quantize",
        "an fp16 / int8 variant of an fp32 artifact, validated against eager fp32",
        quantize_args,
        cmd_quantize,
        (artifact_flags,),
    ),
    Command(
        "dual-encoder",
        "combine two local encoders into a VisionTextDualEncoder directory",
        _dual_encoder_args,
        cmd_dual_encoder,
    ),
)
