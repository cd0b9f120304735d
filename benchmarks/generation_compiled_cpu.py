"""Compiled static-cache loop (`vlexport compile`) vs HF eager generate() vs the ONNX Runtime loop, CPU, one
process.

    python benchmarks/generation_compiled_cpu.py [--model blip-image-captioning-base] [--onnx DIR] [--aoti
    DIR] [--new-tokens 20] [--batch-sizes 1,8] [--iters 3] [--threads N] [--max-length 32] [--out
    benchmarks/results/generation_compiled_cpu.json]

Same protocol as generation_cpu.py (whose row statistics it reuses): random weights (seed 0), exactly
--new-tokens greedy tokens from the default caption prompt, the three runners interleaved per iteration
(order rotated) after one warm-up each, per-token stamps from each loop's step hook. Artifacts are built
once (or reused with --onnx / --aoti). Tokens of every runner must equal eager's (fp32): a row says so.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from generation_cpu import _eager, _onnx, _row

from vlexport.contracts.manifest import component_size, library_versions
from vlexport.models.inputs import generator, pixel_values
from vlexport.pipeline import ExportJob, run_export
from vlexport.runtime import load_artifact
from vlexport.runtime.generate import Generator
from vlexport.weights import load_model, resolve


def _build(model, name: str, directory: Path, backend: str, options: dict) -> dict:
    if (directory / "manifest.json").is_file():
        return {"reused": True}
    job = ExportJob(
        name,
        directory,
        task="caption",
        backend=backend,
        random_weights=True,
        validate=False,
        force=True,
        options=options,
    )
    t0 = time.perf_counter()
    run_export(job, model=model)
    return {"build_s": round(time.perf_counter() - t0, 1), "timings": job.timings}


def build_pair(model, args: argparse.Namespace, max_batch: int) -> tuple[dict[str, Path], dict[str, dict]]:
    """The ONNX artifact and the AOTI package of ``model`` (``--onnx`` / ``--aoti`` when given, else in a
    temporary directory): their directories and build records."""
    tmp = Path(tempfile.mkdtemp(prefix="vlexport-bench-"))
    dirs = {"onnx": args.onnx or tmp / "onnx", "aoti": args.aoti or tmp / "aoti"}
    aoti = {"max_length": args.max_length, "max_batch": max_batch}
    builds = {
        "onnx": _build(model, args.model, dirs["onnx"], "onnx", {}),
        "aoti": _build(model, args.model, dirs["aoti"], "aoti", aoti),
    }
    return dirs, builds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="blip-image-captioning-base")
    p.add_argument("--onnx", type=Path)
    p.add_argument("--aoti", type=Path)
    p.add_argument("--new-tokens", type=int, default=20)
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--max-length", type=int, default=32)
    p.add_argument("--threads", type=int, default=min(os.cpu_count() or 1, 16))
    p.add_argument("--note", default="", help="recorded as is, e.g. the machine's load")
    p.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "generation_compiled_cpu.json"
    )
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    source = resolve(args.model, random_weights=True, seed=0)
    model = load_model(source, "caption")
    dirs, builds = build_pair(model, args, max(map(int, args.batch_sizes.split(","))))
    gens = {}
    for backend, directory in dirs.items():
        artifact = load_artifact(directory, device="cpu", threads=args.threads)
        builds[backend]["size_mb"] = round(
            sum(component_size(directory, c) for c in artifact.manifest.components.values()) / 2**20, 1
        )
        gens[backend] = Generator(artifact, config=model.config)

    rows, n, names = [], args.new_tokens, ("eager", "onnx", "aoti")
    for batch in map(int, args.batch_sizes.split(",")):
        pixels = pixel_values(model.config.vision_config, batch, generator(1000 + batch))
        timed: dict[str, list] = {b: [] for b in names}
        tokens: dict[str, np.ndarray] = {}
        for it in range(args.iters + 1):  # iteration 0 warms every runner up
            for backend in names[it % 3 :] + names[: it % 3]:
                if backend == "eager":
                    ns, start, toks = _eager(model, pixels, n)
                else:
                    ns, start, toks = _onnx(gens[backend], pixels.numpy(), n)
                end = time.perf_counter_ns()
                tokens[backend] = toks
                if it > 0:
                    timed[backend].append((ns, start, end))
                print(f"batch {batch} iter {it} {backend}: {(end - start) / 1e9:.2f} s", flush=True)
        stats = {b: _row(timed[b]) for b in names}
        for backend in names:
            row = {
                "model": args.model,
                "task": "caption",
                "backend": backend,
                "precision": "fp32",
                "batch": batch,
                "new_tokens": n,
                "threads": args.threads,
                "iters": args.iters,
                "warmup": 1,
                "tokens_equal_eager": bool(np.array_equal(tokens["eager"], tokens[backend])),
                **stats[backend],
            }
            for ref in ("eager", "onnx"):
                if backend != ref and not (backend == "onnx" and ref == "onnx"):
                    row[f"e2e_speedup_vs_{ref}"] = round(
                        stats[ref]["e2e_s_median"] / stats[backend]["e2e_s_median"], 3
                    )
                    row[f"per_token_speedup_vs_{ref}"] = round(
                        stats[ref]["decode_ms_per_token_median"]
                        / stats[backend]["decode_ms_per_token_median"],
                        3,
                    )
            rows.append(row)

    result = {
        "suite": "generation_compiled_cpu",
        "weights": "random (seed 0)",
        "note": args.note,
        "device": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average_1m_at_end": round(os.getloadavg()[0], 2),
        "max_length": args.max_length,
        "artifacts": builds,
        "versions": library_versions(),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for r in rows:
        extra = "".join(f", {k} {r[k]}x" for k in r if "speedup" in k)
        print(
            f"b{r['batch']} {r['backend']:5s}: e2e {r['e2e_s_median']:.2f} s, prefill "
            f"{r['prefill_s_median']:.2f} s, "
            f"{r['decode_ms_per_token_median']:.1f} ms/token{extra}, tokens equal: {r['tokens_equal_eager']}"
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
