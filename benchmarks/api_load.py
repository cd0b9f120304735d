"""vlexport.load: batched calls vs the runtime under them, and parity with `vlexport run` image by image.

    python benchmarks/api_load.py --caption DIR [--itm DIR] [--parity N] [--iters N] --out
    benchmarks/results/X.json

* parity: the caption artifact loaded once, N images captioned in batches of 8 through ``vlexport.load`` vs
  `vlexport run` (``run_artifact``) on each image; the ITM artifact likewise (match vs run's scores).
* throughput, batch 8, preprocessed inputs on both sides (preprocessing timed apart, per batch of 8):
  caption: ``task.generate(pixels)`` vs the runtime's ``Generator.generate`` over the same ONNX Runtime
  sessions (the loop a direct caller would write: vision encoder, then the IO-bound decoder steps);
  ITM: ``task.match(pixels, text)`` vs ``session.run`` on the tokenized feed. Calls alternate, medians kept.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def images(n: int, root: Path) -> list[Path]:
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        h, w = rng.integers(64, 400, 2)
        path = root / f"img{i:03d}.png"
        Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(path)
        out.append(path)
    return out


def timed(fns: dict, iters: int) -> dict[str, float]:
    """Median seconds per call of each function, the functions alternating every iteration."""
    for fn in fns.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(iters):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def caption_case(directory: Path, paths: list[Path], parity: int, iters: int, batch: int) -> dict:
    import vlexport
    from vlexport.runtime.generate import Generator
    from vlexport.runtime.run import run_artifact

    task = vlexport.load(directory, device="cpu")
    out: dict = {"artifact": str(directory), "batch": batch}
    if parity:
        got = []
        for start in range(0, parity, batch):
            got += task.caption([str(p) for p in paths[start : start + batch]], return_ids=True)
        ref = [run_artifact(directory, p, device="cpu").lines[0] for p in paths[:parity]]
        same = [g.ids == r.ids and g.text == r.output for g, r in zip(got, ref)]
        out["parity"] = {
            "images": parity,
            "equal_to_run": int(sum(same)),
            "first_mismatch": next((i for i, s in enumerate(same) if not s), None),
        }
    pixels = task.pixels([str(p) for p in paths[:batch]])
    gen = Generator(task.artifact)
    new = int(task.settings.get("default_max_new_tokens", 20))
    api_ids = task.generate(pixels, return_ids=True, max_new_tokens=new)
    direct = gen.generate(pixels, max_new_tokens=new, num_beams=1)
    out["same_tokens_as_direct"] = all(
        r.ids == [int(t) for t in direct.sequences[i][: len(r.ids)]] for i, r in enumerate(api_ids)
    )
    t = timed(
        {
            "api": lambda: task.generate(pixels, max_new_tokens=new),
            "direct": lambda: gen.generate(pixels, max_new_tokens=new, num_beams=1),
            "preprocess": lambda: task.pixels([str(p) for p in paths[:batch]]),
        },
        iters,
    )
    out.update(
        max_new_tokens=new,
        seconds=t,
        images_per_s={k: batch / v for k, v in t.items()},
        ratio_api_vs_direct=t["direct"] / t["api"],
    )
    return out


def itm_case(directory: Path, paths: list[Path], parity: int, iters: int, batch: int) -> dict:
    import vlexport
    from vlexport.runtime.run import run_artifact

    task = vlexport.load(directory, device="cpu")
    texts = ["a photo of a dog on a sofa", "two cats"]
    out: dict = {"artifact": str(directory), "batch": batch}
    if parity:
        got = task.match([str(p) for p in paths[:parity]], texts)
        diffs = []
        for i, p in enumerate(paths[:parity]):
            lines = run_artifact(directory, p, texts, device="cpu").lines
            diffs += [
                abs(got.probability[i, j] - line.score["match_probability"]) for j, line in enumerate(lines)
            ]
            diffs += [abs(got.logit[i, j] - line.score["match_logit"]) for j, line in enumerate(lines)]
        out["parity"] = {"images": parity, "texts": len(texts), "max_abs_diff_vs_run": float(max(diffs))}
    pixels = task.pixels([str(p) for p in paths[:batch]])
    text = texts[:1]
    ids, mask = task.texts(text)
    feed = task.spec.run_inputs(
        {
            "input_ids": np.repeat(ids, batch, 0),
            "attention_mask": np.repeat(mask, batch, 0),
            "pixel_values": pixels,
        }
    )
    session = task.component.session
    feed = {i.name: feed[i.name] for i in session.get_inputs()}
    api = task.match(pixels, text[0])
    direct = session.run(None, feed)[0]
    out["max_abs_logit_diff_vs_direct"] = float(np.abs(api.logit - (direct[:, 1] - direct[:, 0])).max())
    t = timed(
        {
            "api": lambda: task.match(pixels, text[0]),
            "direct": lambda: session.run(None, feed),
            "preprocess_images": lambda: task.pixels([str(p) for p in paths[:batch]]),
            "tokenize": lambda: task.texts(text),
        },
        iters,
    )
    out.update(
        seconds=t,
        pairs_per_s={k: batch / v for k, v in t.items()},
        ratio_api_vs_direct=t["direct"] / t["api"],
    )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--caption", type=Path)
    p.add_argument("--itm", type=Path)
    p.add_argument("--parity", type=int, default=64, help="images checked against `vlexport run` (0: none)")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        paths = images(max(a.parity, a.batch), Path(tmp))
        result = {"load_average_at_start": os.getloadavg(), "cpus": os.cpu_count()}
        if a.caption:
            result["caption"] = caption_case(a.caption, paths, a.parity, a.iters, a.batch)
        if a.itm:
            result["itm"] = itm_case(a.itm, paths, a.parity, a.iters, a.batch)
        result["load_average_at_end"] = os.getloadavg()
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
