"""BLIP-2 OPT-2.7b decode speed on one GPU: compiled static-cache packages vs HF generate(), tokens/s and peak
memory.

    python benchmarks/gpu_generation.py [--model blip2-opt-2.7b] [--new-tokens 64] [--iters 3] [--out FILE]
    [--dry-run]

Rows, all batch 1, exactly --new-tokens greedy tokens, random weights (seed 0; speed does not depend on them):
  hf-fp16 HF generate() on the fp16 model (the issue's 52.7 tokens/s on an H100) hf-llm-int8 HF generate()
  with bitsandbytes LLM.int8 weights, when bitsandbytes imports aoti-fp16 `vlexport compile --precision fp16
  --device cuda --mode reduce-overhead` (CUDA-graph decode step) aoti-int8-weight the same with torchao int8
  weight-only linears, when torchao imports tokens/s counts decode steps only (after the first token: prefill
  excluded); peak memory is torch.cuda.max_memory_allocated over the row's calls. Written to run on a lent GPU
  (benchmarks/gpu_suite.sh); a row whose requirement is absent (CUDA, bitsandbytes, torchao) records why and
  is skipped; a row that fails otherwise records its error, the others go on, and the script exits 1 (a script
  bug is not a skipped row). ``--dry-run`` runs every row on the CPU with the model's tiny twin, a few tokens
  and one iteration (benchmarks/gpu_suite.sh --dry-run, in CI), so a lent GPU's one call is never lost to a
  script bug.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from vlexport.contracts.precision import get_precision
from vlexport.models.inputs import InputShape, generator, pixel_values
from vlexport.pipeline import ExportJob, run_export
from vlexport.runtime import load_artifact
from vlexport.runtime.generate import Generator
from vlexport.weights import load_model, resolve


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class _Stamps(LogitsProcessor):
    def __init__(self) -> None:
        self.ns: list[int] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        _sync()
        self.ns.append(time.perf_counter_ns())
        return scores


def _rate(stamps: list[int]) -> float:
    return (len(stamps) - 1) / ((stamps[-1] - stamps[0]) / 1e9)


def _measure(call, iters: int) -> dict:
    call()  # warm-up (and CUDA-graph capture)
    _sync()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    rates = [_rate(call()) for _ in range(iters)]
    peak = round(torch.cuda.max_memory_allocated() / 1e9, 2) if torch.cuda.is_available() else None
    return {
        "tokens_per_s": round(float(np.median(rates)), 1),
        "tokens_per_s_all": [round(r, 1) for r in rates],
        "peak_memory_gb": peak,
    }


def _hf(model, inputs: dict, n: int):
    def call() -> list[int]:
        stamps = _Stamps()
        with torch.no_grad():
            model.generate(
                **inputs,
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                logits_processor=LogitsProcessorList([stamps]),
            )
        return stamps.ns

    return call


def _compiled(directory: Path, inputs: dict, n: int, device: str):
    gen = Generator(load_artifact(directory, device=device))
    x = {k: v.cpu().numpy() for k, v in inputs.items()}

    def call() -> list[int]:
        ns: list[int] = []
        gen.generate(
            **x, max_new_tokens=n, min_new_tokens=n, on_step=lambda i: ns.append(time.perf_counter_ns())
        )
        return ns

    return call


class _Unavailable(Exception):
    """A row's requirement is absent on this machine: the row is skipped, not failed."""


def _needs(*, cuda: bool = False, modules: tuple[str, ...] = ()) -> None:
    if cuda and not torch.cuda.is_available():
        raise _Unavailable("needs CUDA")
    for name in modules:
        if importlib.util.find_spec(name) is None:
            raise _Unavailable(f"needs {name} (not installed)")


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="blip2-opt-2.7b")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "vlexport-gpu-generation")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/gpu-generation.json"))
    p.add_argument(
        "--dry-run", action="store_true", help="every row on the CPU, tiny twin, 4 tokens, 1 iteration"
    )
    args = p.parse_args()
    if args.dry_run:
        from vlexport.presets import get_preset

        args.model = get_preset(args.model).tiny or args.model
        args.new_tokens, args.iters = min(args.new_tokens, 4), 1
    return args


def main() -> int:
    args = _args()
    device = "cpu" if args.dry_run else "cuda"
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_generation: needs a CUDA GPU (or --dry-run)", file=sys.stderr)
        return 2
    source = resolve(args.model, random_weights=True, seed=0)
    task = source.family.task("generate")
    cpu_inputs = task.make_inputs(source.config, InputShape(1, 6), 0)  # [image]*Q + a short prompt
    cpu_inputs["pixel_values"] = pixel_values(source.config.vision_config, 1, generator(1))
    rows, n = [], args.new_tokens

    def row(name: str, build) -> None:
        try:
            rows.append({"row": name, **build()})
        except _Unavailable as e:
            rows.append({"row": name, "skipped": str(e)})
        except Exception as e:  # noqa: BLE001  one row failing must not lose the others
            rows.append(
                {
                    "row": name,
                    "error": f"{type(e).__name__}: {e}"[:500],
                    "trace": traceback.format_exc()[-1500:],
                }
            )
        print(json.dumps(rows[-1])[:400], flush=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def hf_fp16() -> dict:
        model = load_model(source, "generate").half().to(device)
        inputs = {k: (v.half() if v.is_floating_point() else v).to(device) for k, v in cpu_inputs.items()}
        return _measure(_hf(model, inputs, n), args.iters)

    def hf_int8() -> dict:
        _needs(cuda=True, modules=("bitsandbytes",))  # LLM.int8 runs on CUDA only
        from transformers import BitsAndBytesConfig

        model = load_model(source, "generate").half()
        directory = args.work_dir / "fp16-checkpoint"
        model.save_pretrained(directory)
        model = type(model).from_pretrained(
            directory,
            quantization_config=BitsAndBytesConfig(load_in_8bit=True),
            torch_dtype=torch.float16,
            device_map="cuda",
        )
        inputs = {k: (v.half() if v.is_floating_point() else v).cuda() for k, v in cpu_inputs.items()}
        return _measure(_hf(model, inputs, n), args.iters)

    def compiled(precision: str) -> dict:
        if precision == "int8-weight":
            _needs(modules=("torchao",))
        directory = args.work_dir / f"aoti-{precision}"
        # CUDA graphs need CUDA: the dry run builds the same packages with the default mode.
        options = {"device": device, "max_length": 128, "max_batch": 4}
        if not args.dry_run:
            options["mode"] = "reduce-overhead"
        job = ExportJob(
            args.model,
            directory,
            task="generate",
            backend="aoti",
            precision=get_precision(precision),
            random_weights=True,
            validate=False,
            force=True,
            options=options,
        )
        t0 = time.perf_counter()
        run_export(job)
        build_s = round(time.perf_counter() - t0, 1)
        return {**_measure(_compiled(directory, cpu_inputs, n, device), args.iters), "build_s": build_s}

    row("hf-fp16", hf_fp16)
    row("hf-llm-int8", hf_int8)
    row("aoti-fp16", lambda: compiled("fp16"))
    row("aoti-int8-weight", lambda: compiled("int8-weight"))
    name = "cpu (dry run)" if args.dry_run else torch.cuda.get_device_name()
    result = {
        "suite": "gpu_generation",
        "model": args.model,
        "device": name,
        "batch": 1,
        "new_tokens": n,
        "weights": "random (seed 0)",
        "rows": rows,
        "goals": {"aoti-fp16": ">= 250 tokens/s", "aoti-int8-weight": ">= 500 tokens/s at <= 4.5 GB peak"},
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    failed = [r["row"] for r in rows if "error" in r]
    if failed:
        print(f"gpu_generation: row(s) failed: {', '.join(failed)} (errors in {args.out})", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
