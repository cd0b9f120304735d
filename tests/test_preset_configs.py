"""The shipped configs are the real checkpoints' architectures, and the tiny twins really are tiny.

Every ``configs/<name>.json`` must load with transformers' config class for its ``model_type``. For the
full-size presets the architecture is built on the ``meta`` device (no allocation) and its parameter count
checked against the published size of the checkpoint, and the architecture-defining values are pinned
against the upstream ``config.json`` files, so a mistyped hidden size, layer count, vocabulary or special
token id fails here rather than as a shape error when real weights are loaded.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import transformers
from transformers import AutoConfig, PretrainedConfig

from vlexport.models import family_for_model_type
from vlexport.presets import PRESETS

FULL = [n for n, p in PRESETS.items() if not p.is_tiny]
TINY = [n for n, p in PRESETS.items() if p.is_tiny]

TINY_MAX_BYTES = 10 * 1024 * 1024  # fp32

# Parameter counts of the architecture class named by ``architectures[0]``, counted as
# ``sum(p.numel() for p in model.parameters())`` (tied weights once). The ranges are about +-1 %: wide
# enough for a transformers release to add or drop a bias, narrow enough that a wrong width, FFN size,
# layer count or vocabulary of any tower falls out. Smaller slips (a patch size, an eps, a token id) are
# caught by EXPECTED below, which pins the values themselves.
PARAM_RANGES: dict[str, tuple[float, float]] = {
    # BridgeTowerModel: RoBERTa-base text 124.6M + CLIP ViT-B/16 @288 85.9M + 2 x 6 cross-modal layers
    # (56.7M each side) + poolers/transforms/link towers = 326,347,008, the "326M fp32 parameters" the
    # full-size export test budgets for.
    "bridgetower-base": (323e6, 330e6),
    # + the ITM head (Linear(2 * 768, 2)): 326,350,082.
    "bridgetower-base-itm-mlm": (323e6, 330e6),
    # RoBERTa-large 355.4M + CLIP ViT-L/14 @294 303.4M + 2 x 6 cross-modal layers of width 1024 (100.8M
    # each) + ITM/MLM/ITC heads = 866,612,737.
    "bridgetower-large-itm-mlm-itc": (858e6, 875e6),
    # BLIP base retrieval, ViT-B/16 @384 + BERT-base with cross-attention: 223,744,258; the hub lists
    # "224M params" for Salesforce/blip-itm-base-coco.
    "blip-itm-base-coco": (221e6, 226e6),
    # Captioning: 223,971,644 unique parameters. The hub's "247M params" counts the LM head weight, tied to
    # the decoder's word embeddings (30524 x 768 = 23.4M), a second time (state_dict: 247,444,600).
    "blip-image-captioning-base": (221e6, 226e6),
    # VQA, text encoder + answer decoder: 361,230,140 unique; the hub's "385M" again counts the tied LM
    # head twice (state_dict: 384,703,096).
    "blip-vqa-base": (357e6, 365e6),
    # EVA ViT-g/14, 39 layers 985.95M + Q-Former 105.1M + projection 2.0M + OPT-2.7b 2.652B (LM head tied
    # to the embeddings, vocab 50304) = 3,744,761,856. The hub's "3.87B" counts the tied head (128.8M) twice.
    "blip2-opt-2.7b": (3.70e9, 3.78e9),
    # EVA ViT-g + Q-Former + Flan-T5-XL. The checkpoint holds 3.94B: flan-t5 has its own LM head
    # (tie_word_embeddings=false upstream). transformers 5 builds T5 with lm_head tied to `shared` and
    # unties it only when a checkpoint brings a different one, so the model built here counts
    # 3,876,648,448 (T5 2.784B); untied it is 3,942,446,592, as --random-weights builds it
    # (weights._sane_random_weights). The range admits both.
    "blip2-flan-t5-xl": (3.85e9, 3.96e9),
    # XLM-R large text 559.6M + CLIP ViT-L/14 @224 303.2M + projections 1.4M = 864,186,113; the hub
    # lists "864M params" for BAAI/AltCLIP.
    "altclip": (855e6, 873e6),
    # ViT-B/16 @224 with pooler 86.4M + BERT-base 109.5M + two 768->512 projections + logit scale
    # = 196,657,921.
    "vision-text-dual-encoder": (194e6, 199e6),
}

# Architecture-defining values of each upstream config.json (dotted paths into the config dict).
# Sources: the hub config.json files of each checkpoint (BridgeTower/*, Salesforce/blip-*, Salesforce/
# blip2-* at the revision that added image_token_index, BAAI/AltCLIP), and for the dual encoder the
# configs of google/vit-base-patch16-224 and bert-base-uncased.
_BT_BASE = {
    "architectures": None,  # filled per preset
    "hidden_size": 768,
    "num_hidden_layers": 6,
    "num_attention_heads": 12,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-05,
    "link_tower_type": "add",
    "share_cross_modal_transformer_layers": True,
    "share_link_tower_layers": False,
    "tie_word_embeddings": False,
    "init_layernorm_from_vision_encoder": False,
    "text_config.vocab_size": 50265,
    "text_config.hidden_size": 768,
    "text_config.num_hidden_layers": 12,
    "text_config.num_attention_heads": 12,
    "text_config.intermediate_size": 3072,
    "text_config.max_position_embeddings": 514,
    "text_config.type_vocab_size": 1,
    "text_config.layer_norm_eps": 1e-05,
    "text_config.pad_token_id": 1,
    "text_config.bos_token_id": 0,
    "text_config.eos_token_id": 2,
    "text_config.hidden_act": "gelu",
    "vision_config.hidden_size": 768,
    "vision_config.num_hidden_layers": 12,
    "vision_config.patch_size": 16,
    "vision_config.image_size": 288,
    "vision_config.share_layernorm": True,
    "vision_config.remove_last_layer": False,
    "vision_config.layer_norm_eps": 1e-05,
}
_BLIP_BASE = {
    "image_text_hidden_size": 256,
    "projection_dim": 512,
    "logit_scale_init_value": 2.6592,
    "text_config.vocab_size": 30524,
    "text_config.hidden_size": 768,
    "text_config.encoder_hidden_size": 768,
    "text_config.num_hidden_layers": 12,
    "text_config.num_attention_heads": 12,
    "text_config.intermediate_size": 3072,
    "text_config.max_position_embeddings": 512,
    "text_config.layer_norm_eps": 1e-12,
    "text_config.hidden_act": "gelu",
    "text_config.bos_token_id": 30522,
    "text_config.eos_token_id": 2,
    "text_config.pad_token_id": 0,
    "text_config.sep_token_id": 102,
    "vision_config.hidden_size": 768,
    "vision_config.num_hidden_layers": 12,
    "vision_config.num_attention_heads": 12,
    "vision_config.intermediate_size": 3072,
    "vision_config.image_size": 384,
    "vision_config.patch_size": 16,
    "vision_config.layer_norm_eps": 1e-05,
    "vision_config.hidden_act": "gelu",
}
_BLIP2_COMMON = {
    "architectures": ["Blip2ForConditionalGeneration"],
    "num_query_tokens": 32,
    "vision_config.hidden_size": 1408,
    "vision_config.num_hidden_layers": 39,
    "vision_config.num_attention_heads": 16,
    "vision_config.intermediate_size": 6144,
    "vision_config.image_size": 224,
    "vision_config.patch_size": 14,
    "vision_config.layer_norm_eps": 1e-06,
    "vision_config.qkv_bias": True,
    "vision_config.hidden_act": "gelu",
    "qformer_config.hidden_size": 768,
    "qformer_config.num_hidden_layers": 12,
    "qformer_config.num_attention_heads": 12,
    "qformer_config.intermediate_size": 3072,
    "qformer_config.cross_attention_frequency": 2,
    "qformer_config.encoder_hidden_size": 1408,
    "qformer_config.layer_norm_eps": 1e-12,
    "qformer_config.vocab_size": 30522,
    "qformer_config.max_position_embeddings": 512,
}
EXPECTED: dict[str, dict[str, Any]] = {
    "bridgetower-base": {**_BT_BASE, "architectures": ["BridgeTowerModel"]},
    "bridgetower-base-itm-mlm": {**_BT_BASE, "architectures": ["BridgeTowerForImageAndTextRetrieval"]},
    "bridgetower-large-itm-mlm-itc": {
        **_BT_BASE,
        "architectures": ["BridgeTowerForContrastiveLearning"],
        "hidden_size": 1024,
        "num_attention_heads": 16,
        "contrastive_hidden_size": 512,
        "logit_scale_init_value": 2.6592,
        "text_config.hidden_size": 1024,
        "text_config.num_hidden_layers": 24,
        "text_config.num_attention_heads": 16,
        "text_config.intermediate_size": 4096,
        "vision_config.hidden_size": 1024,
        "vision_config.num_hidden_layers": 24,
        "vision_config.patch_size": 14,
        "vision_config.image_size": 294,
    },
    "blip-itm-base-coco": {**_BLIP_BASE, "architectures": ["BlipForImageTextRetrieval"]},
    "blip-image-captioning-base": {**_BLIP_BASE, "architectures": ["BlipForConditionalGeneration"]},
    "blip-vqa-base": {**_BLIP_BASE, "architectures": ["BlipForQuestionAnswering"]},
    "blip2-opt-2.7b": {
        **_BLIP2_COMMON,
        "image_token_index": 50265,
        "use_decoder_only_language_model": True,
        "text_config.model_type": "opt",
        "text_config.hidden_size": 2560,
        "text_config.num_hidden_layers": 32,
        "text_config.num_attention_heads": 32,
        "text_config.ffn_dim": 10240,
        "text_config.word_embed_proj_dim": 2560,
        "text_config.max_position_embeddings": 2048,
        "text_config.vocab_size": 50304,
        "text_config.bos_token_id": 2,
        "text_config.eos_token_id": 50118,
        "text_config.pad_token_id": 1,
        "text_config.activation_function": "relu",
        "text_config.do_layer_norm_before": True,
        "text_config.tie_word_embeddings": True,
    },
    "blip2-flan-t5-xl": {
        **_BLIP2_COMMON,
        "image_token_index": 32100,
        "use_decoder_only_language_model": False,
        "text_config.model_type": "t5",
        "text_config.d_model": 2048,
        "text_config.d_ff": 5120,
        "text_config.d_kv": 64,
        "text_config.num_heads": 32,
        "text_config.num_layers": 24,
        "text_config.num_decoder_layers": 24,
        "text_config.vocab_size": 32128,
        "text_config.feed_forward_proj": "gated-gelu",
        "text_config.layer_norm_epsilon": 1e-06,
        "text_config.relative_attention_num_buckets": 32,
        "text_config.relative_attention_max_distance": 128,
        "text_config.pad_token_id": 0,
        "text_config.eos_token_id": 1,
        "text_config.decoder_start_token_id": 0,
        # flan-t5 v1.1: untied LM head, hence no d_model**-0.5 rescaling of the decoder output.
        "text_config.scale_decoder_outputs": False,
    },
    "altclip": {
        "architectures": ["AltCLIPModel"],
        "projection_dim": 768,
        "logit_scale_init_value": 2.6592,
        "text_config.vocab_size": 250002,
        "text_config.hidden_size": 1024,
        "text_config.num_hidden_layers": 24,
        "text_config.num_attention_heads": 16,
        "text_config.intermediate_size": 4096,
        "text_config.max_position_embeddings": 514,
        "text_config.type_vocab_size": 1,
        "text_config.layer_norm_eps": 1e-05,
        "text_config.project_dim": 768,
        "text_config.pad_token_id": 1,
        "text_config.bos_token_id": 0,
        "text_config.eos_token_id": 2,
        "text_config.hidden_act": "gelu",
        "vision_config.hidden_size": 1024,
        "vision_config.num_hidden_layers": 24,
        "vision_config.num_attention_heads": 16,
        "vision_config.intermediate_size": 4096,
        "vision_config.image_size": 224,
        "vision_config.patch_size": 14,
        "vision_config.hidden_act": "quick_gelu",
        "vision_config.layer_norm_eps": 1e-05,
    },
    "vision-text-dual-encoder": {
        "architectures": ["VisionTextDualEncoderModel"],
        "projection_dim": 512,
        "vision_config.model_type": "vit",
        "vision_config.hidden_size": 768,
        "vision_config.num_hidden_layers": 12,
        "vision_config.num_attention_heads": 12,
        "vision_config.intermediate_size": 3072,
        "vision_config.image_size": 224,
        "vision_config.patch_size": 16,
        "vision_config.layer_norm_eps": 1e-12,
        "vision_config.qkv_bias": True,
        "text_config.model_type": "bert",
        "text_config.vocab_size": 30522,
        "text_config.hidden_size": 768,
        "text_config.num_hidden_layers": 12,
        "text_config.num_attention_heads": 12,
        "text_config.intermediate_size": 3072,
        "text_config.max_position_embeddings": 512,
        "text_config.type_vocab_size": 2,
        "text_config.layer_norm_eps": 1e-12,
        "text_config.pad_token_id": 0,
    },
}


def load_config(name: str) -> PretrainedConfig:
    d = PRESETS[name].config_dict()
    return AutoConfig.for_model(d.pop("model_type"), **d)


def build_on_meta(config: PretrainedConfig) -> torch.nn.Module:
    cls = getattr(transformers, config.architectures[0])
    with torch.device("meta"):
        return cls(config)


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def lookup(config: PretrainedConfig, path: str) -> Any:
    value: Any = config
    for part in path.split("."):
        value = getattr(value, part)
    return value


def test_expectations_cover_every_full_preset() -> None:
    assert set(PARAM_RANGES) == set(FULL)
    assert set(EXPECTED) == set(FULL)


@pytest.mark.parametrize("name", list(PRESETS))
def test_config_loads_with_its_model_type_class(name: str) -> None:
    model_type = PRESETS[name].config_dict()["model_type"]
    config = load_config(name)
    expected_cls = transformers.CONFIG_MAPPING[model_type]
    assert type(config) is expected_cls
    # The class's own from_dict reads the file the same way.
    assert type(expected_cls.from_dict(PRESETS[name].config_dict())) is expected_cls
    assert config.architectures and hasattr(transformers, config.architectures[0]), config.architectures


@pytest.mark.parametrize("name", list(PRESETS))
def test_config_model_type_and_architecture_belong_to_the_preset_family(name: str) -> None:
    d = PRESETS[name].config_dict()
    family = family_for_model_type(d["model_type"])
    assert family.name == PRESETS[name].family
    assert d["architectures"][0] in family.architectures, (d["architectures"], sorted(family.architectures))


@pytest.mark.parametrize("name", FULL)
def test_full_preset_has_a_tiny_twin_of_the_same_kind(name: str) -> None:
    preset = PRESETS[name]
    assert preset.tiny in PRESETS, preset.tiny
    twin = PRESETS[preset.tiny]
    assert twin.is_tiny and twin.checkpoint is None
    assert twin.family == preset.family
    assert twin.config_dict()["model_type"] == preset.config_dict()["model_type"]


@pytest.mark.parametrize("name", FULL)
def test_full_config_matches_upstream_values(name: str) -> None:
    config = load_config(name)
    wrong = {}
    for path, expected in EXPECTED[name].items():
        got = lookup(config, path)
        if got != expected:
            wrong[path] = (got, expected)
    assert not wrong, f"{name}: (got, expected) {wrong}"


@pytest.mark.parametrize("name", FULL)
def test_full_preset_parameter_count_matches_checkpoint(name: str) -> None:
    model = build_on_meta(load_config(name))
    assert all(p.device.type == "meta" for p in model.parameters())
    n = n_params(model)
    lo, hi = PARAM_RANGES[name]
    assert lo <= n <= hi, f"{name}: {n:,} parameters, expected {lo:,.0f}..{hi:,.0f}"


@pytest.mark.parametrize("name", TINY)
def test_tiny_preset_is_tiny(name: str) -> None:
    config = load_config(name)
    for arch_cls in {config.architectures[0], *_twin_architectures(name)}:
        config.architectures = [arch_cls]
        n = n_params(build_on_meta(config))
        assert 0 < n * 4 < TINY_MAX_BYTES, f"{name} as {arch_cls}: {n:,} parameters = {n * 4 / 2**20:.1f} MiB"


def _twin_architectures(tiny: str) -> set[str]:
    """The classes the full presets of this twin use: the tiny one must stay tiny as each of them."""
    return {PRESETS[n].config_dict()["architectures"][0] for n in FULL if PRESETS[n].tiny == tiny}
