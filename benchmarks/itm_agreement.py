"""ITM argmax agreement of artifacts with eager fp32 on N seeded image+text pairs (issue 11's CPU target).

    python benchmarks/itm_agreement.py ARTIFACT_DIR... [--samples 256] [--batch 16] [--seq-len 32]
                                       [--threads 2] [--json F] [--markdown F]

The eager fp32 reference is rebuilt from the first artifact's manifest (its preset or model dir, the same
seeded random weights); every artifact must come from the same weights. Pairs are the task's own seeded
example inputs (random images and token ids), ``--batch`` per call, a different seed per batch. Besides
the agreement the report says how much it can mean: the share of pairs eager calls "match" (class 1) and
the eager logit margins next to the artifact's error. With random weights the ITM head is not trained,
so margins are whatever the initialisation makes them: an agreement of 100% over pairs that all land in
one class with wide margins says less than one over balanced, close calls (the report shows which).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from vlexport.contracts.manifest import Manifest
from vlexport.models.inputs import InputShape
from vlexport.runtime import load_artifact
from vlexport.weights import load_model, source_from_manifest


def eager_logits(model: torch.nn.Module, spec, batches: list[dict[str, torch.Tensor]]) -> np.ndarray:
    module = spec.build(model).eval()
    with torch.no_grad():
        return np.concatenate([module(*(b[n] for n in spec.inputs))[0].numpy() for b in batches])


def artifact_logits(directory: Path, batches: list[dict[str, torch.Tensor]], threads: int) -> np.ndarray:
    artifact = load_artifact(directory, device="cpu", threads=threads)
    (component,) = artifact.components.values()
    names = list(component.input_names)
    out = []
    for b in batches:
        result = dict(component({n: np.ascontiguousarray(b[n].numpy()) for n in names}))
        out.append(next(iter(result.values())))
    return np.concatenate(out)


def report(name: str, manifest: Manifest, ref: np.ndarray, got: np.ndarray, seconds: float) -> dict:
    agree = ref.argmax(-1) == got.argmax(-1)
    err = np.abs(got - ref)
    margin = (
        np.abs(ref[:, 1] - ref[:, 0])
        if ref.shape[-1] == 2
        else np.sort(ref, -1)[:, -1] - np.sort(ref, -1)[:, -2]
    )
    # pairs whose eager margin is within twice this artifact's error: could flip
    close = margin < 2 * err.max(-1)
    cos = float(np.dot(ref.ravel(), got.ravel()) / (np.linalg.norm(ref) * np.linalg.norm(got)))
    return {
        "artifact": name,
        "backend": manifest.backend,
        "precision": manifest.precision,
        "kernels": sorted(k.split(":")[0] for k in manifest.kernels),
        "samples": len(ref),
        "agreement": float(agree.mean()),
        "disagreeing": int(np.count_nonzero(~agree)),
        "cosine": cos,
        "max_abs_err": float(err.max()),
        "mean_abs_err": float(err.mean()),
        "eager_match_share": float((ref.argmax(-1) == 1).mean()),
        "eager_margin_min": float(margin.min()),
        "eager_margin_median": float(np.median(margin)),
        "close_calls": int(np.count_nonzero(close)),
        "seconds": round(seconds, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("artifacts", nargs="+", type=Path)
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--markdown", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    first = Manifest.read(args.artifacts[0])
    for d in args.artifacts[1:]:
        if Manifest.read(d).weights != first.weights:
            raise SystemExit(f"{d} was exported from other weights than {args.artifacts[0]}")
    source = source_from_manifest(first, args.artifacts[0])
    model = load_model(source, first.task)  # eager fp32, the same seeded weights the artifacts were made from
    task = source.family.task(first.task)
    spec = task.components(model.config)[0]
    n_batches = -(-args.samples // args.batch)
    batches = [
        task.make_inputs(model.config, InputShape(args.batch, args.seq_len), args.seed + 7919 * i)
        for i in range(n_batches)
    ]
    t0 = time.perf_counter()
    ref = eager_logits(model, spec, batches)[: args.samples]
    del model  # one copy of the weights at a time
    rows = [
        {
            "artifact": "eager",
            "precision": "fp32",
            "samples": len(ref),
            "seconds": round(time.perf_counter() - t0, 1),
        }
    ]
    for d in args.artifacts:
        t0 = time.perf_counter()
        got = artifact_logits(d, batches, args.threads)[: args.samples]
        rows.append(report(d.name, Manifest.read(d), ref, got, time.perf_counter() - t0))
    head = (
        f"ITM argmax agreement with eager fp32: {args.samples} seeded pairs ({n_batches} batches of "
        f"{args.batch}, seq {args.seq_len}, seed {args.seed}), weights {first.weights}."
    )
    columns = (
        "| artifact | precision | kernels | agreement | disagreeing | logits cosine | max abs err | eager "
        "'match' share | eager margin min / median | close calls |"
    )
    lines = [head, "", columns, "|---|---|---|--:|--:|--:|--:|--:|--:|--:|"]
    for r in rows[1:]:
        lines.append(
            f"| {r['artifact']} | {r['precision']} | {','.join(r['kernels']) or '-'} | {r['agreement']:.2%} "
            f"| {r['disagreeing']} | {r['cosine']:.5f} | {r['max_abs_err']:.3g} | "
            f"{r['eager_match_share']:.1%} "
            f"| {r['eager_margin_min']:.3g} / {r['eager_margin_median']:.3g} | {r['close_calls']} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    doc = {
        "samples": args.samples,
        "batch": args.batch,
        "seq_len": args.seq_len,
        "seed": args.seed,
        "threads": args.threads,
        "weights": first.weights,
        "rows": rows,
    }
    if args.json:
        args.json.write_text(json.dumps(doc, indent=1) + "\n")
    if args.markdown:
        args.markdown.write_text(text)


if __name__ == "__main__":
    main()
