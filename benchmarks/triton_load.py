"""Bounded load test of a local tritonserver on vlexport's repository: tiny BridgeTower ITM ensemble + tiny
BLIP captioning (BLS), `--kind cpu --backend python-onnxruntime`, loopback only.

    scripts/tritonserver_env.sh # once: the server's own virtualenv python benchmarks/triton_load.py
    [--clients 4] [--seconds 10] [--work DIR] [--out benchmarks/results/triton_load.json]

    # generation alone, per model and client count (in-flight batching), every answer checked:
    python benchmarks/triton_load.py --generation caption,opt --clients 1,4,8 --seconds 20 \
        --out benchmarks/results/triton_generation.json

Each of --clients threads (its own client; even ones grpc, odd ones http) sends requests for --seconds,
alternating the two models, from a fixed pool of (image, texts/prompt) cases whose answers were computed first
with `vlexport run` on the same artifacts: every response is checked (ITM scores within 1e-5 of `run`'s,
caption token ids exactly). Reported per model: requests, req/s, p50/p99 latency, wrong, errors;
after the clock stops no request is left unanswered (lost = sent - answered).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.triton.client import generate, image_bytes, scores
from tests.triton.server import Server, missing_reason
from vlexport.contracts.manifest import library_versions

TEXTS = ["a cat on a mat", "two dogs", "a red bus in the rain at night"]


def _artifacts(work: Path) -> dict[str, Path]:
    from vlexport.pipeline import ExportJob, run_export

    out = {"itm": work / "bridgetower-tiny-itm", "caption": work / "blip-tiny-caption"}
    for (name, path), (preset, task) in zip(
        out.items(), [("bridgetower-tiny", "itm"), ("blip-tiny", "caption")]
    ):
        if not (path / "manifest.json").is_file():
            run_export(ExportJob(preset, path, task=task, random_weights=True, force=True))
    return out


def _cases(artifacts: dict[str, Path], work: Path, n: int = 8) -> list[tuple[str, bytes, object, object]]:
    """(model, image, texts or prompt, expected answer) from `vlexport run` on the artifact."""
    from vlexport.runtime.run import run_artifact

    cases = []
    for i in range(n):
        image = image_bytes(100 + i)
        path = work / f"img{i}.png"
        path.write_bytes(image)
        texts = TEXTS[: 1 + i % 3]
        run = run_artifact(artifacts["itm"], path, texts, device="cpu")
        cases.append(("itm", image, texts, [line.score["match_logit"] for line in run.lines]))
        prompt = f"photo number {i}"
        run = run_artifact(artifacts["caption"], path, [prompt], device="cpu")
        cases.append(("caption", image, prompt, run.lines[0].ids))
    return cases


GENERATIVE = {  # --generation NAME -> (preset, task, prompt for case i or None)
    "caption": ("blip-tiny", "caption", lambda i: f"photo number {i}"),
    "opt": ("blip2-opt-tiny", "generate", lambda i: None if i % 2 else f"what is in picture {i}?"),
    "caption-base": ("blip-image-captioning-base", "caption", lambda i: f"photo number {i}"),
}


def _generation(args: argparse.Namespace) -> int:
    """Each generative model alone under 1, 4, 8 ... clients: requests/s, p50/p99, every answer checked
    against `vlexport run` (token ids, exactly), none lost."""
    from vlexport.pipeline import ExportJob, run_export
    from vlexport.runtime.run import run_artifact
    from vlexport.serve.triton_config import ServeOptions
    from vlexport.serve.triton_repo import write_repository

    work = args.work or Path(tempfile.mkdtemp(prefix="triton-generation-"))
    work.mkdir(parents=True, exist_ok=True)
    repo = work / "repo-generation"
    opts = ServeOptions(kind="cpu", backend="python-onnxruntime", max_batch_size=8, max_queue_delay_us=2000)
    names = args.generation.split(",")
    cases: dict[str, list] = {}
    for k, name in enumerate(names):
        preset, task, prompt = GENERATIVE[name]
        art = work / f"{preset}-{task}"
        if not (art / "manifest.json").is_file():
            run_export(ExportJob(preset, art, task=task, random_weights=True, force=True))
        write_repository([art], repo, opts, name=name, backend="python-onnxruntime", force=k == 0)
        cases[name] = []
        for i in range(8):
            image = image_bytes(100 + i)
            (work / f"gen{i}.png").write_bytes(image)
            texts = [prompt(i)] if prompt(i) else []
            run = run_artifact(art, work / f"gen{i}.png", texts, device="cpu")
            cases[name].append((name, image, prompt(i), run.lines[0].ids))
    models = sorted(p.name for p in repo.iterdir() if (p / "config.pbtxt").is_file())
    server = Server(repo, models, work / "tritonserver-generation.log")
    rows: dict[str, dict] = {}
    try:
        startup = server.wait_ready()
        for name in names:
            rows[name] = {}
            for clients in args.client_counts:
                log: list[dict] = []
                stop = time.monotonic() + args.seconds
                threads = [
                    threading.Thread(target=_worker, args=(server, i, cases[name], stop, log))
                    for i in range(clients)
                ]
                load_before = os.getloadavg()[0]
                t0 = time.monotonic()
                for t in threads:
                    t.start()
                for t in threads:
                    t.join(args.seconds + 300)
                wall = time.monotonic() - t0
                lat = np.array([e["latency_s"] for e in log if e["ok"]]) * 1e3
                rows[name][str(clients)] = {
                    "requests": len(log),
                    "req_per_s": round(len(log) / wall, 2),
                    "p50_ms": round(float(np.percentile(lat, 50)), 1) if lat.size else None,
                    "p99_ms": round(float(np.percentile(lat, 99)), 1) if lat.size else None,
                    "wrong": sum(1 for e in log if not e["ok"] and e["error"] is None),
                    "errors": sum(1 for e in log if e["error"] is not None),
                    "error_examples": sorted({e["error"] for e in log if e["error"]})[:3],
                    "lost": sum(t.is_alive() for t in threads),
                    "load_average_1m": [round(load_before, 1), round(os.getloadavg()[0], 1)],
                }
                print(name, clients, json.dumps(rows[name][str(clients)]), flush=True)
            counts = [str(c) for c in args.client_counts]
            first, last = rows[name][counts[0]]["req_per_s"], rows[name][counts[-1]]["req_per_s"]
            rows[name]["throughput_ratio_last_to_first"] = round(last / first, 2) if first else None
        where = _server_time(server)
    finally:
        server.stop()
    result = {
        "clients": args.client_counts,
        "seconds": args.seconds,
        "server_startup_s": round(startup, 1),
        "models": rows,
        "server_time_per_request": where,
        "setup": "generation models alone (in-process ONNX decoder, in-flight batching up to 8 rows), "
        "--kind cpu --backend python-onnxruntime, encoders max_batch_size 8, queue delay 2 ms, 1 instance "
        "each; clients alternate grpc / http; every answer's token ids compared with `vlexport run`'s",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "versions": library_versions(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    bad = any(
        r["wrong"] or r["errors"] or r["lost"]
        for m in rows.values()
        for r in m.values()
        if isinstance(r, dict)
    )
    return 1 if bad else 0


def _client(server: Server, i: int):
    from tritonclient import grpc, http

    if i % 2:
        return http.InferenceServerClient(server.http_url, network_timeout=120.0)
    return grpc.InferenceServerClient(server.grpc_url)


def _worker(server: Server, i: int, cases: list, stop: float, log: list) -> None:
    client = _client(server, i)
    try:
        k = i
        while time.monotonic() < stop:
            model, image, query, expected = cases[k % len(cases)]
            k += 1
            t0 = time.perf_counter()
            entry = {"model": model, "sent": True}
            try:
                if model == "itm":
                    got = scores(client, model, image, query)["match_logit"]
                    ok = got.shape == (len(expected),) and bool(np.allclose(got, expected, rtol=0, atol=1e-5))
                else:
                    ok = generate(client, model, image, query)[1] == expected  # token ids: exact
                entry.update(ok=ok, error=None)
            except Exception as e:  # noqa: BLE001  counted, not raised: the run reports errors
                entry.update(ok=False, error=f"{type(e).__name__}: {e}"[:200])
            entry["latency_s"] = time.perf_counter() - t0
            log.append(entry)
    finally:
        client.close()


def _in_process_itm(artifact: Path):
    """The same ITM artifact called in this process, as `vlexport run` computes it (decode, tokenize, ONNX
    Runtime, scores), one shared session: what the ensemble is compared with at the same concurrency."""
    from vlexport.contracts.manifest import Manifest
    from vlexport.models import get_family
    from vlexport.runtime.onnx_session import OnnxComponent
    from vlexport.runtime.preprocess import image_settings
    from vlexport.runtime.texts import placeholder_text_tokenizer
    from vlexport.runtime.tokenizer import ArtifactTokenizer, pad_batch
    from vlexport.serve.py_common import decode_image

    manifest = Manifest.read(artifact)
    task = get_family(manifest.family).task(manifest.task)
    settings = image_settings(artifact, manifest)
    (comp,) = manifest.components.values()
    session = OnnxComponent(artifact / comp.file, providers=["CPUExecutionProvider"])
    if manifest.tokenizer.get("kind", "none") != "none":
        batch = ArtifactTokenizer(artifact, manifest).batch
    else:
        tok, pad = placeholder_text_tokenizer(artifact)
        batch = lambda texts: pad_batch([tok.encode(t).ids for t in texts], pad)

    def call(image: bytes, texts: list[str]) -> np.ndarray:
        pixels = decode_image(image, settings)
        ids, mask = batch(texts)
        feeds = task.run_inputs(
            {"input_ids": ids, "attention_mask": mask, "pixel_values": np.repeat(pixels, len(texts), axis=0)}
        )
        out = session({k: feeds[k] for k in session.input_names})
        return task.scores(out, len(texts))["match_logit"]

    return call


def _encoder(args: argparse.Namespace) -> int:
    """ITM ensemble at --clients vs the same artifact in process with as many threads; every answer
    checked."""
    from vlexport.runtime.run import run_artifact
    from vlexport.serve.triton_config import ServeOptions
    from vlexport.serve.triton_repo import write_repository

    work = args.work or Path(tempfile.mkdtemp(prefix="triton-encoder-"))
    work.mkdir(parents=True, exist_ok=True)
    repo = work / "repo-encoder"
    opts = ServeOptions(
        kind="cpu", backend="python-onnxruntime", ensemble=True, max_batch_size=8, max_queue_delay_us=2000
    )
    write_repository([args.encoder], repo, opts, name="itm", backend="python-onnxruntime", force=True)
    cases = []
    for i in range(4):
        image = image_bytes(100 + i, (224, 224))
        (work / f"enc{i}.png").write_bytes(image)
        texts = TEXTS[: 1 + i % 3]
        run = run_artifact(args.encoder, work / f"enc{i}.png", texts, device="cpu")
        cases.append((image, texts, [line.score["match_logit"] for line in run.lines]))

    def drive(call_for_thread, n: int) -> dict:
        log: list[dict] = []
        stop = time.monotonic() + args.seconds

        def worker(i: int) -> None:
            call, close = call_for_thread(i)
            try:
                k = i
                while time.monotonic() < stop:
                    image, texts, expected = cases[k % len(cases)]
                    k += 1
                    t0 = time.perf_counter()
                    try:
                        got = np.asarray(call(image, texts))
                        ok, err = (
                            got.shape == (len(expected),)
                            and bool(np.allclose(got, expected, rtol=0, atol=1e-5)),
                            None,
                        )
                    except Exception as e:  # noqa: BLE001  counted, not raised
                        ok, err = False, f"{type(e).__name__}: {e}"[:200]
                    log.append({"ok": ok, "error": err, "latency_s": time.perf_counter() - t0})
            finally:
                close()

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join(args.seconds + 300)
        wall = time.monotonic() - t0
        lat = np.array([e["latency_s"] for e in log if e["ok"]]) * 1e3
        return {
            "requests": len(log),
            "req_per_s": round(len(log) / wall, 2),
            "p50_ms": round(float(np.percentile(lat, 50)), 1) if lat.size else None,
            "p99_ms": round(float(np.percentile(lat, 99)), 1) if lat.size else None,
            "wrong": sum(1 for e in log if not e["ok"] and e["error"] is None),
            "errors": sum(1 for e in log if e["error"] is not None),
            "error_examples": sorted({e["error"] for e in log if e["error"]})[:3],
            "lost": sum(t.is_alive() for t in threads),
        }

    local = _in_process_itm(args.encoder)
    in_process = drive(lambda i: (local, lambda: None), args.clients)
    server = Server(
        repo,
        sorted(p.name for p in repo.iterdir() if (p / "config.pbtxt").is_file()),
        work / "tritonserver-encoder.log",
    )
    try:
        startup = server.wait_ready()

        def remote(i: int):
            client = _client(server, i)
            return (lambda image, texts: scores(client, "itm", image, texts)["match_logit"]), client.close

        served = drive(remote, args.clients)
        where = _server_time(server)
    finally:
        server.stop()
    result = {
        "artifact": str(args.encoder),
        "clients": args.clients,
        "seconds": args.seconds,
        "server_startup_s": round(startup, 1),
        "ensemble": served,
        "in_process": in_process,
        "ratio_ensemble_to_in_process": round(served["req_per_s"] / in_process["req_per_s"], 3)
        if in_process["req_per_s"]
        else None,
        "server_time_per_request": where,
        "setup": "ITM ensemble (preprocess + python-onnxruntime model + postprocess python models), --kind "
        "cpu, "
        "max_batch_size 8, queue delay 2 ms, 1 instance each; in process: one ORT session shared "
        "by the threads, same preprocessing code",
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "load_average_1m_at_end": round(os.getloadavg()[0], 1),
        },
        "versions": library_versions(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        json.dumps(
            {
                k: result[k]
                for k in ("ensemble", "in_process", "ratio_ensemble_to_in_process", "server_time_per_request")
            },
            indent=1,
        )
    )
    return 1 if served["wrong"] or served["errors"] or served["lost"] else 0


def _server_time(server: Server) -> dict[str, dict[str, float]]:
    """Where the server's time went, per model (Triton's own statistics): mean ms per request in the queue and
    in compute (input, execute, output), and the mean of the whole request inside the server ("success")."""
    from tritonclient import http

    client = http.InferenceServerClient(server.http_url)
    try:
        stats = client.get_inference_statistics()
    finally:
        client.close()
    out = {}
    for m in stats.get("model_stats", []):
        s = m.get("inference_stats", {})
        n = int(s.get("success", {}).get("count", 0))
        if n:
            out[m["name"]] = {
                "requests": n,
                **{
                    f"{k}_ms": round(int(s.get(k, {}).get("ns", 0)) / n / 1e6, 3)
                    for k in ("success", "queue", "compute_input", "compute_infer", "compute_output")
                },
            }
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--clients", default="4", help="clients; with --generation a comma list, each measured (e.g. 1,4,8)"
    )
    p.add_argument(
        "--generation",
        default=None,
        help=f"comma list of generative models to load alone ({', '.join(GENERATIVE)}) instead",
    )
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--work", type=Path, default=None, help="where the artifacts and the repository go (kept)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "triton_load.json")
    p.add_argument(
        "--encoder",
        type=Path,
        default=None,
        help="an ITM artifact: measure its ensemble against in-process calls instead (e.g. bridgetower-base)",
    )
    args = p.parse_args()
    args.client_counts = [int(c) for c in str(args.clients).split(",")]
    args.clients = args.client_counts[0]
    if not all(1 <= c <= 64 for c in args.client_counts) or not 0 < args.seconds <= 600:
        p.error("--clients must be 1..64 and --seconds 0..600 (the test is bounded)")
    reason = missing_reason()
    if reason:
        print(f"cannot run: {reason}", file=sys.stderr)
        return 2
    if args.encoder is not None:
        return _encoder(args)
    if args.generation is not None:
        return _generation(args)
    from vlexport.serve.triton_config import ServeOptions
    from vlexport.serve.triton_repo import write_repository

    work = args.work or Path(tempfile.mkdtemp(prefix="triton-load-"))
    work.mkdir(parents=True, exist_ok=True)
    artifacts = _artifacts(work)
    repo = work / "repo"
    opts = ServeOptions(
        kind="cpu", backend="python-onnxruntime", ensemble=True, max_batch_size=8, max_queue_delay_us=2000
    )
    for name, path in artifacts.items():
        # generative artifacts take no --ensemble (their model is the whole pipeline)
        o = opts if name == "itm" else dataclasses.replace(opts, ensemble=False)
        write_repository([path], repo, o, name=name, backend="python-onnxruntime", force=name == "itm")
    cases = _cases(artifacts, work)
    models = sorted(p.name for p in repo.iterdir() if (p / "config.pbtxt").is_file())  # not requirements.txt
    server = Server(repo, models, work / "tritonserver.log")
    try:
        startup = server.wait_ready()
        log: list[dict] = []
        stop = time.monotonic() + args.seconds
        threads = [
            threading.Thread(target=_worker, args=(server, i, cases, stop, log)) for i in range(args.clients)
        ]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join(args.seconds + 300)
        wall = time.monotonic() - t0
        hung = sum(t.is_alive() for t in threads)
        where = _server_time(server)
    finally:
        server.stop()
    rows = {}
    for model in ("itm", "caption"):
        entries = [e for e in log if e["model"] == model]
        lat = np.array([e["latency_s"] for e in entries if e["ok"]]) * 1e3
        rows[model] = {
            "requests": len(entries),
            "req_per_s": round(len(entries) / wall, 2),
            "p50_ms": round(float(np.percentile(lat, 50)), 1) if lat.size else None,
            "p99_ms": round(float(np.percentile(lat, 99)), 1) if lat.size else None,
            "wrong": sum(1 for e in entries if not e["ok"] and e["error"] is None),
            "errors": sum(1 for e in entries if e["error"] is not None),
            "error_examples": sorted({e["error"] for e in entries if e["error"]})[:3],
        }
    result = {
        "clients": args.clients,
        "seconds": args.seconds,
        "wall_s": round(wall, 2),
        "server_startup_s": round(startup, 1),
        "hung_clients": hung,
        "lost": hung,
        "models": rows,
        "total_req_per_s": round(len(log) / wall, 2),
        "server_time_per_request": where,
        "setup": "tiny BridgeTower ITM ensemble (3 python models + ensemble) and tiny BLIP caption BLS, "
        "--kind cpu --backend python-onnxruntime, max_batch_size 8, queue delay 2 ms, 1 instance each",
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "load_average_1m_at_end": round(os.getloadavg()[0], 1),
        },  # other work sharing the cores
        "versions": library_versions(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("total_req_per_s", "lost", "models")}, indent=1))
    bad = hung or any(r["wrong"] or r["errors"] for r in rows.values())
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
