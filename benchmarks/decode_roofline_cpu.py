"""The decode step against the machine's memory bandwidth: ONNX Runtime before / after, AOTI, in one process.

    python benchmarks/decode_roofline_cpu.py [--model blip-image-captioning-base] [--onnx DIR] [--aoti DIR]
        [--batch-sizes 1,8] [--new-tokens 20] [--iters 3] [--threads 2] [--max-length 32] [--note TEXT]
        [--out benchmarks/results/decode_roofline_cpu.json]

Random weights (seed 0); artifacts are built once (or reused with --onnx / --aoti; a read-only one is fine).
The encoders run once per batch size and backend; what is timed is the decode loop alone (exactly
--new-tokens greedy tokens from the default caption prompt), per step from the loop's ``on_step`` stamps, and
every runner is interleaved per iteration (order rotated) after one warm-up, with a measurement of the
machine's memory bandwidth (``bench.peaks``, the bench's peak) before each iteration. Runners:

- ``onnx-before``: the loop as it was: every step binds every decoder input again (a fresh IO binding);
- ``onnx``: the loop now (runtime/decoder_session.py ``StepBinding``: one binding per request, the inputs
  fed unchanged at every step bound once);
- ``onnx-blocking`` (with ``--blocking``): the same loop over a session whose threads never spin (serving's
  setting); the two above spin between the operators of a run and stop when it returns (``vlexport run``,
  ``vlexport.load`` and ``vlexport bench``: runtime/onnx_session.py ``SPIN_US``);
- ``aoti``: the static-cache package (`vlexport compile`);
- ``onnx-fused`` (with ``--fused``): the loop now over the decoder with ONNX Runtime's fused ops
  (export/ort_fusions.py, what `--optimize` and the weight-only variants get), written to a temp dir.

Bytes per step are the bench's (``bench.work.decode_shape``: the weights one step reads plus the KV cache at
the mean decode length, cross-attention K/V in full), GB/s = bytes / median step time, peak fraction = GB/s /
the best bandwidth measured in the run (the bench's convention: a loaded machine only lowers a measurement),
and ``median_sample_fraction`` = GB/s / the median sample (a shared host's transient fast state excluded).
ONNX rows also give the median time inside ``run_with_iobinding`` per step, and the rest of the step (the
Python loop). Tokens of every runner must be equal (fp32): a row says so.
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
from generation_compiled_cpu import build_pair

from vlexport.bench.peaks import MEMORY, measure_peaks
from vlexport.bench.work import decode_shape, step_bytes
from vlexport.contracts.manifest import library_versions
from vlexport.models.inputs import generator, pixel_values
from vlexport.runtime import load_artifact
from vlexport.runtime.decoder_session import DecoderSession
from vlexport.runtime.generate import Generator
from vlexport.runtime.onnx_session import OnnxComponent
from vlexport.weights import load_model, resolve


class _Before:
    """The decode step of the loop before StepBinding: each step after the prompt's binds every input."""

    def __init__(self, session: DecoderSession):
        self.session = session

    def step(self, env, mask, **kw):
        return self.session.step(env, mask, run_next=self.session.run, **kw)


class _InsideRun:
    """Wraps a session's ``run_with_iobinding`` to record the time spent inside ONNX Runtime."""

    def __init__(self, session) -> None:
        self.ns: list[int] = []
        self._run = session.run_with_iobinding
        session.run_with_iobinding = self

    def __call__(self, *args, **kwargs):
        t = time.perf_counter_ns()
        out = self._run(*args, **kwargs)
        self.ns.append(time.perf_counter_ns() - t)
        return out


def _decode(gen: Generator, env: dict, n: int, decoder) -> tuple[np.ndarray, np.ndarray]:
    ns: list[int] = []
    out = gen.decode(
        env,
        max_new_tokens=n,
        min_new_tokens=n,
        decoder=decoder,
        on_step=lambda i: ns.append(time.perf_counter_ns()),
    )
    return np.diff(ns) / 1e6, out.sequences[:, -n:]


def _row(
    args: argparse.Namespace, name: str, batch: int, steps: list, in_run: list, work: float, tokens: dict
) -> dict:
    """One runner's row at one batch: median step, GB/s, and for ONNX the time inside ORT."""
    per_token = float(np.median(np.concatenate(steps)))
    row = {
        "model": args.model,
        "task": "caption",
        "runner": name,
        "precision": "fp32",
        "batch": batch,
        "new_tokens": args.new_tokens,
        "threads": args.threads,
        "iters": args.iters,
        "decode_ms_per_token": round(per_token, 3),
        "decode_ms_per_iter": [round(float(np.median(s)), 3) for s in steps],
        "work_bytes_per_step": round(work),
        "achieved_gbps": round(work / per_token / 1e6, 3),
        "tokens_equal_onnx": bool(np.array_equal(tokens[name], tokens["onnx"])),
    }
    if in_run:
        inside_ms = float(np.median(in_run))
        row["session_run_ms"] = round(inside_ms, 3)
        row["outside_run_ms"] = round(per_token - inside_ms, 3)
    return row


def _ratios(rows: list[dict], batches: list[int]) -> dict:
    """Per batch: the loop now vs before, AOTI vs the loop now (speed: > 1 is faster), spinning vs not."""
    ratios: dict = {}
    for batch in batches:
        ms = {r["runner"]: r["decode_ms_per_token"] for r in rows if r["batch"] == batch}
        ratios[f"b{batch}"] = {
            "onnx_speedup_vs_before": round(ms["onnx-before"] / ms["onnx"], 3),
            "aoti_speed_vs_onnx": round(ms["onnx"] / ms["aoti"], 3),
        }
        if "onnx-blocking" in ms:
            ratios[f"b{batch}"]["onnx_speed_vs_blocking"] = round(ms["onnx-blocking"] / ms["onnx"], 3)
        if "onnx-fused" in ms:
            ratios[f"b{batch}"]["onnx_fused_speed_vs_onnx"] = round(ms["onnx"] / ms["onnx-fused"], 3)
            ratios[f"b{batch}"]["aoti_speed_vs_onnx_fused"] = round(ms["onnx-fused"] / ms["aoti"], 3)
    return ratios


def _fused_decoder(path: Path, scratch: Path) -> Path:
    """A copy of the decoder graph with ORT's fused ops (export/ort_fusions.py), as onnx-opt writes it."""
    import shutil

    from vlexport.export.ort_fusions import fuse_for_ort

    for f in path.parent.glob(path.name + "*"):
        shutil.copy2(f, scratch / f.name)
    fuse_for_ort(scratch / path.name, external=(scratch / f"{path.name}.data").exists(), decode_step=True)
    return scratch / path.name


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
    p.add_argument("--blocking", action="store_true", help="also time a session that never spins")
    p.add_argument("--fused", action="store_true", help="also time the decoder with ORT's fused ops")
    p.add_argument("--note", default="", help="recorded as is, e.g. the machine's load")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "decode_roofline_cpu.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batch_sizes.split(",")]
    load_start = os.getloadavg()

    source = resolve(args.model, random_weights=True, seed=0)
    model = load_model(source, "caption")
    dirs, builds = build_pair(model, args, max(batches))
    onnx = Generator(load_artifact(dirs["onnx"], device="cpu", threads=args.threads, interleaved=True))
    aoti = Generator(load_artifact(dirs["aoti"], device="cpu", threads=args.threads))
    spec = onnx.artifact.manifest.components["decoder"]
    runners = {"onnx-before": (onnx, _Before(onnx.decoder)), "onnx": (onnx, None), "aoti": (aoti, None)}
    sessions = [onnx.decoder]
    if args.blocking:
        one = OnnxComponent(dirs["onnx"] / spec.file, threads=args.threads, spin=False, decode_step=True)
        runners["onnx-blocking"] = (onnx, DecoderSession(one, spec))
        sessions.append(runners["onnx-blocking"][1])
    if args.fused:
        scratch = tempfile.TemporaryDirectory(prefix="vlexport-roofline-")  # removed at exit
        fused = _fused_decoder(dirs["onnx"] / spec.file, Path(scratch.name))
        one = OnnxComponent(fused, threads=args.threads, decode_step=True)
        runners["onnx-fused"] = (onnx, DecoderSession(one, spec))
        sessions.append(runners["onnx-fused"][1])
    inside = {id(s): _InsideRun(s.session) for s in sessions}
    task = source.family.task("caption")
    components = task.components(model.config)

    peaks: list[float] = []
    rows = []
    n = args.new_tokens
    for batch in batches:
        pixels = pixel_values(model.config.vision_config, batch, generator(1000 + batch)).numpy()
        envs = {"onnx": onnx.encode(pixels), "aoti": aoti.encode(pixels)}
        prompt = envs["onnx"]["decoder_input_ids"].shape[1]
        work = step_bytes(
            decode_shape(model, components, batch, prompt, n), weight_bytes=4, activation_bytes=4
        )
        steps: dict[str, list[np.ndarray]] = {r: [] for r in runners}
        in_run: dict[str, list[float]] = {r: [] for r in runners}
        tokens: dict[str, np.ndarray] = {}
        names = list(runners)
        for it in range(args.iters + 1):  # iteration 0 warms every runner up
            peaks.append(measure_peaks("cpu", args.threads).peaks[MEMORY].value)
            k = it % len(names)
            for name in names[k:] + names[:k]:
                gen, decoder = runners[name]
                session = decoder if name in ("onnx-blocking", "onnx-fused") else gen.decoder
                rec = inside.get(id(session))
                if rec is not None:
                    rec.ns.clear()
                ms, tokens[name] = _decode(gen, envs["aoti" if name == "aoti" else "onnx"], n, decoder)
                if it > 0:
                    steps[name].append(ms)
                    if rec is not None:
                        in_run[name].extend(np.array(rec.ns[1:]) / 1e6)  # the decode steps' calls
                print(f"b{batch} iter {it} {name}: {np.median(ms):.1f} ms/token", flush=True)
        for name in names:
            rows.append(_row(args, name, batch, steps[name], in_run[name], work, tokens))
    peak = max(peaks)
    # on a shared host the probe now and then reads ~1.6x the usual rate (EPYC: 52-58 vs 32-35 GB/s, at
    # 256 MiB and at 2 GiB alike) while the decode steps beside those samples run no faster: the median too
    typical = float(np.median(peaks))
    for row in rows:
        row["peak_gbps"] = peak
        row["peak_fraction"] = round(row["achieved_gbps"] / peak, 3)
        row["median_sample_fraction"] = round(row["achieved_gbps"] / typical, 3)
    ratios = _ratios(rows, batches)

    result = {
        "suite": "decode_roofline_cpu",
        "weights": "random (seed 0)",
        "note": args.note,
        "device": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average_at_start": [round(x, 2) for x in load_start],
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        "memory_peak_gbps": {
            "best": peak,
            "median": round(typical, 2),
            "samples": peaks,
            "method": "bench.peaks (sum / copy of 2x LLC)",
        },
        # OpenMP's wait policy (torch's and so AOTI's thread pool) decides how the package fares on a loaded
        # machine; it is read when torch loads, so it is the environment's
        "env": {k: os.environ.get(k) for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")},
        "max_length": args.max_length,
        "artifacts": {k: {"path": str(v), **builds[k]} for k, v in dirs.items()},
        "versions": library_versions(),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "ratios": ratios,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"memory peak {peak} GB/s (samples {peaks})")
    for r in rows:
        extra = f", in ORT {r['session_run_ms']} ms" if "session_run_ms" in r else ""
        print(
            f"b{r['batch']} {r['runner']:12s}: {r['decode_ms_per_token']:.1f} ms/token, "
            f"{r['achieved_gbps']:.2f} GB/s, {r['peak_fraction']:.2f} of peak{extra}, "
            f"tokens equal: {r['tokens_equal_onnx']}"
        )
    print(json.dumps(ratios))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
