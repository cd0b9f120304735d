"""Full-size generative artifacts at different precisions, side by side on CPU: size, `vlexport run` peak RSS,
decode ms/token, and greedy tokens / logits vs the fp32 artifact.

    python benchmarks/generation_precision_cpu.py fp32=DIR int8-weight=DIR [name=DIR ...] [--new-tokens 20]
        [--batch-sizes 1,4] [--iters 2] [--out benchmarks/results/cpu-blip2-int8-weight.json]

The first artifact is the reference (fp32). Each artifact is measured in its own fresh process, one after the
other, so a 14 GB fp32 decoder and its int8 variant are never in memory together and each peak RSS is its own:
a worker that times greedy decoding forced to --new-tokens tokens on seeded pixels (step 0 is the prefill:
encoders + first decoder step; steps 1.. are decode steps) and keeps the tokens and per-step logits. Agreement
is then computed against the reference's: the share of sequences whose tokens are equal, the mean
first-divergence step, and the per-step logit cosine up to the first divergence (after it the two decode
different prefixes); then `vlexport run DIR --image IMG [--text PROMPT]` exactly as a user runs it (peak RSS
from wait4).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"
PROMPT = "what is in the picture?"  # for tasks that need a text prompt (BLIP-2 Flan-T5)


def _worker(directory: Path, out: Path, new_tokens: int, batches: list[int], iters: int) -> None:
    import resource

    from vlexport.contracts.manifest import Manifest
    from vlexport.runtime import load_artifact
    from vlexport.runtime.generate import Generator

    t0 = time.perf_counter()
    manifest = Manifest.read(directory)
    artifact = load_artifact(directory, manifest=manifest, device="cpu")
    gen = Generator(artifact)
    load_s = time.perf_counter() - t0
    ids = None
    if gen.recipe.needs_prompt:  # BLIP-2 Flan-T5: a question, as `vlexport run --text` sends it
        from vlexport.runtime.generate import prompt_ids
        from vlexport.runtime.tokenizer import ArtifactTokenizer

        ids = prompt_ids(PROMPT, ArtifactTokenizer(directory, manifest), gen.settings, gen.recipe, False)
    size = int(manifest.image_size)
    rows, arrays = [], {}
    for batch in batches:
        pixels = (
            np.random.default_rng(1000 + batch).standard_normal((batch, 3, size, size)).astype(np.float32)
        )
        runs = []
        for it in range(iters + 1):  # iteration 0 warms up
            ns: list[int] = []
            start = time.perf_counter_ns()
            prompt = None if ids is None else np.repeat(ids, batch, axis=0)
            res = gen.generate(
                pixels,
                prompt,
                None if prompt is None else np.ones_like(prompt),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                output_logits=True,
                on_step=lambda i, ns=ns: ns.append(time.perf_counter_ns()),
            )
            if it:
                runs.append((start, ns))
        steps = np.array([np.diff(ns) / 1e6 for _, ns in runs])
        rows.append(
            {
                "batch": batch,
                "prefill_s_median": round(float(np.median([(ns[0] - s) / 1e9 for s, ns in runs])), 3),
                "decode_ms_per_token_median": round(float(np.median(steps)), 2),
                "e2e_s_median": round(float(np.median([(ns[-1] - s) / 1e9 for s, ns in runs])), 3),
            }
        )
        arrays[f"tokens_b{batch}"] = res.sequences[:, res.prompt_length :]
        arrays[f"logits_b{batch}"] = np.stack([np.asarray(x, dtype=np.float32) for x in res.logits], axis=1)
    np.savez(out.with_suffix(".npz"), **arrays)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out.write_text(
        json.dumps(
            {
                "prompt": None if ids is None else PROMPT,
                "load_s": round(load_s, 1),
                "worker_peak_rss_gb": round(peak / 1e9, 2),
                "rows": rows,
            }
        )
    )


def _run_peak_rss(directory: Path, image: Path, new_tokens: int, prompted: bool) -> tuple[float, int, float]:
    """`vlexport run` in a fresh process: (peak RSS GB, exit code, wall s)."""
    text = ["--text", PROMPT] if prompted else []
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [
            shutil.which("vlexport") or "vlexport",
            "run",
            str(directory),
            "--image",
            str(image),
            "--max-new-tokens",
            str(new_tokens),
            *text,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    _, status, usage = os.wait4(proc.pid, 0)
    return (
        round(usage.ru_maxrss * 1024 / 1e9, 2),
        os.waitstatus_to_exitcode(status),
        round(time.perf_counter() - t0, 1),
    )


def _needs_prompt(directory: Path, manifest: object) -> bool:
    """Whether the task generates from a text prompt (BLIP-2 Flan-T5), as the worker's Generator reads it."""
    from vlexport.models import get_family
    from vlexport.runtime.generate import artifact_config

    spec = get_family(manifest.family).task(manifest.task)
    return bool(spec.generation(artifact_config(directory)).needs_prompt)


def _agreement(
    ref_tokens: np.ndarray, ref_logits: np.ndarray, tokens: np.ndarray, logits: np.ndarray
) -> dict:
    same, firsts, cosines = [], [], []
    for r in range(ref_tokens.shape[0]):
        diff = np.flatnonzero(ref_tokens[r] != tokens[r])
        # the divergence step's logits still compare
        upto = int(diff[0]) + 1 if diff.size else ref_tokens.shape[1]
        same.append(not diff.size)
        if diff.size:
            firsts.append(int(diff[0]))
        a, b = ref_logits[r, :upto].astype(np.float64), logits[r, :upto].astype(np.float64)
        cosines += list((a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)))
    return {
        "greedy_token_agreement": round(float(np.mean(same)), 3),
        "mean_first_divergence_step": float(np.mean(firsts)) if firsts else None,
        "min_logit_cosine": round(float(min(cosines)), 6),
        "mean_logit_cosine": round(float(np.mean(cosines)), 6),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("artifacts", nargs="*", metavar="NAME=DIR", help="the first is the reference (fp32)")
    p.add_argument("--new-tokens", type=int, default=20)
    p.add_argument("--batch-sizes", default="1,4")
    p.add_argument("--iters", type=int, default=2)
    p.add_argument("--out", type=Path, default=RESULTS / "cpu-generation-precision.json")
    p.add_argument(
        "--rss-only",
        action="store_true",
        help="only the size and `vlexport run`'s peak RSS of each artifact (no timing, no agreement)",
    )
    p.add_argument("--worker", nargs=2, metavar=("DIR", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    batches = [int(b) for b in args.batch_sizes.split(",")]
    if args.worker:
        _worker(Path(args.worker[0]), Path(args.worker[1]), args.new_tokens, batches, args.iters)
        return 0
    if not args.artifacts:
        p.error("give at least one NAME=DIR")

    from PIL import Image

    from vlexport.contracts.manifest import Manifest, component_size, library_versions

    pairs = [a.split("=", 1) for a in args.artifacts]
    scratch = Path(tempfile.mkdtemp(prefix="vlexport-precision-"))
    image = scratch / "image.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (384, 384, 3), dtype=np.uint8)).save(image)
    results, ref = [], None
    for name, directory in pairs:
        directory = Path(directory)
        manifest = Manifest.read(directory)
        if args.rss_only:
            rss, code, wall = _run_peak_rss(
                directory, image, args.new_tokens, _needs_prompt(directory, manifest)
            )
            size = sum(component_size(directory, c) for c in manifest.components.values()) / 1e9
            entry = {
                "name": name,
                "path": str(directory),
                "precision": manifest.precision,
                "component_precisions": manifest.component_precisions,
                "size_gb": round(size, 3),
                "run_peak_rss_gb": rss,
                "run_exit_code": code,
                "run_wall_s": wall,
            }
            results.append(entry)
            print(json.dumps(entry), flush=True)
            continue
        out = scratch / f"{name}.json"
        subprocess.run(
            [
                sys.executable,
                __file__,
                "--worker",
                str(directory),
                str(out),
                "--new-tokens",
                str(args.new_tokens),
                "--batch-sizes",
                args.batch_sizes,
                "--iters",
                str(args.iters),
            ],
            check=True,
        )
        measured = json.loads(out.read_text())
        rss, code, wall = _run_peak_rss(directory, image, args.new_tokens, measured["prompt"] is not None)
        arrays = dict(np.load(out.with_suffix(".npz")))
        entry = {
            "name": name,
            "source": manifest.source,
            "task": manifest.task,
            "precision": manifest.precision,
            "path": str(directory),
            "size_gb": round(
                sum(component_size(directory, c) for c in manifest.components.values()) / 1e9, 3
            ),
            "run_peak_rss_gb": rss,
            "run_exit_code": code,
            "run_wall_s": wall,
            **measured,
            "accuracy_vs_eager_fp32": manifest.validation.accuracy.generation
            if manifest.validation.accuracy
            else None,
            "derived_from": manifest.derived_from,
        }
        if ref is None:
            ref = (entry, arrays)
        else:
            base, ref_arrays = ref
            entry["size_vs_reference"] = round(entry["size_gb"] / base["size_gb"], 3)
            entry["run_peak_rss_vs_reference"] = round(rss / base["run_peak_rss_gb"], 3)
            for row, base_row in zip(entry["rows"], base["rows"], strict=True):
                b = row["batch"]
                row["ms_per_token_vs_reference"] = round(
                    row["decode_ms_per_token_median"] / base_row["decode_ms_per_token_median"], 3
                )
                row["vs_reference"] = _agreement(
                    ref_arrays[f"tokens_b{b}"],
                    ref_arrays[f"logits_b{b}"],
                    arrays[f"tokens_b{b}"],
                    arrays[f"logits_b{b}"],
                )
        results.append(entry)
        print(
            json.dumps(
                {k: v for k, v in entry.items() if k not in ("derived_from", "accuracy_vs_eager_fp32")}
            ),
            flush=True,
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "suite": "generation_precision_cpu",
                "weights": "random (seed 0)",
                "new_tokens": args.new_tokens,
                "iters": args.iters,
                "warmup": 1,
                "device": platform.processor() or platform.machine(),
                "cpu_count": os.cpu_count(),
                "versions": library_versions(),
                "artifacts": results,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
