"""Generative export: the four tiny families export, validate token-exact, and generate what HF generate()
does.

Cases: "blip-tiny" caption and vqa, "blip2-opt-tiny" generate, "blip2-flan-t5-tiny" generate. Every check
compares against the eager model's generate() tokens, never only that something ran.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from vlexport.contracts.manifest import Manifest
from vlexport.errors import CheckError, UsageError, ValidationError
from vlexport.models.inputs import InputShape
from vlexport.runtime import load_artifact
from vlexport.runtime.generate import Generator
from vlexport.validate import raise_on_failure
from vlexport.validate.generation import validate_generation
from vlexport.weights import load_model, resolve

_CASES = [
    ("blip-tiny", "caption", ("vision_encoder", "decoder")),
    ("blip-tiny", "vqa", ("vision_encoder", "question_encoder", "decoder")),
    ("blip2-opt-tiny", "generate", ("image_encoder", "decoder")),
    ("blip2-flan-t5-tiny", "generate", ("image_encoder", "encoder", "decoder")),
]
# Both tests of a case on one worker (--dist loadgroup): the second reuses the first's export and eager
# model instead of waiting, idle, on the other worker's export lock.
CASES = [
    pytest.param(p, t, c, id=f"{p}-{t}", marks=pytest.mark.xdist_group(f"generation-{p}-{t}"))
    for p, t, c in _CASES
]

_models: dict[tuple[str, str], torch.nn.Module] = {}


def eager(preset: str, task: str) -> torch.nn.Module:
    """The eager reference with the export's seeded random weights (loaded once per module)."""
    if (preset, task) not in _models:
        _models[preset, task] = load_model(resolve(preset, random_weights=True), task)
    return _models[preset, task]


@pytest.mark.parametrize(("preset", "task", "components"), CASES)
def test_tiny_generative_export_validates_token_exact(
    exported, preset: str, task: str, components: tuple
) -> None:
    out = exported(preset, task)
    manifest = Manifest.read(out)
    v = manifest.validation
    assert v.passed is True, v.failures
    g = v.generation
    assert g["tokens_equal"] and g["samples"] >= 4 and len(g["batch_sizes"]) == 2 and g["num_beams"] == 3
    assert g["new_tokens_compared"] >= 4 * 2 * 2 * 1  # every sample, batch size and mode produced tokens
    assert v.max_abs_error["logits"] < 1e-4
    assert {c["shape"] for c in v.checks} >= {"b1 greedy", "b4 greedy", "b1 beam3", "b4 beam3"}
    # One merged decoder (past of length 0 on the first step), every file named in the manifest.
    assert tuple(manifest.components) == components
    for comp in manifest.components.values():
        assert (out / comp.file).is_file()
    decoder = manifest.components["decoder"]
    past = [t for t in decoder.inputs if t.name.startswith("past_key_values.") and ".encoder." not in t.name]
    assert past and all(t.shape[2] == "past_sequence" for t in past)
    assert {t.name for t in decoder.outputs} == {"logits"} | {
        p.name.replace("past_key_values.", "present.") for p in past
    }
    mask = next((t for t in decoder.inputs if t.name == "attention_mask"), None)
    assert mask is None or mask.shape == ["batch", "total_sequence"]  # its own dim, not past + sequence
    # Settings and a placeholder tokenizer (random weights, no source tokenizer) let the directory run alone.
    assert manifest.generation["eos_token_id"] and manifest.tokenizer["kind"] == "placeholder"
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(manifest.files)
    tok = json.loads((out / "tokenizer.json").read_text())
    assert len(tok["model"]["vocab"]) == manifest.generation["vocab_size"]


def _fresh_inputs(model, task_spec, batch: int, seed: int) -> dict[str, torch.Tensor]:
    return task_spec.make_inputs(model.config, InputShape(batch, 7), seed)


@pytest.mark.parametrize(("preset", "task", "components"), CASES)
def test_runtime_generates_what_hf_generate_does(exported, preset: str, task: str, components: tuple) -> None:
    """Independent of the validator: new seeds, batch 3 with prompts of 3 different lengths, greedy and
    beam."""
    out = exported(preset, task)
    model = eager(preset, task)
    artifact = load_artifact(out, device="cpu")
    gen = Generator(artifact)
    inputs = _fresh_inputs(model, artifact.task_spec, 3, seed=77)
    if "attention_mask" in inputs:
        assert len(set(inputs["attention_mask"].sum(1).tolist())) == 3  # three prompt lengths, padded
    for kwargs in ({"num_beams": 1}, {"num_beams": 2}, {"num_beams": 1, "min_new_tokens": 9}):
        with torch.no_grad():
            ref = model.generate(**inputs, max_new_tokens=9, do_sample=False, **kwargs).numpy()
        got = gen.generate(**{k: v.numpy() for k, v in inputs.items()}, max_new_tokens=9, **kwargs)
        np.testing.assert_array_equal(got.sequences, ref, err_msg=str(kwargs))


def test_caption_without_prompt_and_vqa_output_are_decoder_tokens(exported) -> None:
    model = eager("blip-tiny", "caption")
    gen = Generator(load_artifact(exported("blip-tiny", "caption"), device="cpu"))
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = model.generate(pixel_values=pixels, max_new_tokens=6).numpy()
    got = gen.generate(pixels.numpy(), max_new_tokens=6)
    np.testing.assert_array_equal(got.sequences, ref)
    assert got.prompt_length == 1 and (got.sequences[:, 0] == model.config.text_config.bos_token_id).all()


def test_decode_binds_unchanged_inputs_once_with_logits_of_fresh_bindings(exported, monkeypatch) -> None:
    """StepBinding (runtime/decoder_session.py): the image's cross-attention K/V are bound once per request,
    not at every step, and every step's logits are bitwise those of the loop before (a fresh IO binding of
    every input at every step)."""
    from vlexport.runtime import decoder_session

    gen = Generator(load_artifact(exported("blip-tiny", "caption"), device="cpu"))
    dec = gen.decoder
    bound: list[str] = []
    bind = decoder_session.StepBinding._bind
    monkeypatch.setattr(
        decoder_session.StepBinding, "_bind", lambda s, n, v: (bound.append(n), bind(s, n, v))
    )

    class Fresh:  # the loop before: each step after the prompt's binds every input again
        def step(self, env, mask, **kw):
            return dec.step(env, mask, run_next=dec.run, **kw)

    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3)).numpy()
    settings = {"max_new_tokens": 6, "min_new_tokens": 6, "num_beams": 2, "output_logits": True}
    new = gen.generate(pixels, **settings)
    cross = [n for n in dec.input_names if ".encoder." in n]
    steps = bound.count("input_ids")
    assert cross and steps == 6 and all(bound.count(n) == 1 for n in cross), (steps, sorted(set(bound)))
    bound.clear()
    old = gen.generate(pixels, **settings, decoder=Fresh())
    assert all(bound.count(n) == steps for n in cross)  # the loop before: at every step
    np.testing.assert_array_equal(new.sequences, old.sequences)
    assert len(new.logits) == len(old.logits) == steps
    for a, b in zip(new.logits, old.logits):
        np.testing.assert_array_equal(a, b)


def test_blip2_prompt_without_image_tokens_is_refused(exported) -> None:
    gen = Generator(load_artifact(exported("blip2-opt-tiny", "generate"), device="cpu"))
    with pytest.raises(UsageError, match="exactly num_query_tokens=8 image tokens"):
        gen.generate(np.zeros((1, 3, 32, 32), np.float32), np.array([[2, 50, 60]]), max_new_tokens=3)
    t5 = Generator(load_artifact(exported("blip2-flan-t5-tiny", "generate"), device="cpu"))
    with pytest.raises(UsageError, match="prompt"):
        t5.generate(np.zeros((1, 3, 32, 32), np.float32), max_new_tokens=3)


def test_validation_names_sample_step_and_tokens_on_a_broken_cache(exported, monkeypatch) -> None:
    """A decode loop that forgets the cache between steps must fail validation, not pass quietly."""
    from vlexport.runtime.decoder_session import KVCacheStep

    def forgetful_next(self, tokens):
        n = tokens.shape[0]
        self.past = self.session.empty_past(n)  # the cache is dropped: each token is decoded without context
        self.mask = np.ones((n, 1), dtype=np.int64)
        return self._run(tokens.reshape(-1, 1).astype(np.int64), {}, np.zeros((n, 1), dtype=np.int64))

    monkeypatch.setattr(KVCacheStep, "next", forgetful_next)
    report = validate_generation(
        eager("blip-tiny", "caption"), load_artifact(exported("blip-tiny", "caption"), device="cpu")
    )
    assert not report.passed
    f = report.failures[0]
    assert (
        f["sample"] is not None
        and f["step"] >= 1
        and "artifact" in f["detail"]
        and "HF generate()" in f["detail"]
    )
    with pytest.raises(ValidationError, match=r"sample \d+: b\d \w+: tokens diverge at step \d+"):
        raise_on_failure(report, "blip-tiny caption")


def test_decoder_graph_runs_with_an_empty_past(exported) -> None:
    """The merged decoder: the first step is the same graph with past length 0 (no decoder_with_past copy)."""
    out = exported("blip2-opt-tiny", "generate")
    names = {p.name for p in (out).iterdir() if p.suffix == ".onnx"}
    assert names == {"image_encoder.onnx", "decoder.onnx"}
    graph = onnx.load(str(out / "decoder.onnx"), load_external_data=False).graph
    assert any(i.name == "past_key_values.0.key" for i in graph.input)


def test_decode_step_sessions_keep_the_attention_scale_out_of_fusedmatmul(exported, tmp_path) -> None:
    """The decoder is loaded for one-row steps: ORT must not fold the attention scale into FusedMatMul's alpha
    (MLAS runs one-row products through its GEMV kernels only at alpha 1). Read off the graph ORT optimized;
    the encoder keeps the fusion."""
    import onnxruntime as ort

    from vlexport.runtime.onnx_session import session_options

    out = exported("blip-tiny", "caption")

    def alphas(component: str, decode_step: bool) -> list[float]:
        opts, disabled = session_options(decode_step=decode_step)
        opts.optimized_model_filepath = str(tmp_path / f"{component}-{decode_step}.onnx")
        ort.InferenceSession(
            str(out / f"{component}.onnx"), opts, ["CPUExecutionProvider"], disabled_optimizers=disabled
        )
        graph = onnx.load(opts.optimized_model_filepath).graph
        return [
            a.f for n in graph.node if n.op_type == "FusedMatMul" for a in n.attribute if a.name == "alpha"
        ]

    assert any(a != 1.0 for a in alphas("decoder", False))  # what ORT does to this graph by default
    assert alphas("decoder", True) and all(a == 1.0 for a in alphas("decoder", True))
    artifact = load_artifact(out, device="cpu")
    assert artifact.components["decoder"].decode_step is True
    assert artifact.components["vision_encoder"].decode_step is False


def test_tampered_artifacts_fail_with_check_errors(exported, tmp_path) -> None:
    import shutil

    src = exported("blip-tiny", "caption")
    # A component entry missing from the manifest (the directory no longer describes a complete artifact).
    d1 = tmp_path / "no-decoder"
    shutil.copytree(src, d1)
    m = json.loads((d1 / "manifest.json").read_text())
    del m["components"]["decoder"]
    (d1 / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CheckError, match="lacks component"):
        Generator(load_artifact(d1, device="cpu"))
    # Files swapped behind the manifest's back (sizes patched so only the graphs tell).
    d2 = _decoder_swapped(src, tmp_path / "swapped", "vision_encoder.onnx")
    with pytest.raises(CheckError, match="does not match its files"):
        Generator(load_artifact(d2, device="cpu"))


def _decoder_swapped(src: Path, out: Path, other: str) -> Path:
    """A copy of ``src`` whose decoder.onnx is its ``other`` graph, the manifest's size patched so that only
    the graphs tell."""
    import shutil

    shutil.copytree(src, out)
    m = json.loads((out / "manifest.json").read_text())
    (out / "decoder.onnx").write_bytes((src / other).read_bytes())
    m["components"]["decoder"]["size_bytes"] = (out / "decoder.onnx").stat().st_size
    (out / "manifest.json").write_text(json.dumps(m))
    return out


def test_external_data_path_of_large_models_on_the_tiny_preset(tmp_path, monkeypatch) -> None:
    """blip2-opt-2.7b's graphs exceed protobuf's 2 GiB: their weights go to external data files. The same code
    path, forced on the tiny twin: every component keeps its weights beside it and still validates."""
    from vlexport.export import onnx as onnx_export
    from vlexport.pipeline import ExportJob, run_export

    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_THRESHOLD", 0)
    out = tmp_path / "opt-external"
    manifest = run_export(ExportJob("blip2-opt-tiny", out, random_weights=True))
    assert manifest.validation.passed and manifest.validation.generation["tokens_equal"]
    for comp in manifest.components.values():
        data = (out / comp.external_data).stat().st_size if comp.external_data else 0
        # tiny tensors stay inline
        assert data > 0 and data + (out / comp.file).stat().st_size == comp.size_bytes
    model = eager("blip2-opt-tiny", "generate")
    inputs = _fresh_inputs(model, load_artifact(out).task_spec, 2, seed=3)
    with torch.no_grad():
        ref = model.generate(**inputs, max_new_tokens=5, num_beams=2).numpy()
    got = Generator(load_artifact(out, device="cpu")).generate(
        **{k: v.numpy() for k, v in inputs.items()}, max_new_tokens=5, num_beams=2
    )
    np.testing.assert_array_equal(got.sequences, ref)


def test_local_checkpoint_copies_tokenizer_and_processor_files(tmp_path, capsys) -> None:
    """A save_pretrained directory with its tokenizer and preprocessor config: both travel with the artifact
    and `run` uses them (the real-checkpoint path, on a tiny model)."""
    from PIL import Image
    from transformers import PreTrainedTokenizerFast

    from vlexport.cli import main
    from vlexport.pipeline import ExportJob, run_export
    from vlexport.runtime.preprocess import image_settings
    from vlexport.runtime.tokenizer import build_placeholder

    model = eager("blip-tiny", "caption")
    src = tmp_path / "blip-local"
    model.save_pretrained(src)
    text = model.config.text_config
    settings = {
        "pad_token_id": text.pad_token_id,
        "bos_token_id": text.bos_token_id,
        "sep_token_id": text.sep_token_id,
        "eos_token_id": [text.sep_token_id],
    }
    fast = PreTrainedTokenizerFast(
        tokenizer_object=build_placeholder(text.vocab_size, settings, (("bos_token_id",), ("sep_token_id",))),
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
    )
    fast.save_pretrained(src)
    (src / "preprocessor_config.json").write_text(
        json.dumps(
            {"image_mean": [0.5] * 3, "image_std": [0.25] * 3, "rescale_factor": 1 / 255, "resample": 3}
        )
    )
    out = tmp_path / "artifact"
    manifest = run_export(ExportJob(str(src), out))
    assert manifest.task == "caption" and manifest.weights["kind"] == "local"
    assert manifest.validation.passed and manifest.tokenizer["kind"] == "copied"
    assert {"tokenizer.json", "preprocessor_config.json"} <= set(manifest.files)
    s = image_settings(out, Manifest.read(out))
    assert s.source == "preprocessor_config.json" and s.std == (0.25, 0.25, 0.25)
    image = tmp_path / "img.png"
    Image.fromarray(np.full((40, 50, 3), 128, np.uint8)).save(image)
    assert main(["run", str(out), "--image", str(image), "--text", "a photo of", "--ids"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("a photo of") and "placeholder" not in captured.err


def test_placeholder_tokenizer_is_deterministic_with_specials_at_config_ids(exported) -> None:
    from vlexport.runtime.tokenizer import ArtifactTokenizer, build_placeholder

    out = exported("blip2-opt-tiny", "generate")
    manifest = Manifest.read(out)
    s = manifest.generation
    a = build_placeholder(s["vocab_size"], s, (("bos_token_id",), ())).to_str()
    assert a == build_placeholder(s["vocab_size"], s, (("bos_token_id",), ())).to_str()
    tok = ArtifactTokenizer(out, manifest)
    ids = tok.encode("Question: what is it? Answer:")
    assert ids[0] == s["bos_token_id"] and max(ids) < s["vocab_size"]
    assert tok.decode(ids) == "Question: what is it? Answer:"
    assert tok.tok.tok.token_to_id("<image>") == s["image_token_id"]


def test_one_shot_load_holds_the_encoders_or_the_decoder_never_both(exported, tmp_path) -> None:
    """`vlexport run` loads with ``one_shot=True``: each component loads on first use, the encoders are given
    back before the decoder loads (BLIP-2 OPT-2.7b int4 mix: run peak RSS 4.54 -> 3.04 GB), and the tokens are
    those of a normal load. A swapped file still fails, when its component loads."""
    from PIL import Image

    from vlexport.runtime import LazyComponent
    from vlexport.runtime.tasks import load

    src = exported("blip2-opt-tiny", "generate")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 56, 3), dtype=np.uint8))
    want = load(src, device="cpu").generate(image, max_new_tokens=6, return_ids=True).ids
    task = load(src, device="cpu", one_shot=True)
    comps = task.artifact.components
    assert set(comps) == {"image_encoder", "decoder"}
    assert all(isinstance(c, LazyComponent) and not c.loaded for c in comps.values())
    loads: list[tuple[str, list[str]]] = []  # (component loading, those loaded at that moment)
    for name, comp in comps.items():
        inner = comp._load

        def spy(inner=inner, name=name):
            loads.append((name, sorted(n for n, c in comps.items() if c.loaded)))
            return inner()

        comp._load = spy
    got = task.generate(image, max_new_tokens=6, return_ids=True).ids
    assert got == want
    assert loads == [("image_encoder", []), ("decoder", [])]
    assert not comps["image_encoder"].loaded and comps["decoder"].loaded
    # a second request loads the encoder again, beside the decoder: correct, only not one-shot any more
    assert task.generate(image, max_new_tokens=6, return_ids=True).ids == want

    lazy = load(
        _decoder_swapped(src, tmp_path / "swapped", "image_encoder.onnx"), device="cpu", one_shot=True
    )
    with pytest.raises(CheckError, match="does not match its files"):
        lazy.generate(image, max_new_tokens=2)
