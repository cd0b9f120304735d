"""vlexport.inject: what is replaced per tiny preset, that the kernels really run, that outputs match
the eager model, and that leaving the context gives back exactly the model that went in.

Kernels run on their reference path (CPU); one case runs the Triton kernels in the interpreter.
"""

from __future__ import annotations

import collections
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import PretrainedConfig, PreTrainedModel

from vlexport.errors import UsageError
from vlexport.inject import Rule, inject
from vlexport.models import family_for_model_type, get_family
from vlexport.models.inputs import InputShape
from vlexport.presets import PRESETS
from vlexport.weights import load_model, resolve

# fp32 tolerance, injected vs eager. The kernels compute the same math in another order (fused
# softmax, (q*scale)@k instead of (q@k)*scale, SDPA vs explicit matmuls in the reference model): a few
# ulp per op, ~1e-6 after the tiny models' layers for outputs of magnitude ~1 (measured: max 1.5e-6).
# Rounding scales with the magnitudes involved, so the bound does too: T5's logits reach ~45 and
# differ by 1.4e-5 (3e-7 of the scale). 1e-5 x scale keeps >= 7x headroom; a wrong mask, scale or
# residual gives errors of 1e-2 x scale and more.
TOL = 1e-5


def assert_close_fp32(got: torch.Tensor, ref: torch.Tensor, name: str = "output") -> float:
    scale = max(1.0, ref.abs().max().item())
    err = (got - ref).abs().max().item()
    assert got.shape == ref.shape and err <= TOL * scale, (
        f"{name}: max abs error {err:.3g} > {TOL:g} x {scale:.3g}"
    )
    return err


class OpCalls(TorchDispatchMode):
    """Counts calls of the ``vlexport::`` torch ops: proof that the kernels, not HF code, ran."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "vlexport":
            self.calls[func._opname] += 1
        return func(*args, **(kwargs or {}))

    def kernel_calls(self) -> dict[str, int]:
        return {"attention": self.calls["attention"], "bridge": self.calls["add_layer_norm"]}


# ----------------------------------------------------------------------------------------------------------
# Expected counts, from the configs


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def expected_modules(config: PretrainedConfig, hf_class: str) -> dict[str, int]:
    """Modules injection takes over: attention blocks (self + cross, every tower) and post-norm add+LN
    blocks."""
    mt = config.model_type
    text, vision = config.text_config, config.vision_config
    if mt == "bridgetower":
        cross_layers = 2 * config.num_hidden_layers  # text-side and image-side cross-modal layers
        vision_layers = vision.num_hidden_layers - (1 if vision.remove_last_layer else 0)
        links = 2 * (1 if config.share_link_tower_layers else config.num_hidden_layers - 1)
        return {
            "attention": text.num_hidden_layers
            + 2 * cross_layers
            + vision_layers,  # cross layers: self + cross
            # SelfOutput per attention block, Output per layer, plus the link towers
            "bridge": 2 * text.num_hidden_layers + 3 * cross_layers + links,
        }
    if mt == "blip":
        # decoder layers add cross-attention
        text_blocks = text.num_hidden_layers * (2 if text.is_decoder else 1)
        towers = 2 if hf_class == "BlipForQuestionAnswering" else 1  # question encoder + answer decoder
        return {
            "attention": vision.num_hidden_layers + towers * text_blocks,
            "bridge": towers * (text_blocks + text.num_hidden_layers),
        }
    if mt == "blip-2":
        q = config.qformer_config
        q_blocks = q.num_hidden_layers + _ceil_div(q.num_hidden_layers, q.cross_attention_frequency)
        q_outputs = q.num_hidden_layers * (2 if q.use_qformer_text_input else 1)
        lm = (
            text.num_hidden_layers
            if text.model_type == "opt"
            else text.num_layers + 2 * text.num_decoder_layers
        )
        return {"attention": vision.num_hidden_layers + q_blocks + lm, "bridge": q_blocks + q_outputs}
    # altclip, vision-text-dual-encoder: pre-norm vision tower, post-norm (BERT/RoBERTa) text tower
    return {
        "attention": text.num_hidden_layers + vision.num_hidden_layers,
        "bridge": 2 * text.num_hidden_layers,
    }


def expected_calls(config: PretrainedConfig, task: str) -> dict[str, int]:
    """Kernel calls of one forward of a non-generative task: every module runs once, except BLIP's ITC
    and features paths, which run the text encoder without the image (no cross-attention)."""
    n = expected_modules(config, "")
    if config.model_type == "blip" and task in ("itc", "features") and config.text_config.is_decoder:
        skipped = config.text_config.num_hidden_layers
        n = {"attention": n["attention"] - skipped, "bridge": n["bridge"] - skipped}
    return n


# ----------------------------------------------------------------------------------------------------------
# Models


ENCODER_CASES = [
    (name, task)
    for name, p in PRESETS.items()
    if p.is_tiny and not p.family.startswith("blip2")
    for task in p.tasks
    if not get_family(p.family).task(task).generative
]
# Generative HF models (BlipForConditionalGeneration, BlipForQuestionAnswering,
# Blip2ForConditionalGeneration),
# run with HF generate() rather than through the export components.
GENERATIVE_CASES = [
    ("blip-tiny", "caption"),
    ("blip-tiny", "vqa"),
    ("blip2-opt-tiny", "generate"),
    ("blip2-flan-t5-tiny", "generate"),
]


def rules(model: PreTrainedModel) -> tuple[Rule, ...]:
    """The injection rules of the model's family, as the pipeline passes them."""
    return family_for_model_type(model.config.model_type).injection


def _encoder_model(preset: str, task: str):
    source = resolve(preset, random_weights=True)
    model = load_model(source, task)
    spec = source.family.task(task)
    (component,) = spec.components(model.config)
    return model, spec, component


def _hf_model(preset: str, task: str) -> tuple[PreTrainedModel, str]:
    """The seeded random-weights model of a generative task and its HF class name."""
    source = resolve(preset, random_weights=True)
    return load_model(source, task), source.family.task(task).hf_class_name


def _generation_inputs(model: PreTrainedModel, batch: int = 3, text_len: int = 6) -> dict[str, torch.Tensor]:
    """Images and right-padded prompts; BLIP-2 prompts carry the image tokens, T5 gets decoder ids."""
    config = model.config
    gen = torch.Generator().manual_seed(7)
    size = config.vision_config.image_size
    pixel_values = torch.randn(batch, 3, size, size, generator=gen)
    ids = torch.randint(3, 900, (batch, text_len), generator=gen)
    mask = torch.ones(batch, text_len, dtype=torch.long)
    mask[1, text_len - 2 :] = 0
    if config.model_type == "blip":
        ids[:, 0] = config.text_config.bos_token_id
        return {"pixel_values": pixel_values, "input_ids": ids, "attention_mask": mask}
    n = config.num_query_tokens
    ids = torch.cat([torch.full((batch, n), config.image_token_index), ids], dim=1)
    mask = torch.cat([torch.ones(batch, n, dtype=torch.long), mask], dim=1)
    return {"pixel_values": pixel_values, "input_ids": ids, "attention_mask": mask}


def _snapshot(model: nn.Module) -> dict:
    """Everything injection may touch: instance attributes, hooks, attention implementations."""
    return {
        "attrs": {name: sorted(vars(m)) for name, m in model.named_modules()},
        "methods": {
            name: {k: v for k, v in vars(m).items() if callable(v) and not isinstance(v, nn.Module)}
            for name, m in model.named_modules()
        },
        "hooks": {
            name: (len(m._forward_pre_hooks), len(m._forward_hooks)) for name, m in model.named_modules()
        },
        "attn": {
            name: m.config._attn_implementation
            for name, m in model.named_modules()
            if isinstance(getattr(m, "config", None), PretrainedConfig)
        },
    }


# ----------------------------------------------------------------------------------------------------------
# Counts and that the kernels run


def test_expected_counts_for_the_tiny_configs() -> None:
    # The formulas above, evaluated: layers x attention blocks per tower, written out once for the reader.
    # text 2 + cross 4x(self+cross) + vision 2
    cases = {
        ("bridgetower-tiny", "itm"): {
            "attention": 12,
            "bridge": 18,
        },
        ("blip-tiny", "itm"): {"attention": 6, "bridge": 6},  # vision 2 + text decoder 2x(self+cross)
        ("altclip-tiny", "features"): {"attention": 4, "bridge": 4},
        ("vision-text-dual-encoder-tiny", "features"): {"attention": 4, "bridge": 4},
    }
    for (preset, task), want in cases.items():
        model, spec, _ = _encoder_model(preset, task)
        assert expected_modules(model.config, spec.hf_class_name) == want, preset
    vqa, vqa_class = _hf_model("blip-tiny", "vqa")
    assert expected_modules(vqa.config, vqa_class) == {"attention": 10, "bridge": 12}
    # vision 2 + Q-Former 2 self + 1 cross + OPT 2 / T5 2 encoder + 2x2 decoder
    assert expected_modules(_hf_model("blip2-opt-tiny", "generate")[0].config, "") == {
        "attention": 7,
        "bridge": 5,
    }
    assert expected_modules(_hf_model("blip2-flan-t5-tiny", "generate")[0].config, "") == {
        "attention": 11,
        "bridge": 5,
    }


@pytest.mark.parametrize(("preset", "task"), ENCODER_CASES, ids=[f"{p}-{t}" for p, t in ENCODER_CASES])
def test_encoder_injection_matches_eager_and_restores(preset: str, task: str) -> None:
    model, spec, component = _encoder_model(preset, task)
    wrapper = component.build(model)
    inputs = spec.make_inputs(model.config, InputShape(batch=3, seq_len=9), seed=5)
    args = [inputs[name] for name in component.inputs]
    before = _snapshot(model)
    with torch.no_grad():
        reference = wrapper(*args)
        with inject(model, rules(model), attention=True, bridge_norm=True) as handle, OpCalls() as ops:
            injected = wrapper(*args)
        after = wrapper(*args)

    assert handle.counts == expected_modules(model.config, spec.hf_class_name)
    assert ops.kernel_calls() == expected_calls(model.config, task)
    for name, ref, got in zip(component.outputs, reference, injected):
        assert ref.std() > 1e-3, f"{name}: degenerate reference, the comparison would say nothing"
        assert_close_fp32(got, ref, name)
    # Leaving the context restores the model exactly: same attributes, hooks, implementations, outputs.
    assert _snapshot(model) == before
    for ref, again in zip(reference, after):
        assert torch.equal(ref, again)


@pytest.mark.parametrize(("preset", "task"), GENERATIVE_CASES, ids=[f"{p}-{t}" for p, t in GENERATIVE_CASES])
def test_generative_injection_matches_eager_with_kv_cache(preset: str, task: str) -> None:
    """Decoders: causal + padding masks, KV cache (query at the end), cross-attention, T5's position bias."""
    model, hf_class = _hf_model(preset, task)
    inputs = _generation_inputs(model)
    forward_inputs = dict(inputs)
    if model.config.model_type == "blip-2" and not model.config.use_decoder_only_language_model:
        gen = torch.Generator().manual_seed(3)
        forward_inputs["decoder_input_ids"] = torch.randint(3, 900, (3, 4), generator=gen)
    before = _snapshot(model)
    generate = {"max_new_tokens": 6, "do_sample": False, "num_beams": 1}
    with torch.no_grad():
        ref_tokens = model.generate(**inputs, **generate)
        ref_logits = None if hf_class == "BlipForQuestionAnswering" else model(**forward_inputs).logits
        with inject(model, rules(model)) as handle, OpCalls() as ops:
            tokens = model.generate(**inputs, **generate)
            logits = None if ref_logits is None else model(**forward_inputs).logits
        after = model.generate(**inputs, **generate)

    assert handle.counts == expected_modules(model.config, hf_class)
    assert ops.calls["attention"] > handle.counts["attention"]  # one call per module per decoding step
    assert ops.calls["add_layer_norm"] >= handle.counts["bridge"]
    assert torch.equal(tokens, ref_tokens), "fp32 greedy decoding must agree token for token"
    if ref_logits is not None:
        assert_close_fp32(logits, ref_logits, "logits")
    assert _snapshot(model) == before
    assert torch.equal(after, ref_tokens)


# ----------------------------------------------------------------------------------------------------------
# The mechanism


def test_injection_really_replaces_and_switches() -> None:
    model, _, _ = _encoder_model("bridgetower-tiny", "itm")
    vision_block = model.bridgetower.vision_model.visual.transformer.resblocks[0]
    link = model.bridgetower.cross_modal_text_link_tower[0]
    text_attention = model.bridgetower.text_model.encoder.layer[0].attention
    with inject(model, rules(model)) as handle:
        # hand-rolled attention and bridge blocks: the instance's bound method is no longer the class's
        assert "attention" in vars(vision_block)
        assert "forward" in vars(link) and "forward" in vars(text_attention.output)
        # interface attention: every config the modules read now names the vlexport implementation
        assert text_attention.self.config._attn_implementation == "vlexport"
        assert model.config._attn_implementation == "vlexport"
        assert len(handle.modules["attention"]) == handle.counts["attention"]
        assert "bridgetower.cross_modal_text_link_tower.0" in handle.modules["bridge"]
    assert "attention" not in vars(vision_block) and "forward" not in vars(link)
    assert text_attention.self.config._attn_implementation == "eager"


def test_bridgetower_vision_block_key_padding_mask() -> None:
    # BridgeTowerModel runs its vision blocks unmasked; the block itself takes a key padding mask (True =
    # pad).
    model, _, _ = _encoder_model("bridgetower-tiny", "features")
    block = model.vision_model.visual.transformer.resblocks[1]
    hidden = torch.randn(17, 3, 64, generator=torch.Generator().manual_seed(0))  # (L, B, E)
    pad = torch.zeros(3, 17, dtype=torch.bool)
    pad[1, 12:] = pad[2, 5:] = True
    with torch.no_grad():
        ref = block.attention(hidden, pad)
        with inject(model, rules(model)), OpCalls() as ops:
            got = block.attention(hidden, pad)
    assert ops.calls["attention"] == 1
    assert_close_fp32(got, ref)


@pytest.mark.parametrize(("attention", "bridge_norm"), [(True, False), (False, True)])
def test_one_switch_per_kernel(attention: bool, bridge_norm: bool) -> None:
    model, spec, component = _encoder_model("altclip-tiny", "features")
    inputs = spec.make_inputs(model.config, InputShape(2, 7), 0)
    switches = {"attention": attention, "bridge_norm": bridge_norm}
    with torch.no_grad(), inject(model, rules(model), **switches) as handle, OpCalls() as ops:
        component.build(model)(*(inputs[n] for n in component.inputs))
        assert model.config._attn_implementation == ("vlexport" if attention else "sdpa")
    assert set(handle.counts) == {k for k, on in (("attention", attention), ("bridge", bridge_norm)) if on}
    assert ops.kernel_calls() == {"attention": 4 * attention, "bridge": 4 * bridge_norm}


def test_restore_is_idempotent_and_works_without_with() -> None:
    model, _, _ = _encoder_model("blip-tiny", "itm")
    before = _snapshot(model)
    handle = inject(model, rules(model))
    assert _snapshot(model) != before
    handle.restore()
    handle.restore()
    assert _snapshot(model) == before


def test_nested_injection_unwinds_in_order() -> None:
    model, spec, component = _encoder_model("blip-tiny", "itm")
    inputs = spec.make_inputs(model.config, InputShape(2, 5), 0)
    args = [inputs[n] for n in component.inputs]
    before = _snapshot(model)
    with torch.no_grad(), inject(model, rules(model), attention=True, bridge_norm=False):
        inner_before = _snapshot(model)
        with inject(model, rules(model), attention=True, bridge_norm=True), OpCalls() as ops:
            component.build(model)(*args)
        assert ops.kernel_calls() == expected_calls(model.config, "itm")
        assert _snapshot(model) == inner_before
    assert _snapshot(model) == before


def test_restores_even_when_the_body_raises() -> None:
    model, _, _ = _encoder_model("vision-text-dual-encoder-tiny", "features")
    before = _snapshot(model)
    with pytest.raises(RuntimeError, match="boom"), inject(model, rules(model)):
        raise RuntimeError("boom")
    assert _snapshot(model) == before


def test_unknown_layout_is_refused_before_anything_changes() -> None:
    model, _, _ = _encoder_model("bridgetower-tiny", "itm")
    model.bridgetower.cross_modal_image_link_tower[
        0
    ].link_tower_type = "concat"  # a type the rule does not know
    before = _snapshot(model)
    with pytest.raises(UsageError, match="cross_modal_image_link_tower.0.*concat"):
        inject(model, rules(model))
    assert _snapshot(model) == before
    # without the bridge kernel the link towers are not touched, so attention alone still injects
    with inject(model, rules(model), attention=True, bridge_norm=False) as handle:
        assert handle.counts == {"attention": 12}


def test_no_rules_is_a_usage_error() -> None:
    from transformers import BertConfig, BertModel

    with pytest.raises(UsageError, match="no injection rules for model_type 'bert'"):
        inject(
            BertModel(
                BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37)
            ),
            (),
        )


def test_every_family_declares_rules_and_inject_knows_no_family() -> None:
    # Family knowledge lives in the family modules: inject.py must not import them (models -> inject only).
    script = (
        "import sys, vlexport.inject; "
        "print(sorted(m for m in sys.modules if m.startswith('vlexport.models')))"
    )
    run = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True
    )
    assert run.stdout.strip() == "[]"
    for name in {p.family for p in PRESETS.values()}:
        assert get_family(name).injection, name


# ----------------------------------------------------------------------------------------------------------
# Where the fused path must not run


def test_output_attentions_falls_back_to_materialised_probabilities() -> None:
    # BridgeTower returns its layers' attention probabilities; the kernel has none, so such a call runs eager.
    model, spec, _ = _encoder_model("bridgetower-tiny", "features")
    inputs = spec.make_inputs(model.config, InputShape(2, 7), 0)
    with torch.no_grad():
        ref = model(**inputs, output_attentions=True)
        with inject(model, rules(model)), OpCalls() as ops:
            got = model(**inputs, output_attentions=True)
            plain = model(**inputs)  # the flag is per call: the next call is fused again
    assert ops.calls["attention"] == expected_calls(model.config, "features")["attention"]  # only `plain`
    flat = [t for pair in got.attentions for t in pair]
    assert flat and all(t is not None for t in flat)
    for r, g in zip([t for pair in ref.attentions for t in pair], flat):
        assert torch.equal(r, g)
    assert_close_fp32(plain.pooler_output, ref.pooler_output)


def test_training_mode_runs_the_original_code() -> None:
    # Dropout on probabilities and autograd are the HF code's job: in training mode nothing is fused and
    # the outputs (same seed, same dropout masks) are identical to the un-injected model's.
    model, spec, component = _encoder_model("bridgetower-tiny", "itm")
    model.train()
    wrapper = component.build(model).train()
    inputs = spec.make_inputs(model.config, InputShape(2, 7), 0)
    args = [inputs[n] for n in component.inputs]
    torch.manual_seed(1)
    ref = wrapper(*args)
    with inject(model, rules(model)), OpCalls() as ops:
        torch.manual_seed(1)
        got = wrapper(*args)
    assert sum(ops.calls.values()) == 0
    assert torch.equal(ref[0], got[0])
    got[0].sum().backward()  # autograd goes through the original code


# ----------------------------------------------------------------------------------------------------------
# Triton kernels in the interpreter (slow: tiny shapes, one preset, in a subprocess so TRITON_INTERPRET is set
# before triton is imported)


def test_triton_interpreter_path_matches_eager() -> None:
    pytest.importorskip("triton")
    script = textwrap.dedent("""
        import torch, vlexport_kernels
        from vlexport.inject import inject
        from vlexport.models.inputs import InputShape
        from vlexport.weights import load_model, resolve

        source = resolve("blip-tiny", random_weights=True)
        model = load_model(source, "itm")
        spec = source.family.task("itm")
        (component,) = spec.components(model.config)
        inputs = spec.make_inputs(model.config, InputShape(2, 5), 0)
        wrapper = component.build(model)
        args = [inputs[n] for n in component.inputs]
        with torch.no_grad():
            ref = wrapper(*args)[0]
            with vlexport_kernels.use_backend("triton"), inject(model, source.family.injection):
                got = wrapper(*args)[0]
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
        print("max abs", (got - ref).abs().max().item())
    """)
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
