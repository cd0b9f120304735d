"""`vlexport triton` without a server: every config.pbtxt parses into tritonclient's ModelConfig, the mapping
of names, dtypes and batch dims is exact, and bad options / artifacts / names are refused before any write."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as pb

from vlexport.errors import CheckError, UsageError
from vlexport.manifest import Component, TensorSpec
from vlexport.serve import triton_config as tc
from vlexport.serve.triton_repo import sanitize, write_repository

CPU_PY = tc.ServeOptions(kind="cpu", backend="python-onnxruntime", ensemble=True)


def _configs(repo: Path) -> dict[str, pb.ModelConfig]:
    return {p.parent.name: text_format.Parse(p.read_text(), pb.ModelConfig()) for p in repo.glob("*/config.pbtxt")}


def _copy(src: Path, dst: Path, **manifest_changes) -> Path:
    shutil.copytree(src, dst)
    m = json.loads((dst / "manifest.json").read_text())
    for key, value in manifest_changes.items():
        m[key] = value(m[key]) if callable(value) else value
    (dst / "manifest.json").write_text(json.dumps(m))
    return dst


def test_bridgetower_ensemble_repository_parses_with_exact_tensors(exported, tmp_path: Path) -> None:
    art = exported("bridgetower-tiny", "itm")
    names = write_repository([art], tmp_path / "repo", CPU_PY, name="bt", backend="python-onnxruntime")
    assert names == ["bt_model", "bt_preprocess", "bt_postprocess", "bt"]
    cfg = _configs(tmp_path / "repo")
    model = cfg["bt_model"]
    assert model.backend == "python" and model.max_batch_size == 8  # batch folded into max_batch_size
    assert {i.name: (pb.DataType.Name(i.data_type), list(i.dims)) for i in model.input} == {
        "input_ids": ("TYPE_INT64", [-1]), "attention_mask": ("TYPE_INT64", [-1]),
        "pixel_values": ("TYPE_FP32", [3, 64, 64]), "pixel_mask": ("TYPE_INT64", [64, 64])}
    assert [(o.name, list(o.dims)) for o in model.output] == [("logits", [2])]
    assert model.dynamic_batching.max_queue_delay_microseconds == 100
    assert [(g.kind, g.count) for g in model.instance_group] == [(pb.ModelInstanceGroup.KIND_CPU, 1)]
    ens = cfg["bt"]
    assert ens.platform == "ensemble" and [s.model_name for s in ens.ensemble_scheduling.step] == [
        "bt_preprocess", "bt_model", "bt_postprocess"]
    assert sorted(o.name for o in ens.output) == ["match_logit", "match_probability"]
    pre = cfg["bt_preprocess"]  # preprocessing outputs = the component's inputs, batch dim included
    assert [(o.name, list(o.dims)) for o in pre.output][2] == ("pixel_values", [-1, 3, 64, 64])
    assert (tmp_path / "repo/bt_model/1/model.onnx").stat().st_size == (art / "model.onnx").stat().st_size
    assert (tmp_path / "repo/bt_preprocess/1/artifact/manifest.json").is_file()
    assert "vlexport.serve.py_component" in (tmp_path / "repo/bt_model/1/model.py").read_text()


@pytest.mark.parametrize(("kind", "backend", "platform"), [("gpu", "onnxruntime", "onnxruntime_onnx"),
                                                           ("cpu", "onnxruntime", "onnxruntime_onnx"),
                                                           ("gpu", "python-onnxruntime", "")])
def test_generative_repository_has_components_and_bls_model(exported, tmp_path: Path, kind, backend, platform) -> None:
    art = exported("blip-tiny", "caption")
    opts = tc.ServeOptions(kind=kind, backend=backend, max_batch_size=4, preferred_batch_sizes=(2, 4), instances=2)
    write_repository([art], tmp_path / "repo", opts, name="cap", backend=backend)
    cfg = _configs(tmp_path / "repo")
    assert sorted(cfg) == ["cap", "cap_decoder", "cap_vision_encoder"]
    dec = cfg["cap_decoder"]
    assert dec.platform == platform and dec.max_batch_size == 4
    assert list(dec.dynamic_batching.preferred_batch_size) == [2, 4]
    past = next(i for i in dec.input if i.name == "past_key_values.0.key")
    assert list(past.dims) == [4, -1, 16]  # heads, dynamic past length, head_dim
    kind_enum = pb.ModelInstanceGroup.KIND_GPU if kind == "gpu" else pb.ModelInstanceGroup.KIND_CPU
    assert [(g.kind, g.count) for g in dec.instance_group] == [(kind_enum, 2)]
    if backend == "onnxruntime":
        assert dec.optimization.graph.level == 1 and dec.default_model_filename == "model.onnx"
    bls = cfg["cap"]
    assert bls.backend == "python" and bls.max_batch_size == 0
    assert [(i.name, i.optional) for i in bls.input][:2] == [("IMAGE", False), ("TEXT", True)]
    assert json.loads((tmp_path / "repo/cap/1/serve.json").read_text())["components"] == {
        "vision_encoder": "cap_vision_encoder", "decoder": "cap_decoder"}


def test_tensorrt_and_pytorch_configs_and_the_profile_bound_max_batch(exported, tmp_path: Path) -> None:
    art = exported("bridgetower-tiny", "itm")
    trt = tmp_path / "trt"
    _copy(art, trt, backend="tensorrt", derived_from={"backend": "onnx", "shapes": {"batch": [1, 2, 4]}},
          components=lambda c: {"model": {**c["model"], "file": "model.plan"}},
          sha256=lambda h: {("model.plan" if k == "model.onnx" else k): v for k, v in h.items()})
    (trt / "model.onnx").rename(trt / "model.plan")  # same bytes: only the config is under test here
    with pytest.raises(UsageError, match="profile allows batches up to 4"):
        write_repository([trt], tmp_path / "r1", tc.ServeOptions(backend="tensorrt", max_batch_size=8))
    assert not (tmp_path / "r1").exists()
    write_repository([trt], tmp_path / "r1", tc.ServeOptions(backend="tensorrt", max_batch_size=4))
    cfg = _configs(tmp_path / "r1")["trt"]
    assert cfg.platform == "tensorrt_plan" and cfg.max_batch_size == 4 and cfg.optimization.cuda.graphs
    assert (tmp_path / "r1/trt/1/model.plan").is_file()
    pt2 = tmp_path / "pt2"
    _copy(art, pt2, backend="aoti", components=lambda c: {"model": {**c["model"], "file": "model.pt2"}},
          sha256=lambda h: {("model.pt2" if k == "model.onnx" else k): v for k, v in h.items()})
    (pt2 / "model.onnx").rename(pt2 / "model.pt2")
    write_repository([pt2], tmp_path / "r2", tc.ServeOptions())
    cfg = _configs(tmp_path / "r2")["pt2"]
    assert cfg.backend == "pytorch" and cfg.default_model_filename == "model.pt2"
    with pytest.raises(UsageError, match="--backend onnxruntime cannot run"):
        write_repository([pt2], tmp_path / "r3", tc.ServeOptions(), backend="onnxruntime")


@pytest.mark.parametrize(("dtype", "triton"), [("float16", "TYPE_FP16"), ("bfloat16", "TYPE_BF16"),
                                               ("int64", "TYPE_INT64"), ("bool", "TYPE_BOOL"),
                                               ("float32", "TYPE_FP32"), ("int32", "TYPE_INT32")])
def test_dtypes_map_exactly(dtype: str, triton: str) -> None:
    comp = Component("c", "c.onnx", [TensorSpec("x", dtype, ["batch", 3])], [TensorSpec("y", dtype, ["batch"])])
    cfg = tc.parse(tc.to_text(tc.component_config("c", comp, tc.ServeOptions(), max_batch_size=2,
                                                  model_file="model.onnx")))
    assert pb.DataType.Name(cfg.input[0].data_type) == triton and list(cfg.input[0].dims) == [3]
    assert list(cfg.output[0].dims) == []  # [batch] -> a scalar per batch row


def test_static_batch_component_is_not_batched() -> None:
    comp = Component("c", "c.onnx", [TensorSpec("x", "float32", [1, "sequence"])], [TensorSpec("y", "float32", [1])])
    cfg = tc.component_config("c", comp, tc.ServeOptions(max_batch_size=8), max_batch_size=8, model_file="model.onnx")
    assert cfg.max_batch_size == 0 and list(cfg.input[0].dims) == [1, -1] and not cfg.HasField("dynamic_batching")
    with pytest.raises(CheckError, match="no Triton data type"):
        tc.triton_dtype("complex64")


@pytest.mark.parametrize(("options", "kwargs", "message"), [
    ({"max_batch_size": -1}, {}, "--max-batch-size must be >= 0"),
    ({"preferred_batch_sizes": (16,)}, {}, "outside 1..--max-batch-size"),
    ({"instances": 0}, {}, "--instances must be >= 1"),
    ({"version": 0}, {}, "--version must be >= 1"),
    ({"kind": "tpu"}, {}, "--kind must be one of"),
    ({}, {"name": "../escape"}, "not a valid Triton model name"),
    ({}, {"name": "a/b"}, "not a valid Triton model name"),
    ({}, {"backend": "tensorrt"}, "--backend tensorrt cannot run"),
])
def test_bad_options_are_refused_before_anything_is_written(exported, tmp_path: Path, options, kwargs, message) -> None:
    with pytest.raises(UsageError, match=message):
        write_repository([exported("bridgetower-tiny", "itm")], tmp_path / "repo", tc.ServeOptions(**options), **kwargs)
    assert list(tmp_path.iterdir()) == []  # no repository, no staging leftovers


def test_failed_or_unvalidated_artifacts_are_refused(exported, tmp_path: Path) -> None:
    art = exported("bridgetower-tiny", "itm")
    failed = _copy(art, tmp_path / "failed", validation=lambda v: {**v, "passed": False, "summary": "logits off"})
    with pytest.raises(CheckError, match="failed validation .logits off."):
        write_repository([failed], tmp_path / "repo", tc.ServeOptions())
    skipped = _copy(art, tmp_path / "skipped", validation={"passed": None, "summary": "validation skipped"})
    with pytest.raises(UsageError, match="without validation"):
        write_repository([skipped], tmp_path / "repo", tc.ServeOptions())
    assert not (tmp_path / "repo").exists()


def test_repository_is_extended_not_clobbered_unless_force(exported, tmp_path: Path) -> None:
    bt, cap = exported("bridgetower-tiny", "itm"), exported("blip-tiny", "caption")
    repo = tmp_path / "repo"
    write_repository([bt], repo, tc.ServeOptions(), name="bt")
    before = (repo / "bt/config.pbtxt").read_text()
    write_repository([cap], repo, tc.ServeOptions(), name="cap")
    assert sorted(p.name for p in repo.iterdir()) == ["bt", "cap", "cap_decoder", "cap_vision_encoder"]
    assert (repo / "bt/config.pbtxt").read_text() == before and (repo / "bt/1/model.onnx").is_file()
    with pytest.raises(UsageError, match=r"already holds model\(s\) \['bt'\]"):
        write_repository([bt], repo, tc.ServeOptions(max_batch_size=2), name="bt")
    assert (repo / "bt/config.pbtxt").read_text() == before  # the refused write changed nothing
    write_repository([bt], repo, tc.ServeOptions(max_batch_size=2), name="bt", force=True)
    assert sorted(p.name for p in repo.iterdir()) == ["bt"]  # --force: the repository replaced as a whole
    assert _configs(repo)["bt"].max_batch_size == 2
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging dirs left


def test_names_are_sanitised_and_collisions_refused(exported, tmp_path: Path) -> None:
    art = exported("bridgetower-tiny", "itm")
    odd = tmp_path / "my model@v1"
    shutil.copytree(art, odd)
    assert write_repository([odd], tmp_path / "repo", tc.ServeOptions()) == ["my_model_v1"]
    assert sanitize("../..") == "model" and sanitize(".hidden/x") == "hidden_x"
    twin = tmp_path / "b" / "my model@v1"
    shutil.copytree(art, twin)
    with pytest.raises(UsageError, match="would be written twice"):
        write_repository([odd, twin], tmp_path / "repo2", tc.ServeOptions())
    with pytest.raises(UsageError, match="--name names one model"):
        write_repository([odd, twin], tmp_path / "repo2", tc.ServeOptions(), name="x")
    assert not (tmp_path / "repo2").exists()


def test_cli_writes_a_repository_and_refuses_bad_values(exported, tmp_path: Path, capsys) -> None:
    from vlexport.cli import main

    art = exported("bridgetower-tiny", "itm")
    assert main(["triton", str(art), "-o", str(tmp_path / "repo"), "--ensemble", "--name", "bt"]) == 0
    assert "bt_model, bt_preprocess, bt_postprocess, bt" in capsys.readouterr().out
    assert all(c.name for c in _configs(tmp_path / "repo").values())
    assert main(["triton", str(art), "-o", str(tmp_path / "r2"), "--instances", "0"]) == 2
    assert "--instances must be >= 1" in capsys.readouterr().err
    assert main(["triton", str(tmp_path / "repo"), "-o", str(tmp_path / "r3")]) == 2  # a repository is no artifact


@pytest.mark.parametrize(("preset", "task", "components"), [("blip-tiny", "vqa", ["decoder", "question_encoder",
                                                                                   "vision_encoder"]),
                                                            ("blip2-flan-t5-tiny", "generate", ["decoder", "encoder",
                                                                                                "image_encoder"])])
def test_vqa_and_t5_artifacts_get_a_bls_model_over_every_component(exported, tmp_path: Path, preset, task,
                                                                  components) -> None:
    write_repository([exported(preset, task)], tmp_path / "repo", CPU_PY, name="g", backend="python-onnxruntime")
    cfg = _configs(tmp_path / "repo")
    assert sorted(cfg) == ["g", *(f"g_{c}" for c in components)]
    meta = json.loads((tmp_path / "repo/g/1/serve.json").read_text())
    assert sorted(meta["components"]) == components and cfg["g"].backend == "python"
