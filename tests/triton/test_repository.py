"""`vlexport triton` without a server: every config.pbtxt parses into tritonclient's ModelConfig, the mapping
of names, dtypes and batch dims is exact, and bad options / artifacts / names are refused before any write."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as pb

from vlexport.contracts.manifest import Component, TensorSpec
from vlexport.errors import CheckError, UsageError
from vlexport.serve import triton_config as tc
from vlexport.serve.triton_repo import sanitize, write_repository

CPU_PY = tc.ServeOptions(kind="cpu", backend="python-onnxruntime", ensemble=True)
GEN_PY = tc.ServeOptions(kind="cpu", backend="python-onnxruntime")  # --ensemble is refused for generation


def _configs(repo: Path) -> dict[str, pb.ModelConfig]:
    return {
        p.parent.name: text_format.Parse(p.read_text(), pb.ModelConfig()) for p in repo.glob("*/config.pbtxt")
    }


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
        "input_ids": ("TYPE_INT64", [-1]),
        "attention_mask": ("TYPE_INT64", [-1]),
        "pixel_values": ("TYPE_FP32", [3, 64, 64]),
        "pixel_mask": ("TYPE_INT64", [64, 64]),
    }
    assert [(o.name, list(o.dims)) for o in model.output] == [("logits", [2])]
    assert model.dynamic_batching.max_queue_delay_microseconds == 100
    assert [(g.kind, g.count) for g in model.instance_group] == [(pb.ModelInstanceGroup.KIND_CPU, 1)]
    ens = cfg["bt"]
    assert ens.platform == "ensemble" and [s.model_name for s in ens.ensemble_scheduling.step] == [
        "bt_preprocess",
        "bt_model",
        "bt_postprocess",
    ]
    assert sorted(o.name for o in ens.output) == ["match_logit", "match_probability"]
    pre = cfg["bt_preprocess"]  # preprocessing outputs = the component's inputs, batch dim included
    assert [(o.name, list(o.dims)) for o in pre.output][2] == ("pixel_values", [-1, 3, 64, 64])
    assert (tmp_path / "repo/bt_model/1/model.onnx").stat().st_size == (art / "model.onnx").stat().st_size
    assert (tmp_path / "repo/bt_preprocess/1/artifact/manifest.json").is_file()
    assert "vlexport.serve.py_component" in (tmp_path / "repo/bt_model/1/model.py").read_text()


@pytest.mark.parametrize(
    ("kind", "backend", "platform"),
    [
        ("gpu", "onnxruntime", "onnxruntime_onnx"),
        ("cpu", "onnxruntime", "onnxruntime_onnx"),
        ("gpu", "python-onnxruntime", ""),
    ],
)
def test_generative_repository_has_components_and_bls_model(
    exported, tmp_path: Path, kind, backend, platform
) -> None:
    art = exported("blip-tiny", "caption")
    opts = tc.ServeOptions(
        kind=kind, backend=backend, max_batch_size=4, preferred_batch_sizes=(2, 4), instances=2
    )
    write_repository([art], tmp_path / "repo", opts, name="cap", backend=backend)
    cfg = _configs(tmp_path / "repo")
    assert sorted(cfg) == ["cap", "cap_vision_encoder"]  # the decoder runs inside "cap": no model of its own
    enc = cfg["cap_vision_encoder"]
    assert enc.platform == platform and enc.max_batch_size == 4
    assert list(enc.dynamic_batching.preferred_batch_size) == [2, 4]
    pixels = next(i for i in enc.input if i.name == "pixel_values")
    assert list(pixels.dims) == [3, 64, 64]
    kind_enum = pb.ModelInstanceGroup.KIND_GPU if kind == "gpu" else pb.ModelInstanceGroup.KIND_CPU
    assert [(g.kind, g.count) for g in enc.instance_group] == [(kind_enum, 2)]
    if backend == "onnxruntime":
        assert enc.optimization.graph.level == 1 and enc.default_model_filename == "model.onnx"
    bls = cfg["cap"]
    assert bls.backend == "python" and bls.max_batch_size == 0
    assert [(i.name, i.optional) for i in bls.input][:2] == [("IMAGE", False), ("TEXT", True)]
    meta = json.loads((tmp_path / "repo/cap/1/serve.json").read_text())
    assert meta["components"] == {"vision_encoder": "cap_vision_encoder"}
    assert meta["decoder"] == {"file": "decoder/decoder.onnx", "device": kind} and meta["max_rows"] == 4
    decoder = json.loads((art / "manifest.json").read_text())["components"]["decoder"]["file"]
    assert (tmp_path / "repo/cap/1/decoder/decoder.onnx").read_bytes() == (art / decoder).read_bytes()
    ort = "onnxruntime-gpu" if kind == "gpu" else "onnxruntime"  # what the in-process decoder imports
    assert f"{ort}>=1.20,<2" in (tmp_path / "repo/requirements.txt").read_text().splitlines()


def test_tensorrt_and_pytorch_configs_and_the_profile_bound_max_batch(exported, tmp_path: Path) -> None:
    art = exported("bridgetower-tiny", "itm")
    trt = tmp_path / "trt"
    _copy(
        art,
        trt,
        backend="tensorrt",
        derived_from={"backend": "onnx", "shapes": {"batch": [1, 2, 4]}},
        components=lambda c: {"model": {**c["model"], "file": "model.plan"}},
        sha256=lambda h: {("model.plan" if k == "model.onnx" else k): v for k, v in h.items()},
    )
    (trt / "model.onnx").rename(trt / "model.plan")  # same bytes: only the config is under test here
    with pytest.raises(UsageError, match="profile allows batches up to 4"):
        write_repository([trt], tmp_path / "r1", tc.ServeOptions(backend="tensorrt", max_batch_size=8))
    assert not (tmp_path / "r1").exists()
    write_repository([trt], tmp_path / "r1", tc.ServeOptions(backend="tensorrt", max_batch_size=4))
    cfg = _configs(tmp_path / "r1")["trt"]
    assert cfg.platform == "tensorrt_plan" and cfg.max_batch_size == 4 and cfg.optimization.cuda.graphs
    assert (tmp_path / "r1/trt/1/model.plan").is_file()
    pt2 = tmp_path / "pt2"
    _copy(
        art,
        pt2,
        backend="aoti",
        components=lambda c: {"model": {**c["model"], "file": "model.pt2"}},
        sha256=lambda h: {("model.pt2" if k == "model.onnx" else k): v for k, v in h.items()},
    )
    (pt2 / "model.onnx").rename(pt2 / "model.pt2")
    write_repository([pt2], tmp_path / "r2", tc.ServeOptions())
    cfg = _configs(tmp_path / "r2")["pt2"]
    assert cfg.backend == "pytorch" and cfg.default_model_filename == "model.pt2"
    with pytest.raises(UsageError, match="--backend onnxruntime cannot run"):
        write_repository([pt2], tmp_path / "r3", tc.ServeOptions(), backend="onnxruntime")


@pytest.mark.parametrize(
    ("dtype", "triton"),
    [
        ("float16", "TYPE_FP16"),
        ("bfloat16", "TYPE_BF16"),
        ("int64", "TYPE_INT64"),
        ("bool", "TYPE_BOOL"),
        ("float32", "TYPE_FP32"),
        ("int32", "TYPE_INT32"),
    ],
)
def test_dtypes_map_exactly(dtype: str, triton: str) -> None:
    comp = Component(
        "c", "c.onnx", [TensorSpec("x", dtype, ["batch", 3])], [TensorSpec("y", dtype, ["batch"])]
    )
    cfg = tc.parse(
        tc.to_text(
            tc.component_config("c", comp, tc.ServeOptions(), max_batch_size=2, model_file="model.onnx")
        )
    )
    assert pb.DataType.Name(cfg.input[0].data_type) == triton and list(cfg.input[0].dims) == [3]
    assert list(cfg.output[0].dims) == []  # [batch] -> a scalar per batch row


def test_static_batch_component_is_not_batched() -> None:
    comp = Component(
        "c", "c.onnx", [TensorSpec("x", "float32", [1, "sequence"])], [TensorSpec("y", "float32", [1])]
    )
    cfg = tc.component_config(
        "c", comp, tc.ServeOptions(max_batch_size=8), max_batch_size=8, model_file="model.onnx"
    )
    assert (
        cfg.max_batch_size == 0
        and list(cfg.input[0].dims) == [1, -1]
        and not cfg.HasField("dynamic_batching")
    )
    with pytest.raises(CheckError, match="no Triton data type"):
        tc.triton_dtype("complex64")


@pytest.mark.parametrize(
    ("options", "kwargs", "message"),
    [
        ({"max_batch_size": -1}, {}, "--max-batch-size must be >= 0"),
        ({"preferred_batch_sizes": (16,)}, {}, "outside 1..--max-batch-size"),
        ({"instances": 0}, {}, "--instances must be >= 1"),
        ({"version": 0}, {}, "--version must be >= 1"),
        ({"kind": "tpu"}, {}, "--kind must be one of"),
        ({}, {"name": "../escape"}, "not a valid Triton model name"),
        ({}, {"name": "a/b"}, "not a valid Triton model name"),
        ({}, {"backend": "tensorrt"}, "--backend tensorrt cannot run"),
    ],
)
def test_bad_options_are_refused_before_anything_is_written(
    exported, tmp_path: Path, options, kwargs, message
) -> None:
    with pytest.raises(UsageError, match=message):
        write_repository(
            [exported("bridgetower-tiny", "itm")], tmp_path / "repo", tc.ServeOptions(**options), **kwargs
        )
    assert list(tmp_path.iterdir()) == []  # no repository, no staging leftovers


def test_failed_or_unvalidated_artifacts_are_refused(exported, tmp_path: Path) -> None:
    art = exported("bridgetower-tiny", "itm")
    failed = _copy(
        art, tmp_path / "failed", validation=lambda v: {**v, "passed": False, "summary": "logits off"}
    )
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
    # the BLS model is a python model
    assert sorted(p.name for p in repo.iterdir()) == [
        "bt",
        "cap",
        "cap_vision_encoder",
        "requirements.txt",
    ]
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
    # a repository is no artifact
    assert main(["triton", str(tmp_path / "repo"), "-o", str(tmp_path / "r3")]) == 2


@pytest.mark.parametrize(
    ("preset", "task", "components"),
    [
        ("blip-tiny", "vqa", ["question_encoder", "vision_encoder"]),
        ("blip2-flan-t5-tiny", "generate", ["encoder", "image_encoder"]),
    ],
)
def test_vqa_and_t5_artifacts_get_a_bls_model_over_every_component(
    exported, tmp_path: Path, preset, task, components
) -> None:
    write_repository(
        [exported(preset, task)], tmp_path / "repo", GEN_PY, name="g", backend="python-onnxruntime"
    )
    cfg = _configs(tmp_path / "repo")
    assert sorted(cfg) == ["g", *(f"g_{c}" for c in components)]
    meta = json.loads((tmp_path / "repo/g/1/serve.json").read_text())
    assert sorted(meta["components"]) == components and cfg["g"].backend == "python"
    assert (tmp_path / "repo/g/1" / meta["decoder"]["file"]).is_file()  # run by the generation model


# Run in a fresh interpreter, from a folder outside the checkout: what tritonserver's python stub does with a
# model.py, with a stand-in for triton_python_backend_utils. torch, transformers (and what only export needs)
# cannot be imported; every vlexport module must come from the repository's own copy.
_SERVED_PYTHON = r"""
import importlib.abc, importlib.util, json, sys, types
import numpy as np
BLOCKED = {"torch", "transformers", "onnx", "tritonclient", "safetensors", "rich", "vlexport_kernels"}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked)", name=name)
sys.meta_path.insert(0, Block())
sys.path = [p for p in sys.path if "wt-" not in p and "/work/main" not in p]  # no checkout on the path
class T:
    def __init__(self, name, value): self.name, self.value = name, np.asarray(value)
    def as_numpy(self): return self.value
pb = types.ModuleType("triton_python_backend_utils")
pb.Tensor = T
pb.get_input_tensor_by_name = lambda request, name: request.get(name)
pb.InferenceResponse = lambda output_tensors=(), error=None: {
    "out": {t.name: t.value for t in output_tensors}, "error": error}
pb.TritonError = str
sys.modules["triton_python_backend_utils"] = pb
job = json.loads(sys.stdin.read())
results = {}
for model, args in job["models"].items():
    spec = importlib.util.spec_from_file_location(f"m_{model}", args["model_repository"] + "/1/model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    instance = module.TritonPythonModel()
    instance.initialize(args)
    request = job["requests"].get(model)
    if request is not None:
        feeds = {k: T(k, np.array([bytes.fromhex(v) if k == "IMAGE" else v.encode() for v in vs],
                                  dtype=object))
                 for k, vs in request.items()}
        (response,) = instance.execute([feeds])
        results[model] = {"error": response["error"],
                          "out": {k: v.tolist() for k, v in response["out"].items()}}
    stray = [m.__name__ for m in list(sys.modules.values()) if m.__name__.split(".")[0] == "vlexport"
             and not (getattr(m, "__file__", None) or "").startswith(args["model_repository"])]
    results.setdefault(model, {})["stray"] = stray
for top in BLOCKED:
    assert top not in sys.modules, top
print(json.dumps(results))
"""


def _served(repo: Path, requests: dict[str, dict[str, list[str]]], cwd: Path) -> dict:
    import subprocess
    import sys

    from google.protobuf import json_format

    models = {}
    for d in sorted(repo.iterdir()):
        if (d / "1" / "model.py").is_file():
            config = json_format.MessageToDict(_configs(repo)[d.name], preserving_proto_field_name=True)
            models[d.name] = {
                "model_repository": str(d),
                "model_version": "1",
                "model_config": json.dumps(config),
            }
    env = {"PATH": "/usr/bin:/bin", "HOME": str(cwd)}  # no PYTHONPATH: the stub does not see the caller's
    results = {}
    for name, args in models.items():  # one process per model, as in the server
        job = json.dumps({"models": {name: args}, "requests": requests})
        done = subprocess.run(
            [sys.executable, "-c", _SERVED_PYTHON],
            check=False,
            input=job,
            capture_output=True,
            text=True,
            cwd=cwd,
            env=env,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        results.update(json.loads(done.stdout))
    return results


def test_python_models_run_without_torch_transformers_or_installed_vlexport(exported, tmp_path: Path) -> None:
    from tests.triton.client import image_bytes
    from vlexport.contracts.manifest import Manifest
    from vlexport.runtime.preprocess import image_settings, load_image
    from vlexport.runtime.texts import placeholder_batch as _placeholder_batch

    bt, cap, opt = (
        exported("bridgetower-tiny", "itm"),
        exported("blip-tiny", "caption"),
        exported("blip2-opt-tiny", "generate"),
    )
    repo = tmp_path / "repo"
    for name, art in (("itm", bt), ("cap", cap), ("opt", opt)):
        opts = CPU_PY if name == "itm" else GEN_PY
        write_repository([art], repo, opts, name=name, backend="python-onnxruntime")
    assert (repo / "requirements.txt").read_text().splitlines()[1:] == [
        "numpy>=1.24,<2",
        "onnxruntime>=1.20,<2",
        "pillow>=10,<14",
        "tokenizers>=0.20,<1",
    ]
    for model in ("itm_preprocess", "cap", "opt", "itm_model"):
        assert (repo / model / "1/vlexport/runtime/decode.py").read_text() == (
            Path(__file__).parents[2] / "vlexport/runtime/decode.py"
        ).read_text()  # the same file, copied
    image = image_bytes(4)
    texts = ["a cat on a mat", "two dogs"]
    got = _served(repo, {"itm_preprocess": {"IMAGE": [image.hex()], "TEXT": texts}}, tmp_path)
    assert sorted(got) == [
        "cap",
        "cap_vision_encoder",
        "itm_model",
        "itm_postprocess",
        "itm_preprocess",
        "opt",
        "opt_image_encoder",
    ]
    assert all(r["stray"] == [] for r in got.values()), got  # every vlexport module came from the copy
    out = got["itm_preprocess"]
    assert out["error"] is None, out["error"]
    ids, mask = _placeholder_batch(bt, texts)  # what `vlexport run` feeds, for the same image and texts
    (tmp_path / "img.png").write_bytes(image)
    pixels = load_image(tmp_path / "img.png", image_settings(bt, Manifest.read(bt)))
    assert out["out"]["input_ids"] == ids.tolist() and out["out"]["attention_mask"] == mask.tolist()
    np.testing.assert_array_equal(
        np.array(out["out"]["pixel_values"], np.float32), np.repeat(pixels, 2, axis=0)
    )
    assert np.array(out["out"]["pixel_mask"]).shape == (2, 64, 64)


def test_a_missing_package_is_named_as_a_missing_package(exported, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    write_repository(
        [exported("blip-tiny", "caption")], repo, GEN_PY, name="cap", backend="python-onnxruntime"
    )
    shim = (repo / "cap/1/model.py").read_text()
    (repo / "cap/1/model.py").write_text(
        shim.replace("sys.path.insert", "sys.modules['tokenizers'] = None\nsys.path.insert")
    )
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, str(repo / "cap/1/model.py")],
        check=False,
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert "needs the Python package that provides 'tokenizers'" in done.stderr, done.stderr[-2000:]
    assert "pip install -r requirements.txt" in done.stderr and "damaged" not in done.stderr
