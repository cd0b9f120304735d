"""Weight resolution: local save_pretrained dirs, random weights, and every way it can go wrong."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import BridgeTowerConfig, BridgeTowerForImageAndTextRetrieval

from vlexport.errors import CheckError, UsageError
from vlexport.models.inputs import InputShape
from vlexport.pipeline import ExportJob, run_export
from vlexport.weights import check_safetensors, load_model, resolve


def _save_tiny(path: Path, **overrides) -> BridgeTowerForImageAndTextRetrieval:
    config = BridgeTowerConfig(
        # BridgeTower's vision tower has hidden_size // 64 heads, so 64 is its smallest width.
        hidden_size=64,
        num_attention_heads=2,
        num_hidden_layers=1,
        text_config={
            "vocab_size": 300,
            "hidden_size": 64,
            "num_attention_heads": 2,
            "intermediate_size": 96,
            "num_hidden_layers": 1,
            "max_position_embeddings": 40,
        },
        vision_config={"hidden_size": 64, "num_hidden_layers": 1, "image_size": 48, "patch_size": 16},
        **overrides,
    )
    torch.manual_seed(3)
    model = BridgeTowerForImageAndTextRetrieval(config).eval()
    model.save_pretrained(path)
    return model


def test_local_dir_loads_saved_weights_exactly(tmp_path: Path) -> None:
    saved = _save_tiny(tmp_path / "m")
    source = resolve(str(tmp_path / "m"))
    assert source.origin["kind"] == "local"
    assert source.tasks[0] == "itm"  # from the config's architectures
    loaded = load_model(source, "itm")
    for (name, a), b in zip(saved.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name


def test_local_dir_of_unusual_size_exports_and_validates(tmp_path: Path) -> None:
    # Not a preset's sizes: 2 heads of 32, 48 px images, one layer, scaled_add link towers.
    # Shapes must come from the config.
    _save_tiny(tmp_path / "m", link_tower_type="scaled_add")
    manifest = run_export(ExportJob(str(tmp_path / "m"), tmp_path / "out", task="itm"))
    assert manifest.weights["kind"] == "local"
    assert manifest.validation.passed is True
    assert manifest.image_size == 48
    assert manifest.components["model"].inputs[2].shape == ["batch", 3, 48, 48]


def test_random_weights_are_seeded_and_not_degenerate() -> None:
    a = load_model(resolve("blip-tiny", random_weights=True, seed=1), "itm")
    b = load_model(resolve("blip-tiny", random_weights=True, seed=1), "itm")
    c = load_model(resolve("blip-tiny", random_weights=True, seed=2), "itm")
    wa, wb, wc = (m.vision_model.embeddings.patch_embedding.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    # BLIP's vision config defaults to initializer_range=1e-10; random weights must use a sane range.
    assert 0.005 < wa.std().item() < 0.1


def test_random_weights_replace_a_degenerate_initializer_range() -> None:
    # BLIP's vision config defaults to initializer_range=1e-10 (the full-size BLIP-2 presets ship it): weights
    # that small make every activation ~0 (measured: vision output std 8e-7), so random weights use 0.02.
    source = resolve("blip-tiny", random_weights=True)
    source.config.vision_config.initializer_range = 1e-10
    model = load_model(source, "itm")
    assert model.config.vision_config.initializer_range == 0.02
    # the model gets a copy; the source is as given
    assert source.config.vision_config.initializer_range == 1e-10
    assert 0.005 < model.vision_model.embeddings.patch_embedding.weight.std().item() < 0.1
    inputs = source.family.task("itm").make_inputs(model.config, InputShape(2, 5), 0)
    with torch.no_grad():
        image = model.vision_model(pixel_values=inputs["pixel_values"]).last_hidden_state
    assert image.std().item() > 0.1


def test_random_weights_untie_flan_t5_head() -> None:
    # The family's random_init (BLIP-2): T5 v1.1 gets its own LM head at std d_model**-0.5, as checkpoints
    # have it.
    lm = load_model(resolve("blip2-flan-t5-tiny", random_weights=True), "generate").language_model
    assert lm.lm_head.weight.data_ptr() != lm.shared.weight.data_ptr() and not lm.config.tie_word_embeddings
    assert lm.lm_head.weight.std().item() == pytest.approx(lm.config.d_model**-0.5, rel=0.1)
    opt = load_model(resolve("blip2-opt-tiny", random_weights=True), "generate").language_model
    # OPT: tied, untouched
    assert opt.lm_head.weight.data_ptr() == opt.get_input_embeddings().weight.data_ptr()


def test_no_weights_names_three_ways_out(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UsageError) as e:
        resolve("bridgetower-base")
    msg = str(e.value)
    assert "--random-weights" in msg and "local directory" in msg and "cache" in msg


def test_unknown_preset_suggests_close_names() -> None:
    with pytest.raises(UsageError, match="Did you mean 'blip-tiny'"):
        resolve("blip-tinyy")


def test_unsupported_task() -> None:
    source = resolve("altclip-tiny", random_weights=True)
    with pytest.raises(UsageError, match="Supported tasks: features"):
        source.check_task("itm")


def test_random_weights_open_every_family_task() -> None:
    # No checkpoint means no missing head: bridgetower-base's ITM head is as random as its trunk
    source = resolve("bridgetower-base", random_weights=True)
    assert source.check_task("itm") == "itm" and source.default_task == "features"
    assert set(source.tasks) == {"features", "itm", "itc", "mlm"}


def test_dir_without_config(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(UsageError, match="no config.json"):
        resolve(str(tmp_path))


def test_unsupported_model_type(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(UsageError, match="model_type 'bert' is not supported"):
        resolve(str(tmp_path))


def test_dir_without_safetensors(tmp_path: Path) -> None:
    _save_tiny(tmp_path)
    (tmp_path / "model.safetensors").rename(tmp_path / "pytorch_model.bin")
    with pytest.raises(UsageError, match="no \\*.safetensors"):
        resolve(str(tmp_path))


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_safetensors(tmp_path: Path, damage: str) -> None:
    _save_tiny(tmp_path)
    f = tmp_path / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x00" * 64)
    with pytest.raises(CheckError, match="model.safetensors"):
        resolve(str(tmp_path))


def test_check_safetensors_accepts_a_good_file(tmp_path: Path) -> None:
    _save_tiny(tmp_path)
    header = json.loads(check_safetensors(tmp_path / "model.safetensors"))
    assert any(k.endswith("itm_score.weight") or "itm" in k for k in header)


# ---------------------------------------------------------------- checkpoints must fill the task's class
# exactly
def _tiny_classes() -> list[tuple[str, str]]:
    """(tiny preset, task) for each distinct HF class of the tiny presets."""
    from vlexport.presets import PRESETS

    seen, cases = set(), []
    for preset in (p for p in PRESETS.values() if p.is_tiny):
        src = resolve(preset.name, random_weights=True)
        for task in preset.tasks:
            name = src.family.task(task).hf_class_name
            if name not in seen:
                seen.add(name)
                cases.append((preset.name, task))
    return cases


@pytest.mark.parametrize(("preset", "task"), _tiny_classes())
def test_complete_save_of_every_tiny_class_loads_cleanly(tmp_path: Path, preset: str, task: str) -> None:
    # Tied weights (LM heads) are absent from a complete save and must not count as missing.
    saved = load_model(resolve(preset, random_weights=True), task)
    saved.save_pretrained(tmp_path / "m")
    source = resolve(str(tmp_path / "m"))
    loaded = load_model(source, task)
    assert "new_weights" not in source.origin and len(source.origin["sha256"]) == 64
    for (name, a), b in zip(saved.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name


def test_an_unused_head_of_another_task_is_fine_a_missing_one_is_not(tmp_path: Path) -> None:
    _save_tiny(tmp_path / "m")  # BridgeTowerForImageAndTextRetrieval: no MLM head
    assert load_model(resolve(str(tmp_path / "m")), "features") is not None  # its ITM head is only unused
    with pytest.raises(
        CheckError,
        match=r"lacks 6 .* mlm_score\.bias.*export itm \(--task\).*--allow-new-weights "
        r"mlm_score\.\*",
    ):
        load_model(resolve(str(tmp_path / "m")), "mlm")


def test_allowed_new_weights_are_seeded_by_name(tmp_path: Path) -> None:
    _save_tiny(tmp_path / "m")
    heads = []
    for seed, global_seed in ((1, 0), (1, 99), (2, 0)):
        torch.manual_seed(global_seed)  # the global RNG must not matter: validation runs in another process
        source = resolve(str(tmp_path / "m"), seed=seed, allow_new_weights=("mlm_score.*",))
        heads.append(load_model(source, "mlm").mlm_score.transform.dense.weight.detach().clone())
        assert source.origin["new_weights"][0] == "mlm_score.bias" and len(source.origin["new_weights"]) == 6
        assert source.origin["new_weights_seed"] == seed
    assert torch.equal(heads[0], heads[1]) and not torch.equal(heads[0], heads[2])
    assert 0.01 < heads[0].std().item() < 0.04


def test_content_hash_sees_a_changed_value_under_the_same_header(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    from vlexport.weights import weights_sha256

    _save_tiny(tmp_path / "m")
    before = resolve(str(tmp_path / "m")).origin["sha256"]
    f = tmp_path / "m" / "model.safetensors"
    header = check_safetensors(f)
    tensors = load_file(f)
    tensors["itm_score.fc.bias"] += 1
    save_file(tensors, f, metadata={"format": "pt"})
    assert check_safetensors(f) == header
    # in the same process too: the memo keys on mtime and inode
    assert weights_sha256(tmp_path / "m") != before


def test_composed_preset_advice_names_dual_encoder(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UsageError, match="no upstream checkpoint.*vlexport dual-encoder") as e:
        resolve("vision-text-dual-encoder")
    assert "download" not in str(e.value)
