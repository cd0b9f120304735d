"""`vlexport compile` for generative tasks: static-KV-cache decoder packages, token-exact with HF generate().

One package per generative family (BLIP caption, BLIP-2 with Flan-T5) is compiled (the `exported` fixture
shares it across tests and test files); its export already validated greedy and beam search, batch 1 and 4
with padded prompts, against HF ``generate()`` (validate/generation.py). AOTInductor CPU compiles cost ~1-2
min each on 2 busy cores, so the limits and the loader are checked on the caption package rather than on
packages of their own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from vlexport.cli import main
from vlexport.contracts.manifest import Manifest
from vlexport.errors import UsageError
from vlexport.models.inputs import InputShape
from vlexport.runtime import load_artifact
from vlexport.runtime.generate import Generator
from vlexport.runtime.preprocess import image_settings, load_image
from vlexport.runtime.static_step import META_STATIC
from vlexport.weights import load_model, resolve

MAX_LENGTH = 32  # static cache slots: validation needs prompt (<= 7 + queries) + 12 new tokens
COMPILE = {"backend": "aoti", "options": {"max_length": MAX_LENGTH, "max_batch": 12}}


def _checked(directory: Path) -> dict:
    manifest = json.loads((directory / "manifest.json").read_text())
    decoder = {t["name"]: t for t in manifest["components"]["decoder"]["inputs"]}
    assert decoder["cache_position"]["shape"] == ["sequence"]
    assert decoder["attention_mask"]["shape"] == ["batch", MAX_LENGTH]  # a mask over the static slots
    cache = [t for n, t in decoder.items() if n.startswith("cache.")]
    assert cache and all(t["shape"][0] == "batch" and t["shape"][2] == MAX_LENGTH for t in cache)
    assert [t["name"] for t in manifest["components"]["decoder"]["outputs"]] == [
        "logits"
    ]  # caches updated in place
    gen = manifest["validation"]["generation"]
    assert manifest["validation"]["passed"] and gen["tokens_equal"] and gen["new_tokens_compared"] >= 150
    assert gen["distinct_reference_tokens"] > 1  # the tokens check something
    return manifest


# The tests of one package on one worker (--dist loadgroup): the others would wait, idle, on its compile lock.
ONE_WORKER = pytest.mark.xdist_group("aoti-blip-caption")


@pytest.fixture(scope="module")
def caption(exported) -> Path:
    return exported("blip-tiny", "caption", **COMPILE)


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from PIL import Image

    path = tmp_path_factory.mktemp("img") / "photo.jpg"
    Image.fromarray((np.random.default_rng(0).random((60, 45, 3)) * 255).astype(np.uint8)).save(path)
    return path


@ONE_WORKER
def test_caption_package_validates_and_runs(caption: Path, image: Path, capsys) -> None:
    manifest = _checked(caption)
    assert manifest["backend"] == "aoti" and {c["file"] for c in manifest["components"].values()} == {
        "vision_encoder.pt2",
        "decoder.pt2",
    }
    assert main(["validate", str(caption)]) == 0  # tokens vs HF generate() again, from the directory alone
    capsys.readouterr()
    assert main(["run", str(caption), "--image", str(image), "--ids", "--max-new-tokens", "5"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1].removeprefix("ids: "))
    # What the eager model's generate() makes of the same preprocessed image.
    model = load_model(resolve("blip-tiny", random_weights=True), "caption")
    pixels = torch.from_numpy(load_image(image, image_settings(caption, Manifest.read(caption))))
    with torch.no_grad():
        ref = model.generate(pixel_values=pixels, max_new_tokens=5, do_sample=False)
    assert np.asarray(printed).ravel().tolist() == ref[0].tolist()


@ONE_WORKER
def test_bench_times_the_compiled_loop_with_token_parity(caption: Path) -> None:
    from vlexport.bench import BenchPlan, run_bench

    rows = run_bench(
        BenchPlan((str(caption),), batch_sizes=(2,), seq_len=5, warmup=1, iters=2, new_tokens=6, device="cpu")
    )
    assert [(r.backend, r.batch) for r in rows] == [("eager", 2), ("aoti", 2)]
    aoti = rows[1]
    assert aoti.ok and aoti.parity["tokens"]["agreement"] == 1.0 and aoti.new_tokens == 6
    assert 0 < aoti.prefill_ms < aoti.latency_p50_ms and aoti.decode_ms_per_token > 0


def test_blip2_package_validates_token_exact(exported) -> None:
    # The encoder-decoder LM (its own static step, relative positions): the OPT decoder and BLIP VQA compile
    # the same way and are checked eagerly in test_compile_static_cache.py (one compile per family keeps CI
    # short). Its decoder is compiled frozen (--freeze yes: weights packed for oneDNN), the path --freeze
    # auto takes where oneDNN's GEMMs win; the caption package above takes the unfrozen one (tiny shapes).
    options = {**COMPILE["options"], "freeze": "yes"}
    out = exported("blip2-flan-t5-tiny", "generate", backend="aoti", options=options)
    manifest = _checked(out)
    assert set(manifest["components"]) == {"image_encoder", "encoder", "decoder"}
    static = json.loads(load_artifact(out, device="cpu").components["decoder"].metadata[META_STATIC])
    assert static["freezing"] == {"freeze": True, "how": "asked"}
    with zipfile.ZipFile(out / "decoder.pt2") as z:  # frozen: Inductor calls oneDNN over packed weights
        wrapper = next(n for n in z.namelist() if n.endswith(".wrapper.cpp"))
        assert "_linear_pointwise" in z.read(wrapper).decode()


def test_freeze_auto_keeps_the_faster_gemms_and_records_their_times(caption: Path, monkeypatch) -> None:
    from vlexport.export import decode_gemms

    static = json.loads(load_artifact(caption, device="cpu").components["decoder"].metadata[META_STATIC])
    measured = static["freezing"]
    assert measured["how"] == "measured" and measured["rows"] == [1, 12]
    assert measured["freeze"] == (measured["onednn_ms"] < measured["aten_ms"])
    with zipfile.ZipFile(caption / "decoder.pt2") as z:
        wrapper = z.read(next(n for n in z.namelist() if n.endswith(".wrapper.cpp"))).decode()
    assert ("_linear_pointwise" in wrapper) == measured["freeze"]
    # The choice follows the times, both ways (the tiny decoder's Linears, times faked per kernel).
    decoder = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Linear(32, 8), torch.nn.Linear(8, 32))
    for aten, onednn in ((2.0, 1.0), (1.0, 2.0)):
        monkeypatch.setattr(decode_gemms, "_times", lambda x, w, a=aten, o=onednn: (a, o))
        choice = decode_gemms.choose_freezing("auto", decoder, (1, 4))
        assert choice.freeze is (onednn < aten)
        # three Linears, two row counts
        assert (choice.aten_ms, choice.onednn_ms) == (6 * aten * 1e3, 6 * onednn * 1e3)
    assert decode_gemms.choose_freezing("no", decoder, (1, 4)) == decode_gemms.FreezeChoice(False, "asked")


@ONE_WORKER
def test_requests_beyond_the_compiled_limits_are_usage_errors(caption: Path) -> None:
    generator = Generator(load_artifact(caption))
    size = json.loads((caption / "manifest.json").read_text())["image_size"]
    pixels = np.zeros((1, 3, size, size), dtype=np.float32)
    with pytest.raises(UsageError, match=f"static cache of {MAX_LENGTH}"):
        generator.generate(pixels, max_new_tokens=MAX_LENGTH)  # + the [bos] prompt: one slot too many
    with pytest.raises(UsageError, match="more than the 12 the package was compiled for"):
        generator.generate(np.repeat(pixels, 5, axis=0), num_beams=3, max_new_tokens=3)
    out = generator.generate(np.repeat(pixels, 4, axis=0), num_beams=3, max_new_tokens=3)
    assert out.new_tokens.shape[0] == 4  # 12 rows: the bucket's edge still runs


def test_cuda_package_without_a_gpu_is_a_usage_error(tmp_path: Path) -> None:
    from vlexport.runtime.components import AotiComponent

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    fake = tmp_path / "decoder.pt2"
    with zipfile.ZipFile(fake, "w") as z:
        z.writestr(
            "decoder/data/aotinductor/model/x.wrapper_metadata.json", json.dumps({"AOTI_DEVICE_KEY": "cuda"})
        )
    with pytest.raises(UsageError, match="compiled for CUDA"):
        AotiComponent(fake)


_FRESH = """
import json, sys
import numpy as np

class NoTransformers:
    def find_spec(self, name, path=None, target=None):
        if name == "transformers" or name.startswith("transformers."):
            raise ImportError("transformers is blocked in this process")
        return None

sys.meta_path.insert(0, NoTransformers())
from vlexport.runtime import load_artifact
from vlexport.runtime.generate import Generator

x = np.load(sys.argv[2])
generator = Generator(load_artifact(sys.argv[1]))
out = [generator.generate(x["pixel_values"], max_new_tokens=6, num_beams=k).sequences.tolist()
       for k in (1, 2)]
assert not any(m.split(".")[0] == "transformers" for m in sys.modules)
print(json.dumps(out))
"""


@ONE_WORKER
def test_package_generates_in_a_process_without_transformers(caption: Path, tmp_path: Path) -> None:
    source = resolve("blip-tiny", random_weights=True)
    pixels = (
        source.family.task("caption").make_inputs(source.config, InputShape(2, 0), 3)["pixel_values"].numpy()
    )
    np.savez(tmp_path / "x.npz", pixel_values=pixels)  # two images, no text prompt
    generator = Generator(load_artifact(caption))
    here = [generator.generate(pixels, max_new_tokens=6, num_beams=k).sequences.tolist() for k in (1, 2)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run(
        [sys.executable, "-c", _FRESH, str(caption), str(tmp_path / "x.npz")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == here  # greedy and beam, token for token


def test_compile_options_are_checked_before_any_work(tmp_path: Path, capsys) -> None:
    import importlib.util

    base = ["compile", "blip-tiny", "--task", "caption", "--random-weights", "-o", str(tmp_path / "x")]
    assert main([*base, "--max-length", "8"]) == 2 and "--max-length must be" in capsys.readouterr().err
    assert main([*base, "--max-batch", "0"]) == 2 and "--max-batch must be" in capsys.readouterr().err
    if importlib.util.find_spec("torchao") is None:
        assert (
            main([*base, "--precision", "int8-weight"]) == 2
            and "pip install torchao" in capsys.readouterr().err
        )
    assert main([*base, "--freeze", "yes", "--precision", "fp16"]) == 2
    assert "Drop --freeze" in " ".join(capsys.readouterr().err.split())
    assert not (tmp_path / "x").exists()
