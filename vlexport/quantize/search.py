"""Quantization recipes of the ONNX passes: apply one (``build``), and search one that meets the accuracy
targets (``search``, ``search_block_size``).

A recipe is the knobs that shape the graph. For the int8 activation schemes (int8-dynamic, int8-static): the
SmoothQuant strength (``smooth``, quantize/smoothing.py) and the MatMuls kept fp32 (``fp32_nodes``); a
:class:`Scheme` says how a candidate of either is written (ONNX Runtime's dynamic quantizer here, its static
QDQ quantizer in quantize/onnx_static.py). For the weight-only schemes (int8-weight, int4-weight): the block
size. ``build`` is the one code path the int8-dynamic pass, every search candidate and ``--recipe`` replays
take, so a replayed recipe gives the same graph.

The search scores candidates on the **calibration** feeds (quantize/calibration.py), against the fp32 parent
run by ONNX Runtime on the same feeds (the parent is within 1e-4 of eager): per output, the smallest cosine
over the feeds and the smallest cosine of one row (one input's output, which may use ``ROW_SLACK`` times the
allowance), and for outputs the task judges by argmax, the share of rows whose argmax agrees. The final
choice is judged afterwards by the normal validation on the seeded validation inputs (pipeline), never on
what was searched with. Cheapest first:

1. the plain scheme, then a small SmoothQuant grid (``SMOOTH_GRID``); for int8-dynamic with per-tensor
   activation scales first (ONNX Runtime's, the fastest), then per-token ones (quantize/onnx_per_token.py);
   the first that meets the targets is the recipe, else the best of each activation grain is its base;
2. per-MatMul sensitivity on each base (a costlier grain's only when its base is more accurate than the
   cheaper grains': else it needs as many fp32 MatMuls, each slower): the output error when that MatMul alone
   is quantized
   (constant-weight MatMuls only; one quantizer call and one session per MatMul), written as JSON and a bar
   plot (the chosen recipe's grain);
3. on each base, the k most sensitive MatMuls kept fp32, k = 1, 2, ... up to ``max_fp32`` (a third of them,
   at most ``MAX_FP32``); the first k that meets the targets, pruned (each kept MatMul, the largest first,
   quantized again if the targets still hold) is that grain's recipe; then the same with the MatMuls kept
   as int8-weight (``kept_as``: 8-bit MatMulNBits, activations quantized per row and block inside the
   kernel), k from fp32's up to twice it. None: a ``CheckError`` that names the precision likely to pass
   (int8-weight: activations stay float);
4. when several recipes were found, the fastest here (``p50_ms``, interleaved on the largest calibration
   feed) is the recipe: per-token scales cost nodes, fp32 MatMuls cost int8's speed, int8-weight ones less,
   and which costs more is the machine's and the model's.

Weight-only schemes try ``BLOCK_GRID`` from the largest block (the smallest, fastest file) down; the first
that meets the targets is the recipe.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from vlexport.contracts.precision import (
    ACTIVATION_SCALES,
    KEPT_AS,
    Int8DynamicConfig,
    Int8StaticConfig,
    Int8WeightConfig,
    PrecisionConfig,
    Tolerance,
    WeightOnlyConfig,
)
from vlexport.errors import CheckError
from vlexport.quantize.matmul_nbits import weight_only_nbits
from vlexport.quantize.onnx_per_token import quantize_per_token
from vlexport.quantize.ort_quantizer import quantize_dynamic
from vlexport.quantize.smoothing import (
    activation_ranges,
    after_activation_matmuls,
    constant_weight_matmuls,
    smooth,
)

SMOOTH_GRID = (0.5, 0.7, 0.85)
# A candidate must keep its cosine error within this share of the target's allowance on the calibration feeds:
# validation judges other inputs at other shapes (tiny BridgeTower ITM: a recipe at 0.9990 on calibration
# gave 0.99893 on validation's b4s23).
MARGIN = 0.8
# The worst single row (one input's output: a sentence embedding, an image's features) may lose this many
# times the target's allowance: a mean-like whole-output cosine can hide a few ruined rows (real MiniLM
# per-token smooth 0.5 + 1 fp32 MatMul: whole-output 0.99845 on 320 sentences, worst sentence 0.98545).
ROW_SLACK = 2.5
# Rows shorter than this (a couple of ITM logits) have no direction worth a cosine: agreement judges them
MIN_ROW = 16
MAX_FP32 = 16  # fp32 MatMuls the search may keep at most (each costs int8's speed on its share of the work)
MAX_SENSITIVITY_NODES = 256  # above this the per-MatMul sweep (one quantizer call each) is cut to the largest
# Weight-only blocks tried, cheapest first: fewer scales make a smaller file and a faster MatMulNBits; smaller
# blocks keep outlier rows their own scale (real MiniLM int8-weight: min cosine 0.99390 at 128, 0.99847 at 32)
BLOCK_GRID = (128, 64, 32, 16)
# Knobs a recipe file leaves to the user: targets, where the calibration set is, and whether to search
USER_KNOBS = ("min_cosine", "min_agreement", "calibration", "search")
Progress = Callable[[str], None]
Int8Recipe = Int8DynamicConfig | Int8StaticConfig  # the schemes searched by SmoothQuant + fp32 MatMuls


# ---------------------------------------------------------------- applying a recipe
def smoothed_source(
    src: Path,
    alpha: float | None,
    feeds: Sequence[Mapping[str, np.ndarray]],
    scratch: Path,
    *,
    leave: Sequence[str] | None = None,
    ranges: dict[str, np.ndarray] | None = None,
) -> tuple[Path, list[str], int]:
    """``src`` SmoothQuant-ed at ``alpha`` in ``scratch`` (``src`` itself for None); the GELU-fed MatMuls (the
    default fp32 rule, read before smoothing puts a Mul in between) and the activations smoothed.

    ``leave``: MatMuls left unsmoothed (None: the default rule's), so an activation read by them only needs
    no ``Mul`` (``unsmoothed``). The file is named for what was left, so a scheme's caches beside it
    (int8-static's ranges) never serve another graph."""
    if alpha is None:
        return src, [], 0
    model = onnx.load(str(src))
    keep = after_activation_matmuls(model)
    left = keep if leave is None else list(leave)
    n = smooth(model, list(feeds), alpha, leave=left, ranges=ranges)
    tag = hashlib.sha1("\n".join(sorted(left)).encode()).hexdigest()[:10] if left else "all"
    path = scratch / f"smoothed-{alpha:g}-{tag}-{src.name}"
    onnx.save(model, str(path))
    return path, keep, n


def quantize(
    src: Path,
    dst: Path,
    config: Int8DynamicConfig,
    exclude: Sequence[str],
    external: bool,
    *,
    only: str | None = None,
) -> None:
    """ONNX Runtime's dynamic quantizer with the config's settings (quantize/onnx_dynamic.py), or the
    per-token rewrite (quantize/onnx_per_token.py). ``only``: that node alone quantized (the sensitivity
    sweep)."""
    # the same knobs: one activation scale per token (our rewrite) or per tensor (ONNX Runtime's quantizer)
    write = quantize_per_token if config.activations == "per-token" else quantize_dynamic
    write(
        src,
        dst,
        per_channel=config.per_channel,
        reduce_range=config.reduce_range,
        exclude=exclude,
        only=only,
        external=external,
    )


def build(
    src: Path,
    dst: Path,
    config: Int8DynamicConfig,
    feeds: Callable[[], Sequence[Mapping[str, np.ndarray]]],
    scratch: Path,
    *,
    external: bool = False,
) -> dict[str, Any]:
    """Write ``config``'s recipe of ``src`` to ``dst``; returns what the manifest records of it.

    ``feeds`` is called only when the recipe smooths (the calibration set costs a tokenizer or image reads).
    """
    source, default_keep, n = smoothed_source(
        src,
        config.smooth,
        feeds() if config.smooth else (),
        scratch,
        leave=unsmoothed(config, config.fp32_nodes),
    )
    exclude = list(config.fp32_nodes) if config.fp32_nodes is not None else default_keep
    write_kept(
        lambda s, d, c, e: quantize(s, d, c, e, external), source, dst, config, exclude, external=external
    )
    details: dict[str, Any] = {"fp32_nodes": exclude} if exclude else {}  # plain int8-dynamic: nothing kept
    if exclude and config.kept_as != "fp32":
        details["kept_as"] = config.kept_as
    if config.smooth is not None:
        details["smooth"] = {"alpha": config.smooth, "activations_smoothed": n, "kept_fp32": exclude}
    if config.activations != "per-tensor":
        details["activations"] = config.activations
    return details


Write = Callable[[Path, Path, "Int8Recipe", Sequence[str]], None]  # (src, dst, config, nodes left out)

# The block of the MatMulNBits that keep left-out MatMuls as int8-weight: its int8 kernel quantizes each row's
# activations per block, so smaller blocks are more accurate and slower (real MiniLM, batch 8, 5 FFN-output
# MatMuls kept: 3.2 ms over plain int8 as fp32, 2.5 ms at block 32, 1.7 ms at 128; min cosines within 0.0007)
KEPT_BLOCK = 128


def write_kept(
    write: Write, src: Path, dst: Path, config: Int8Recipe, nodes: Sequence[str], *, external: bool = False
) -> None:
    """``write`` (a scheme's writer) of ``src`` to ``dst`` with ``nodes`` left out of int8, then those nodes
    kept as ``config.kept_as`` says: fp32 as written, or int8-weight (MatMulNBits, block ``KEPT_BLOCK``)."""
    if config.kept_as == "fp32" or not nodes:
        write(src, dst, config, nodes)
        return
    pre = dst.with_name(f"{dst.stem}-int8.onnx")
    try:
        write(src, pre, config, nodes)
        weight_only_nbits(
            pre, dst, Int8WeightConfig(block_size=KEPT_BLOCK), external=external, only=set(nodes)
        )
    finally:
        for p in dst.parent.glob(f"{pre.name}*"):  # the graph and its external data, if any
            p.unlink()


def unsmoothed(config: Int8Recipe, nodes: Sequence[str] | None) -> Sequence[str] | None:
    """The kept MatMuls a recipe leaves unsmoothed: those kept fp32, where smoothing changes nothing but adds
    a ``Mul`` (None: the default rule's). Kept as int8-weight, they stay smoothed: MatMulNBits quantizes
    their activations per block, and smoothing evens those (real MiniLM, 8 MatMuls kept unsmoothed: p50 at
    batch 8 0.637x -> 0.620x fp32, but the calibration set's worst row below the floor, so the search fell
    back to fp32 keeps)."""
    return nodes if config.kept_as == "fp32" else ()


def recipe(config: Int8Recipe, alpha: float | None, nodes: Sequence[str]) -> Int8Recipe:
    """The config of one candidate: search off, the recipe's knobs explicit (int8-dynamic needs calibration
    only to smooth, and its config refuses it without; int8-static always calibrates)."""
    calibrated = isinstance(config, Int8StaticConfig) or alpha is not None
    return dataclasses.replace(
        config,
        search=False,
        smooth=alpha,
        fp32_nodes=tuple(nodes),
        calibration=config.calibration if calibrated else None,
    )


def recipe_knobs(config: PrecisionConfig) -> dict[str, Any]:
    """What a recipe file holds: the graph-shaping knobs (targets and calibration path stay the user's)."""
    knobs = {k: v for k, v in config.knobs().items() if k not in USER_KNOBS}
    if "fp32_nodes" in knobs:
        knobs["fp32_nodes"] = list(knobs["fp32_nodes"] or ())
    return knobs


@dataclass(frozen=True)
class Scheme:
    """How a candidate of an int8 activation scheme is written: ``write(src, dst, config, exclude)`` with the
    ``exclude`` MatMuls kept fp32, and ``only(src, dst, config, node)`` with that node alone quantized."""

    write: Callable[[Path, Path, Int8Recipe, Sequence[str]], None]
    only: Callable[[Path, Path, Int8Recipe, str], None]


def _dynamic_only(src: Path, dst: Path, config: Int8Recipe, node: str) -> None:
    quantize(src, dst, config, (), external=False, only=node)


DYNAMIC = Scheme(
    write=lambda src, dst, config, exclude: quantize(src, dst, config, exclude, external=False),
    only=_dynamic_only,
)


# ---------------------------------------------------------------- scoring on the calibration feeds
@dataclass
class Score:
    cosine: dict[str, float]  # per output: the smallest cosine over the feeds
    row_cosine: dict[str, float]  # per output with rows of >= MIN_ROW values: the smallest row's cosine
    agreement: dict[str, float]  # per argmax-judged output: the share of rows whose argmax agrees
    passed: bool
    used: float  # the largest share of a cosine allowance used (whole output, or a row's ROW_SLACK one)

    @property
    def worst_cosine(self) -> float:
        return min(self.cosine.values())

    def summary(self) -> str:
        rows = f", worst row {min(self.row_cosine.values()):.5f}" if self.row_cosine else ""
        return f"cosine {self.worst_cosine:.5f}{rows}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "cosine": {k: round(v, 6) for k, v in self.cosine.items()},
            "row_cosine": {k: round(v, 6) for k, v in self.row_cosine.items()},
            "agreement": {k: round(v, 4) for k, v in self.agreement.items()},
            "passed": self.passed,
        }


def _session(path: Path) -> Any:
    import onnxruntime as ort

    from vlexport.runtime.onnx_session import session_options

    # graphs take turns (p50_ms): their threads spin only inside a run, never beside the next graph's
    # (spinning on after each run, real MiniLM at batch 8 on 2 cores: every p50 ~2.8x its time alone)
    opts, _ = session_options()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    den = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / den) if den > 0 else float(np.array_equal(a, b))


def _worst_row(a: np.ndarray, b: np.ndarray) -> float:
    """The smallest cosine between matching rows (the leading axis: one input each)."""
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    dots = np.einsum("ij,ij->i", a, b)
    cos = np.where(den > 0, dots / np.where(den > 0, den, 1.0), (a == b).all(axis=1))
    return float(cos.min())


class Scorer:
    """The fp32 parent's outputs on the calibration feeds, and the score of a candidate graph against them."""

    def __init__(
        self,
        reference: Path,
        feeds: Sequence[Mapping[str, np.ndarray]],
        tolerance: Tolerance,
        agreement: Mapping[str, str],
    ):
        self.feeds, self.tolerance, self.agreement = list(feeds), tolerance, agreement
        self.outputs, self.ref = self._run(reference)

    def _run(self, path: Path) -> tuple[list[str], list[list[np.ndarray]]]:
        sess = _session(path)
        names = [o.name for o in sess.get_outputs()]
        accepted = {i.name for i in sess.get_inputs()}
        return names, [sess.run(names, {k: v for k, v in f.items() if k in accepted}) for f in self.feeds]

    def score(self, path: Path) -> Score:
        names, got = self._run(path)
        cos = {n: min(_cosine(g[i], r[i]) for g, r in zip(got, self.ref)) for i, n in enumerate(names)}
        rows = {
            n: min(_worst_row(g[i], r[i]) for g, r in zip(got, self.ref))
            for i, n in enumerate(names)
            if self.ref[0][i].ndim >= 2 and self.ref[0][i][0].size >= MIN_ROW
        }
        agree = {}
        for i, n in enumerate(names):
            if self.agreement.get(n) == "argmax":
                same = [(g[i].argmax(-1) == r[i].argmax(-1)).ravel() for g, r in zip(got, self.ref)]
                agree[n] = float(np.concatenate(same).mean())
        tol = self.tolerance
        if tol.min_cosine is None:
            used = 0.0
        else:  # each error as a share of its allowance; a candidate passes at MARGIN or less
            allow = max(1 - tol.min_cosine, 1e-12)
            used = max(
                [(1 - c) / allow for c in cos.values()]
                + [(1 - c) / (ROW_SLACK * allow) for c in rows.values()]
            )
        passed = used <= MARGIN and (
            tol.min_agreement is None or all(a >= tol.min_agreement for a in agree.values())
        )
        return Score(cos, rows, agree, passed, used)


# ---------------------------------------------------------------- the search
@dataclass
class SearchResult:
    config: PrecisionConfig  # the recipe found (search off)
    candidates: list[dict[str, Any]] = field(default_factory=list)  # every candidate scored, in order
    sensitivity: list[dict[str, Any]] = field(default_factory=list)  # most sensitive first ([] if not run)
    timed: list[dict[str, Any]] = field(default_factory=list)  # recipes that passed, timed when several did

    def record(self) -> dict[str, Any]:
        return {
            "recipe": recipe_knobs(self.config),
            "scored_on": "calibration feeds (fp32 parent's outputs as reference)",
            "candidates": self.candidates,
            "sensitive_matmuls": [r["node"] for r in self.sensitivity[:10]],
            **({"timed": self.timed} if self.timed else {}),
        }


def _grain(config: PrecisionConfig) -> str:
    """The activation scale of an int8 recipe (int8-static's are calibrated per tensor)."""
    return getattr(config, "activations", "per-tensor")


def _label(config: PrecisionConfig, alpha: float | None, nodes: Sequence[str]) -> str:
    return (
        ("per-token " if _grain(config) == "per-token" else "")
        + f"{'plain' if alpha is None else f'smooth {alpha:g}'}"
        + (f" + {len(nodes)} {getattr(config, 'kept_as', 'fp32')}" if nodes else "")
    )


def search(
    src: Path,
    config: Int8Recipe,
    feeds: Sequence[Mapping[str, np.ndarray]],
    scratch: Path,
    *,
    agreement: Mapping[str, str] | None = None,
    progress: Progress = lambda msg: None,
    max_fp32: int | None = None,
    scheme: Scheme = DYNAMIC,
) -> SearchResult:
    """The cheapest recipe of ``config`` whose score on ``feeds`` meets ``config.tolerance`` (module doc)."""
    run = _Run(
        src,
        list(feeds),
        scratch,
        scheme,
        Scorer(src, feeds, config.tolerance, agreement or {}),
        SearchResult(config),
        progress,
    )
    # int8-dynamic: per-tensor scales first (ONNX Runtime's own, the fastest), then per-token
    bases = (
        [dataclasses.replace(config, activations=a) for a in ACTIVATION_SCALES]
        if isinstance(config, Int8DynamicConfig)
        else [config]
    )
    best: dict[str, tuple[float, Int8Recipe, float | None]] = {}  # per activation grain
    for base in bases:
        for alpha in (None, *SMOOTH_GRID):
            progress(f"search: {_label(base, alpha, ())}")
            s = run.scored(base, alpha, ())
            if s.passed:
                run.result.config = recipe(base, alpha, ())
                return run.result
            if _grain(base) not in best or s.used < best[_grain(base)][0]:
                best[_grain(base)] = (s.used, base, alpha)
    limit = max_fp32 if max_fp32 is not None else MAX_FP32
    found, most = run.grain_recipes(list(best.values()), limit, third=max_fp32 is None)
    if found:
        run.result.config, run.result.sensitivity = run.fastest(found)
        return run.result
    tol = config.tolerance
    best_cosine = max(min(c["cosine"].values()) for c in run.result.candidates)
    raise CheckError(
        f"{config.name} --search found no recipe that meets cosine >= {tol.min_cosine}"
        f"{f', agreement >= {tol.min_agreement}' if tol.min_agreement is not None else ''} on the "
        f"calibration set: plain, SmoothQuant {', '.join(f'{a:g}' for a in SMOOTH_GRID)}"
        f"{' (per-tensor and per-token activations)' if len(bases) > 1 else ''}, and up to {most} of the "
        f"most sensitive MatMuls kept fp32 (best cosine {best_cosine:.5f}). "
        "Nothing was written. --precision int8-weight (int8 weights, float activations) is the precision "
        "likely to pass; or lower the target (the precision's defaults are the floor)."
    )


Found = list[tuple[Int8Recipe, list[dict[str, Any]]]]  # recipes that pass, each with its sensitivity table


@dataclass
class _Run:
    """One search: where candidates are written and scored, and what it has recorded."""

    src: Path
    feeds: list[Mapping[str, np.ndarray]]
    scratch: Path
    scheme: Scheme
    scorer: Scorer
    result: SearchResult
    progress: Progress
    sources: dict[float | None, Path] = field(default_factory=dict)  # the whole parent smoothed per alpha
    ranges: dict[str, np.ndarray] | None = None  # the parent's activation ranges: what every smoothing reads

    def base(self, alpha: float | None) -> Path:
        """The parent smoothed at ``alpha`` with no MatMul left out (the sensitivity sweep's source)."""
        if alpha not in self.sources:
            if alpha is not None:
                self.progress(f"search: SmoothQuant {alpha:g} on {len(self.feeds)} calibration feeds")
            self.sources[alpha] = self.smoothed(alpha, ())
        return self.sources[alpha]

    def smoothed(self, alpha: float | None, nodes: Sequence[str]) -> Path:
        if alpha is not None and self.ranges is None:
            model = onnx.load(str(self.src))
            self.ranges = activation_ranges(model, constant_weight_matmuls(model), self.feeds)
        return smoothed_source(self.src, alpha, self.feeds, self.scratch, leave=nodes, ranges=self.ranges)[0]

    @contextlib.contextmanager
    def source(self, alpha: float | None, nodes: Sequence[str]) -> Iterator[Path]:
        """The source of a candidate leaving ``nodes`` unsmoothed: written for it and deleted after (with
        what a scheme cached beside it), since a search tries dozens of sets, each a copy of the model."""
        if alpha is None or not nodes:
            yield self.base(alpha)
            return
        path = self.smoothed(alpha, nodes)
        try:
            yield path
        finally:
            for p in self.scratch.glob(f"{path.stem}.*"):
                p.unlink()

    def scored(self, base: Int8Recipe, alpha: float | None, nodes: Sequence[str]) -> Score:
        work = self.scratch / "candidate.onnx"
        with self.source(alpha, unsmoothed(base, nodes)) as source:
            write_kept(self.scheme.write, source, work, base, nodes)
        s = self.scorer.score(work)
        label = _label(base, alpha, nodes)
        grain = {"activations": _grain(base)} if isinstance(base, Int8DynamicConfig) else {}
        self.result.candidates.append(
            {
                "candidate": label,
                **grain,
                "smooth": alpha,
                "fp32_nodes": list(nodes),
                "kept_as": base.kept_as,
                **s.as_dict(),
            }
        )
        self.progress(f"search: {label}: {s.summary()}")
        return s

    def grain_recipes(
        self, bases: Sequence[tuple[float, Int8Recipe, float | None]], limit: int, *, third: bool
    ) -> tuple[Found, int]:
        """Steps 2 and 3 on each grain's base (its ``used``, config, alpha): the recipes found, and the most
        fp32 MatMuls tried. ``third``: at most a third of the MatMuls, else ``limit``."""
        found: Found = []
        most, floor = 0, math.inf
        for used, base, alpha in bases:
            if used >= floor:  # no more accurate than a cheaper grain's base: more fp32 MatMuls, each slower
                continue
            floor = used
            table = sensitivity(self.base(alpha), base, self.scorer, self.scratch, self.progress, self.scheme)
            ranked = [r["node"] for r in table]
            top = min(max(1, math.ceil(len(ranked) / 3)) if third else limit, limit, len(ranked))
            most = max(most, top)
            start, stop = 1, top
            # fp32 first (the most accurate keep), then int8-weight from as many as fp32 needed up to twice
            # as many: it keeps less accuracy, and costs about half of fp32's time per MatMul (KEPT_BLOCK)
            for kept_as in KEPT_AS:
                keep = dataclasses.replace(base, kept_as=kept_as)
                k = next(
                    (k for k in range(start, stop + 1) if self.scored(keep, alpha, ranked[:k]).passed), 0
                )
                if not k:
                    break
                kept = _pruned(ranked[:k], table, alpha, functools.partial(self.scored, keep))
                found.append((recipe(keep, alpha, kept), table))
                start, stop = k, min(top, 2 * k)
            self.result.sensitivity = self.result.sensitivity or table
        return found, most

    def fastest(self, found: Found) -> tuple[Int8Recipe, list[dict[str, Any]]]:
        """The recipe of ``found`` that runs fastest here. Which wins is the machine's and the model's:
        per-token scales cost a few nodes per MatMul, each fp32 MatMul int8's speed on its share (real
        MiniLM, VNNI: per-token + 2 fp32 vs per-tensor + 5 fp32). Timed on the largest calibration feed."""
        if len(found) == 1:
            return found[0]
        paths = []
        for i, (config, _) in enumerate(found):
            paths.append(self.scratch / f"finalist-{i}.onnx")
            nodes = config.fp32_nodes or ()
            with self.source(config.smooth, unsmoothed(config, nodes)) as source:
                write_kept(self.scheme.write, source, paths[-1], config, nodes)
        feed = max(self.feeds, key=lambda f: sum(v.size for v in f.values()))
        self.progress(f"search: timing the {len(found)} recipes that pass")
        times = p50_ms(paths, feed)
        for (config, _), ms in zip(found, times):
            label = _label(config, config.smooth, config.fp32_nodes or ())
            self.result.timed.append(
                {
                    "candidate": label,
                    "activations": _grain(config),
                    "kept_as": config.kept_as,
                    "p50_ms": round(ms, 3),
                }
            )
            self.progress(f"search: {label}: {ms:.2f} ms")
        return found[times.index(min(times))]


def p50_ms(paths: Sequence[Path], feed: Mapping[str, np.ndarray], seconds: float = 4.0) -> list[float]:
    """Median ms per call of each graph on ``feed``, the graphs taking turns (each round runs every one once,
    so a slower or faster moment of a shared machine falls on all alike); rounds until ``seconds`` pass
    (at least 10)."""
    import time

    sessions = [_session(p) for p in paths]
    runs = []
    for sess in sessions:
        accepted = {i.name for i in sess.get_inputs()}
        runs.append((sess, {k: v for k, v in feed.items() if k in accepted}))
        sess.run(None, runs[-1][1])  # warm-up: arena growth and first-call packing stay out of the times
    times: list[list[float]] = [[] for _ in paths]
    deadline = time.perf_counter() + seconds
    while len(times[0]) < 10 or time.perf_counter() < deadline:
        for (sess, f), ts in zip(runs, times):
            t0 = time.perf_counter()
            sess.run(None, f)
            ts.append((time.perf_counter() - t0) * 1e3)
    return [float(np.median(ts)) for ts in times]


def search_block_size(
    src: Path,
    config: WeightOnlyConfig,
    feeds: Sequence[Mapping[str, np.ndarray]],
    scratch: Path,
    write: Callable[[Path, Path, WeightOnlyConfig], None],
    *,
    agreement: Mapping[str, str] | None = None,
    progress: Progress = lambda msg: None,
) -> SearchResult:
    """The largest block of ``BLOCK_GRID`` whose ``write`` of ``src`` meets ``config.tolerance`` on ``feeds``
    (the cheapest: fewest scales); a ``CheckError`` naming the best cosine when none does."""
    scorer = Scorer(src, feeds, config.tolerance, agreement or {})
    work = scratch / "candidate.onnx"

    def score(candidate: WeightOnlyConfig) -> BlockScore:
        write(src, work, candidate)
        s = scorer.score(work)
        return BlockScore(s.passed, s.as_dict(), s.summary(), s.worst_cosine)

    return search_blocks(config, score, progress=progress)


@dataclass
class BlockScore:
    """One block size's verdict: passed, the figures recorded, a line for progress, the cosine to name."""

    passed: bool
    figures: dict[str, Any]
    summary: str
    worst_cosine: float


def search_blocks(
    config: WeightOnlyConfig,
    score: Callable[[WeightOnlyConfig], BlockScore],
    *,
    on: str = "the calibration set",
    progress: Progress = lambda msg: None,
) -> SearchResult:
    """The largest block of ``BLOCK_GRID`` whose candidate ``score`` passes (the cheapest: fewest scales,
    fastest kernels); a ``CheckError`` naming the best cosine when none does. ``score`` builds and judges
    one candidate: one graph on calibration feeds (``search_block_size``), or a whole generative variant
    generating on seeded prompts (pipeline)."""
    result = SearchResult(config)
    best = -1.0
    for block in BLOCK_GRID:
        candidate = dataclasses.replace(config, search=False, block_size=block)
        s = score(candidate)
        result.candidates.append({"candidate": f"block {block}", "block_size": block, **s.figures})
        progress(f"search: {config.name} block {block}: {s.summary}")
        best = max(best, s.worst_cosine)
        if s.passed:
            result.config = candidate
            return result
    tol = config.tolerance
    better = "int8-weight" if config.weight_bits < 8 else "fp16"
    raise CheckError(
        f"{config.name} --search found no block size that meets cosine >= {tol.min_cosine}"
        f"{f', agreement >= {tol.min_agreement}' if tol.min_agreement is not None else ''} on {on}: "
        f"blocks {', '.join(map(str, BLOCK_GRID))} (best cosine {best:.5f}). Nothing was written. "
        f"--precision {better} is the precision likely to pass; or lower the target (the precision's "
        "defaults are the floor)."
    )


def _pruned(
    kept: list[str],
    table: Sequence[Mapping[str, Any]],
    alpha: float | None,
    scored: Callable[[float | None, Sequence[str]], Score],
) -> list[str]:
    """The fp32 set made cheaper: each kept MatMul, the largest first, is quantized again if the targets still
    hold without it (sensitivity is measured one node at a time; errors of several do not simply add up)."""
    weights = {r["node"]: r["weights"] for r in table}
    for node in sorted(kept[:-1], key=lambda n: -weights[n]):  # the last one added was needed
        trial = [n for n in kept if n != node]
        if scored(alpha, trial).passed:
            kept = trial
    return kept


def sensitivity(
    src: Path,
    config: Int8Recipe,
    scorer: Scorer,
    scratch: Path,
    progress: Progress,
    scheme: Scheme = DYNAMIC,
) -> list[dict[str, Any]]:
    """Per constant-weight MatMul of ``src``: the score when it alone is quantized; most sensitive first."""
    model = onnx.load(str(src), load_external_data=False)
    sizes = {i.name: math.prod(i.dims) for i in model.graph.initializer}
    nodes = [n for group in constant_weight_matmuls(model).values() for n in group]
    nodes = sorted(nodes, key=lambda n: -sizes[n.input[1]])[:MAX_SENSITIVITY_NODES]
    work = scratch / "one.onnx"
    rows = []
    for i, node in enumerate(nodes):
        progress(f"search: sensitivity {i + 1}/{len(nodes)} ({node.name})")
        scheme.only(src, work, config, node.name)
        s = scorer.score(work)
        rows.append(
            {
                "node": node.name,
                "weights": sizes[node.input[1]],
                "cosine": round(s.worst_cosine, 7),
                "row_cosine": round(min(s.row_cosine.values()), 7) if s.row_cosine else None,
                # the share of the allowance used ranks by what fails (whole output or a row)
                "error": s.used if scorer.tolerance.min_cosine is not None else 1 - s.worst_cosine,
                "agreement": {k: round(v, 4) for k, v in s.agreement.items()},
            }
        )
    return sorted(rows, key=lambda r: -r["error"])


def write_report(result: SearchResult, directory: Path) -> list[str]:
    """``search/sensitivity.json``, ``search/sensitivity.png`` and ``search/recipe.json`` in ``directory``;
    returns the files written, relative to it."""
    out = directory / "search"
    out.mkdir(exist_ok=True)
    (out / "recipe.json").write_text(
        json.dumps({"precision": result.config.name, "knobs": recipe_knobs(result.config)}, indent=2) + "\n"
    )
    files = ["search/recipe.json"]
    (out / "search.json").write_text(json.dumps(result.record(), indent=2) + "\n")
    files.append("search/search.json")
    if result.sensitivity:
        (out / "sensitivity.json").write_text(json.dumps(result.sensitivity, indent=2) + "\n")
        _plot(result.sensitivity, out / "sensitivity.png")
        files += ["search/sensitivity.json", "search/sensitivity.png"]
    return files


def _plot(rows: Sequence[Mapping[str, Any]], path: Path, top: int = 40) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = list(rows[:top])
    fig, ax = plt.subplots(figsize=(8, 0.25 * len(shown) + 1.5))
    ax.barh([r["node"] for r in shown][::-1], [max(r["error"], 1e-9) for r in shown][::-1])
    ax.set_xscale("log")
    ax.set_xlabel("share of the cosine allowance used when this MatMul alone is int8 (calibration feeds)")
    ax.set_title(f"int8 sensitivity, most sensitive first ({len(shown)} of {len(rows)} MatMuls)")
    ax.tick_params(axis="y", labelsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
