"""HF eager generate() vs vlexport's ONNX Runtime decode loop, on CPU, in one process.

    python benchmarks/generation_cpu.py [--model blip-image-captioning-base] [--artifact DIR] [--new-tokens
        20] [--batch-sizes 1,8] [--iters 3] [--threads N] [--out benchmarks/results/generation_cpu.json]

Random weights (seed 0) for both sides; the artifact is exported once (or reused with --artifact). Every
generation is forced to exactly --new-tokens tokens (min = max new tokens), greedy, from the model's
default caption prompt. Runs alternate eager / ONNX per iteration so machine noise hits both alike; the
first call of each is a warm-up. Per-token latency comes from a stamp when each step's logits are ready
(eager: a logits processor; ONNX: the runtime's on_step hook): step 0 is the prefill (vision encoder +
first decoder step), steps 1.. are decode steps, whose first-vs-last ratio says whether the cost per
step stays flat as the sequence grows. Tokens of both sides must be equal (fp32): a row says so.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from vlexport.contracts.manifest import component_size, library_versions
from vlexport.models.inputs import generator, pixel_values
from vlexport.pipeline import ExportJob, run_export
from vlexport.runtime import load_artifact
from vlexport.runtime.generate import Generator
from vlexport.weights import load_model, resolve


class _Stamps(LogitsProcessor):
    def __init__(self) -> None:
        self.ns: list[int] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.ns.append(time.perf_counter_ns())
        return scores


def _eager(model, pixels: torch.Tensor, n: int) -> tuple[list[int], int, np.ndarray]:
    stamps = _Stamps()
    start = time.perf_counter_ns()
    with torch.no_grad():
        out = model.generate(
            pixel_values=pixels,
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            num_beams=1,
            logits_processor=LogitsProcessorList([stamps]),
        )
    return stamps.ns, start, out[:, -n:].numpy()


def _onnx(gen: Generator, pixels: np.ndarray, n: int) -> tuple[list[int], int, np.ndarray]:
    ns: list[int] = []
    start = time.perf_counter_ns()
    out = gen.generate(
        pixels, max_new_tokens=n, min_new_tokens=n, on_step=lambda i: ns.append(time.perf_counter_ns())
    )
    return ns, start, out.sequences[:, -n:]


def _row(runs: list[tuple[list[int], int, int]]) -> dict:
    """runs: (stamps, start, end) per timed iteration -> end-to-end, prefill, per-step decode statistics."""
    e2e = [(end - start) / 1e9 for _, start, end in runs]
    prefill = [(ns[0] - start) / 1e9 for ns, start, _ in runs]
    steps = np.array([np.diff(ns) / 1e6 for ns, _, _ in runs])  # [iters, new_tokens - 1] ms
    per_step = np.median(steps, axis=0)
    k = max(1, len(per_step) // 4)
    return {
        "e2e_s_median": round(float(np.median(e2e)), 4),
        "e2e_s_all": [round(x, 4) for x in e2e],
        "prefill_s_median": round(float(np.median(prefill)), 4),
        "decode_ms_per_token_median": round(float(np.median(steps)), 3),
        "decode_ms_per_step": [round(float(x), 3) for x in per_step],
        # > 1: later steps cost more than early ones (a cache that is recomputed or copied grows the step)
        "decode_last_over_first_quarter": round(float(per_step[-k:].mean() / per_step[:k].mean()), 3),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="blip-image-captioning-base")
    p.add_argument("--artifact", type=Path, help="reuse this exported artifact (exported here when absent)")
    p.add_argument("--new-tokens", type=int, default=20)
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--threads", type=int, default=min(os.cpu_count() or 1, 16))
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "generation_cpu.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    source = resolve(args.model, random_weights=True, seed=0)
    t0 = time.perf_counter()
    model = load_model(source, "caption")
    load_s = time.perf_counter() - t0
    directory = args.artifact or Path(tempfile.mkdtemp(prefix="vlexport-bench-")) / "caption"
    export = {}
    if not (directory / "manifest.json").is_file():
        job = ExportJob(
            args.model, directory, task="caption", random_weights=True, validate=False, force=True
        )
        t0 = time.perf_counter()
        run_export(job, model=model)
        export = {"export_s": round(time.perf_counter() - t0, 1), "timings": job.timings}
    artifact = load_artifact(directory, device="cpu", threads=args.threads)
    export.setdefault("timings", artifact.manifest.timings)  # a reused artifact: the stages its export took
    export["validation"] = artifact.manifest.validation.get("summary")
    export["size_mb"] = round(
        sum(component_size(directory, c) for c in artifact.manifest.components.values()) / 2**20, 1
    )
    gen = Generator(artifact, config=model.config)

    rows = []
    n = args.new_tokens
    for batch in map(int, args.batch_sizes.split(",")):
        pixels = pixel_values(model.config.vision_config, batch, generator(1000 + batch))
        timed: dict[str, list] = {"eager": [], "onnx": []}
        tokens: dict[str, np.ndarray] = {}
        for it in range(args.iters + 1):  # iteration 0 is the warm-up of both sides
            order = ("eager", "onnx") if it % 2 == 0 else ("onnx", "eager")
            for backend in order:
                if backend == "eager":
                    ns, start, toks = _eager(model, pixels, n)
                else:
                    ns, start, toks = _onnx(gen, pixels.numpy(), n)
                end = time.perf_counter_ns()
                tokens[backend] = toks
                if it > 0:
                    timed[backend].append((ns, start, end))
                print(f"batch {batch} iter {it} {backend}: {(end - start) / 1e9:.2f} s", flush=True)
        eager_row, onnx_row = _row(timed["eager"]), _row(timed["onnx"])
        same = bool(np.array_equal(tokens["eager"], tokens["onnx"]))
        for backend, row in (("eager", eager_row), ("onnx", onnx_row)):
            rows.append(
                {
                    "model": args.model,
                    "task": "caption",
                    "backend": backend,
                    "precision": "fp32",
                    "batch": batch,
                    "new_tokens": n,
                    "image_size": int(artifact.manifest.image_size),
                    "threads": args.threads,
                    "iters": args.iters,
                    "warmup": 1,
                    "tokens_equal_eager": same,
                    **row,
                }
            )
        rows[-1]["speedup_e2e_vs_eager"] = round(eager_row["e2e_s_median"] / onnx_row["e2e_s_median"], 3)
        rows[-1]["speedup_per_token_vs_eager"] = round(
            eager_row["decode_ms_per_token_median"] / onnx_row["decode_ms_per_token_median"], 3
        )
        rows[-1]["speedup_prefill_vs_eager"] = round(
            eager_row["prefill_s_median"] / onnx_row["prefill_s_median"], 3
        )

    result = {
        "suite": "generation_cpu",
        "weights": "random (seed 0)",
        "device": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_s": round(load_s, 1),
        "artifact": {"path": str(directory), **export},
        "versions": library_versions(),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for r in rows:
        extra = "".join(
            f", {k} {r[k]}x" for k in ("speedup_e2e_vs_eager", "speedup_per_token_vs_eager") if k in r
        )
        print(
            f"b{r['batch']} {r['backend']:5s}: e2e {r['e2e_s_median']:.2f} s, prefill "
            f"{r['prefill_s_median']:.2f} s, "
            f"{r['decode_ms_per_token_median']:.1f} ms/token (last/first quarter "
            f"{r['decode_last_over_first_quarter']}){extra}, tokens equal: {r['tokens_equal_eager']}"
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
