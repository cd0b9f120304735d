"""`vlexport tune`: candidates built and judged at the shapes to serve, the ones that miss excluded with the
reason, survivors benched in one run, the fastest passing one written as a normal validated artifact."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
import torch

import vlexport.pipeline
from vlexport.cli import main
from vlexport.contracts.manifest import Manifest
from vlexport.cpu import exact_int8_dot

FAST = ["--batch-sizes", "1,2", "--seq-lens", "8", "--warmup", "1", "--iters", "2"]
FIELDS = {
    "backend",
    "precision",
    "kernels",
    "recipe",
    "passed",
    "reason",
    "accuracy",
    "p50_ms",
    "speedup_vs_eager",
}


@pytest.fixture
def counted(monkeypatch):
    """``run_export`` counted (tune imports it from vlexport.pipeline when it builds); ``interrupt_at`` N
    makes the Nth call raise KeyboardInterrupt (Ctrl-C in the middle of a tune) before it builds anything."""
    real = vlexport.pipeline.run_export
    state = {"calls": [], "interrupt_at": None}

    def run_export(job, *args, **kwargs):
        state["calls"].append((job.backend, job.precision.name, tuple(job.kernels)))
        if len(state["calls"]) == state["interrupt_at"]:
            raise KeyboardInterrupt
        return real(job, *args, **kwargs)

    monkeypatch.setattr(vlexport.pipeline, "run_export", run_export)
    return state


def test_tune_excludes_a_candidate_that_misses_and_writes_the_fastest(tmp_path: Path, capsys) -> None:
    out = tmp_path / "tuned"
    # int8-weight keeps cosine ~0.9999 on random weights: a 0.999999 target excludes it (no search knob);
    # fp32 is judged value-exact (its own tolerance), fp16 by the target.
    args = ["tune", "bridgetower-tiny", "--task", "itm", "--random-weights", "-o", str(out)]
    args += ["--backends", "onnx", "--precisions", "fp32,int8-weight", "--min-cosine", "0.999999"]
    args += [
        "--batch-sizes",
        "1,2",
        "--seq-lens",
        "8,16",
        "--warmup",
        "1",
        "--iters",
        "3",
        "--kernels",
        "off",
    ]
    assert main(args) == 0, capsys.readouterr().err
    printed = " ".join(capsys.readouterr().out.split())
    report = json.loads((out / "tune" / "report.json").read_text())
    by = {c["name"]: c for c in report["candidates"]}
    assert set(by) == {"onnx fp32", "onnx int8-weight"}
    w8 = by["onnx int8-weight"]
    assert not w8["passed"] and "cosine" in w8["reason"] and "< 0.999999" in w8["reason"]
    # it missed, so its block size was searched (128 .. 16) and none reached the target either
    assert w8["searched"] and "--search: int8-weight --search found no block size" in w8["reason"]
    assert not w8["p50_ms"]  # excluded before the bench
    fp32 = by["onnx fp32"]
    assert (
        fp32["passed"] and set(fp32["p50_ms"]) == {"1", "2"} and all(v > 0 for v in fp32["p50_ms"].values())
    )
    serve = fp32["accuracy"]["serve_shapes"]
    assert serve["passed"] and serve["shapes"] == ["b1s8", "b1s16", "b2s8", "b2s16"] and serve["draws"] == 3
    assert report["chosen"]["backend"] == "onnx" and report["chosen"]["precision"] == "fp32"
    # the bench rows come from one run with eager as the reference, and the chosen row is the candidate's
    rows = report["bench_rows"]
    assert {r["backend"] for r in rows} == {"eager", "onnx"}
    assert all(r["status"] == "ok" for r in rows)
    assert "chosen: onnx fp32" in printed and "onnx int8-weight: dropped" in printed
    m = Manifest.read(out)
    assert m.backend == "onnx" and m.precision == "fp32" and m.validation.passed
    assert (out / "tune" / "report.md").read_text().count("| onnx") == 2
    assert (out / "tune" / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["validate", str(out)]) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["tuned"]  # the work dir went with the run


def test_kernels_on_off_listing_and_work_dir_reuse_after_an_interruption(
    exported, tmp_path: Path, counted, capsys
) -> None:
    parent = exported("bridgetower-tiny", "itm")  # fp32, no kernels: the kernels-off onnx fp32 candidate
    out, work = tmp_path / "tuned", tmp_path / "work"
    args = [
        "tune",
        str(parent),
        "-o",
        str(out),
        "--backends",
        "onnx,aoti",
        "--precisions",
        "fp32,int8-dynamic",
    ]
    args += [*FAST, "--work-dir", str(work)]

    # --kernels off: only the fp32 DIR itself, reused as given (nothing built); aoti fp32 is left out too by
    # the budget, so the run stays short
    assert main([*args, "--kernels", "off", "--max-minutes", "0"]) == 0, capsys.readouterr().err
    report = json.loads((out / "tune" / "report.json").read_text())
    names = [c["name"] for c in report["candidates"]]
    assert names == ["onnx fp32", "onnx int8-dynamic", "aoti fp32"] and counted["calls"] == []
    assert all(c["kernels"] == [] for c in report["candidates"])

    # --kernels on, interrupted when the second build starts: the first stays in the work dir
    counted["interrupt_at"] = 2
    assert main([*args, "--kernels", "on", "--force"]) == 130
    assert counted["calls"] == [("onnx", "fp32", ("attention", "bridge")), ("onnx", "int8-dynamic", ())]
    assert (work / "onnx-fp32-kernels" / "manifest.json").is_file()
    assert not (work / "onnx-int8-dynamic-kernels").exists()
    capsys.readouterr()

    # the re-run reuses it and builds only what is missing
    counted["calls"], counted["interrupt_at"] = [], None
    assert main([*args, "--kernels", "on", "--force"]) == 0, capsys.readouterr().err
    assert counted["calls"] == [("onnx", "int8-dynamic", ())]  # derived from the kernels parent, reused
    report = json.loads((out / "tune" / "report.json").read_text())
    by = {c["name"]: c for c in report["candidates"]}
    assert set(by) == {
        "onnx fp32 +attention,bridge",
        "onnx int8-dynamic +attention,bridge",
        "aoti fp32 +attention,bridge",
    }
    assert report["budget"]["builds"] == 1 and report["kernels"] == "on" and report["device"] == "cpu"
    assert (
        by["onnx fp32 +attention,bridge"]["reused"]
        and not by["onnx int8-dynamic +attention,bridge"]["reused"]
    )
    aoti = by["aoti fp32 +attention,bridge"]
    assert (
        not aoti["passed"]
        and aoti["reason"].startswith("skipped: aoti with kernels")
        and "CUDA" in aoti["reason"]
    )
    for c in report["candidates"]:
        assert FIELDS <= set(c) and c["kernels"] == ["attention", "bridge"]
    dyn = by["onnx int8-dynamic +attention,bridge"]
    assert dyn["passed"] and dyn["recipe"] == {
        "per_channel": True,
        "smooth": None,
        "reduce_range": not exact_int8_dot(),  # this CPU's (cpu.py)
        "activations": "per-tensor",
        "fp32_nodes": [],
        "kept_as": "fp32",
    }
    for c in (by["onnx fp32 +attention,bridge"], dyn):
        assert set(c["p50_ms"]) == set(c["speedup_vs_eager"]) == {"1", "2"}
        assert all(v > 0 for v in c["p50_ms"].values()) and c["accuracy"]["serve_shapes"]["passed"]
    assert report["chosen"]["name"] in by and report["chosen"]["kernels"] == ["attention", "bridge"]
    m = Manifest.read(out)
    assert [k.split(":")[0] for k in m.kernels] == ["attention", "bridge"]
    graph_ops = {n.op_type for n in onnx.load(str(out / "model.onnx")).graph.node}
    assert "MultiHeadAttention" in graph_ops  # the kernels, as ONNX Runtime runs them on CPU
    md = (out / "tune" / "report.md").read_text()
    assert "| aoti fp32 +attention,bridge | attention,bridge |" in md and "1 build(s) in this run" in md
    assert main(["validate", str(out)]) == 0


def test_max_minutes_picks_among_what_was_measured(exported, tmp_path: Path, counted, capsys) -> None:
    parent = exported("bridgetower-tiny", "itm")
    out = tmp_path / "tuned"
    args = ["tune", str(parent), "-o", str(out), "--backends", "onnx", "--kernels", "off", *FAST]
    args += ["--precisions", "fp32,int8-dynamic,int8-weight", "--max-minutes", "0"]
    assert main(args) == 0, capsys.readouterr().err
    printed = " ".join(capsys.readouterr().out.split())
    report = json.loads((out / "tune" / "report.json").read_text())
    by = {c["name"]: c for c in report["candidates"]}
    # the first candidate always runs (here: the fp32 DIR, reused); the budget stops every later build
    assert by["onnx fp32"]["passed"] and by["onnx fp32"]["p50_ms"]
    for name in ("onnx int8-dynamic", "onnx int8-weight"):
        assert by[name]["reason"].startswith("not built: the --max-minutes 0 budget ran out")
        assert not by[name]["built"] and not by[name]["p50_ms"]
    assert counted["calls"] == [] and report["budget"]["exhausted"] and report["budget"]["max_minutes"] == 0
    assert report["chosen"]["name"] == "onnx fp32" and "chosen: onnx fp32" in printed
    assert "ran out" in (out / "tune" / "report.md").read_text()
    assert main(["tune", str(parent), "-o", str(tmp_path / "x"), "--max-minutes", "-1"]) == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_device_cuda_without_a_gpu_is_refused(exported, tmp_path: Path, capsys) -> None:
    out = tmp_path / "tuned"
    assert main(["tune", str(exported("bridgetower-tiny", "itm")), "-o", str(out), "--device", "cuda"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "--device cuda: torch sees no CUDA device on this machine (use --device cpu)" in err
    assert "Traceback" not in err and not out.exists() and list(tmp_path.iterdir()) == []


def test_a_candidate_whose_build_crashes_is_reported_and_the_rest_go_on(
    exported, tmp_path: Path, monkeypatch, capsys
) -> None:
    # A library failing on one candidate (onnx 1.23's checker refused int8-dynamic's symlinked external data
    # on bridgetower-base) costs that candidate, not the tune
    import vlexport.quantize.onnx_dynamic as dynamic

    class LibraryError(Exception):
        pass

    def crash(self, ctx):
        raise LibraryError("Data of TensorProto should be stored in x, but it is a symbolic link")

    monkeypatch.setattr(dynamic.OnnxInt8DynamicPass, "derive", crash)
    parent = exported("bridgetower-tiny", "itm")
    out = tmp_path / "tuned"
    args = ["tune", str(parent), "-o", str(out), "--backends", "onnx", "--kernels", "off", *FAST]
    assert main([*args, "--precisions", "fp32,int8-dynamic"]) == 0, capsys.readouterr().err
    by = {c["name"]: c for c in json.loads((out / "tune" / "report.json").read_text())["candidates"]}
    assert by["onnx int8-dynamic"]["reason"].startswith("failed: LibraryError: Data of TensorProto")
    assert not by["onnx int8-dynamic"]["passed"] and by["onnx fp32"]["passed"]
    assert main(["validate", str(out)]) == 0


def test_bench_runs_are_split_to_fit_memory() -> None:
    # bridgetower-base's 14 survivors held 18 GiB loaded at once (24 GiB machine): a larger model must not OOM
    from vlexport.bench.tune import LOADED_PER_FILE_BYTE, bench_groups

    sizes = [1246.0, 1245.0, 625.0, 320.0, 470.0, 1247.0]
    assert bench_groups(sizes, float("inf")) == [[0, 1, 2, 3, 4, 5]]
    fits = 0.6 * 4000 / LOADED_PER_FILE_BYTE  # 1600 MiB of files per run
    groups = bench_groups(sizes, 4000.0)
    assert [i for g in groups for i in g] == list(range(6))  # every candidate, once, in order
    assert all(sum(sizes[i] for i in g) <= fits or len(g) == 1 for g in groups)
    assert groups == [[0], [1], [2, 3, 4], [5]]
    assert bench_groups([9000.0], 4000.0) == [[0]]  # one too large alone still runs


def test_generative_tune_judges_generate_at_the_batch_sizes_and_builds_the_family_mixes(
    tmp_path: Path, capsys
) -> None:
    """BLIP-2 (OPT): whole-model precisions and the family's per-component recipes, each judged by greedy
    generate() at the batch sizes to serve and benched as generation (prefill, decode ms/token); a
    candidate that misses is excluded with the reason, the fastest that passed is written and validates."""
    out, work = tmp_path / "tuned", tmp_path / "work"
    args = ["tune", "blip2-opt-tiny", "--random-weights", "-o", str(out), "--work-dir", str(work)]
    args += ["--backends", "onnx", "--precisions", "fp32,int8-weight,int4-weight", "--kernels", "off"]
    args += ["--batch-sizes", "1,2", "--seq-lens", "6", "--warmup", "1", "--iters", "2", "--new-tokens", "8"]
    assert main(args) == 0, capsys.readouterr().err
    printed = " ".join(capsys.readouterr().out.split())
    report = json.loads((out / "tune" / "report.json").read_text())
    assert report["generative"] and report["task"] == "generate"
    by = {c["name"]: c for c in report["candidates"]}
    mix = (
        "onnx int4-weight [image_encoder=int8-dynamic activations=per-token, "
        "decoder=int4-weight quantize_embeddings=True]"
    )
    assert {"onnx fp32", "onnx int8-weight", "onnx int4-weight", mix} <= set(by)
    assert mix in printed  # the recipe is printed, not eaten as markup
    for c in by.values():
        assert c["passed"] or c["reason"], c
        if c["passed"]:
            serve = c["accuracy"]["serve_shapes"]
            assert serve["shapes"] == ["b1 prompt 6 greedy", "b2 prompt 6 greedy"] and serve["passed"]
            assert set(c["decode_ms_per_token"]) == {"1", "2"} and all(
                0 < c["decode_ms_per_token"][b] < c["p50_ms"][b] for b in ("1", "2")
            )
    # fp32 generates eager's tokens exactly at both batch sizes; int8 weights keep the logits close
    fp32, w8 = by["onnx fp32"], by["onnx int8-weight"]
    assert fp32["passed"] and fp32["accuracy"]["serve_shapes"]["min_exact_agreement"] == 1.0
    assert w8["passed"] and w8["accuracy"]["serve_shapes"]["min_cosine"] > 0.999
    # the mix was built as asked: each component at its own precision, its loss judged by the loosest's
    mixes = [Manifest.read(d) for d in work.iterdir() if d.name.startswith("onnx-mix-")]
    assert {tuple(sorted(m.component_precisions.items())) for m in mixes} == {
        (("decoder", "int4-weight"), ("image_encoder", "fp32")),
        (("decoder", "int4-weight"), ("image_encoder", "int8-dynamic")),
    }
    passed = [c for c in by.values() if c["passed"]]
    fastest = min(passed, key=lambda c: sum(c["p50_ms"].values()))
    assert report["chosen"]["name"] == fastest["name"]
    assert report["chosen"]["components"] == fastest["components"]
    assert main(["validate", str(out)]) == 0
    assert "prefill ms / decode ms per token" in (out / "tune" / "report.md").read_text()


def test_a_missed_candidate_is_built_again_with_its_search() -> None:
    """What tune retries after a validation miss: the whole-model precision with --search where it has the
    knob; a per-component mix with --search on its weight-only components only (their block is searched by
    generating, tests/test_quantize_search.py), the others as they were; nothing when there is nothing to
    search."""
    from vlexport.bench.tune import _with_search
    from vlexport.contracts.backends import ExportJob
    from vlexport.contracts.precision import Fp32Config, Int4WeightConfig, Int8DynamicConfig

    whole = ExportJob("p", None, precision=Int4WeightConfig())
    again = _with_search(whole)
    assert again is not None and again.precision == Int4WeightConfig(search=True)
    assert _with_search(ExportJob("p", None, precision=Int4WeightConfig(search=True))) is None
    assert _with_search(ExportJob("p", None, precision=Fp32Config())) is None
    vision = Int8DynamicConfig(activations="per-token")
    mix = {"decoder": Int4WeightConfig(quantize_embeddings=True), "image_encoder": vision}
    job = ExportJob("p", None, precision=Int4WeightConfig(), component_precisions=mix)
    again = _with_search(job)
    assert again is not None and again.component_precisions == {
        "decoder": Int4WeightConfig(quantize_embeddings=True, search=True),
        "image_encoder": vision,
    }
    assert again.precision.name == "int4-weight" and job.component_precisions == mix  # the miss's job kept
    assert (
        _with_search(ExportJob("p", None, precision=vision, component_precisions={"image_encoder": vision}))
        is None
    )


def test_family_mixes_are_listed_per_backend_that_derives_them_and_per_kernel_set(tmp_path: Path) -> None:
    from vlexport.bench.tune import TunePlan, mix_candidates
    from vlexport.models import get_family
    from vlexport.weights import resolve

    source = resolve("blip2-opt-tiny", random_weights=True)
    spec = get_family("blip2").task("generate")
    mixes = spec.component_mixes(source.config)
    names = [c.name for c in spec.components(source.config)]
    plan = TunePlan("blip2-opt-tiny", tmp_path / "o", backends=("onnx", "aoti"))
    listed = mix_candidates(plan, mixes, names, [(), ("attention", "bridge")])
    # aoti compiles whole models: no mix; onnx: each mix from the plain and from the kernels parent
    kernels = ("attention", "bridge")
    assert [(c.backend, c.kernels) for c, _ in listed] == [("onnx", ())] * 2 + [("onnx", kernels)] * 2
    assert len({c.slug for c, _ in listed}) == 4 and all(config is not None for _, config in listed)
    assert {c.components["decoder"] for c, _ in listed} == {"int4-weight quantize_embeddings=True"}
    # --precisions counts a mix by its loosest component's precision
    assert mix_candidates(TunePlan("m", tmp_path / "o", precisions=("int8-weight",)), mixes, names) == []
