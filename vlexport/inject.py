"""Swap a loaded model's attention and bridge (add + LayerNorm) layers for ``vlexport_kernels``, reversibly.

``inject(model, family.injection, attention=True, bridge_norm=True)`` returns an :class:`Injection` handle,
usable as a context manager; leaving it (or ``handle.restore()``) puts back exactly what was changed.

One mechanism here, family parts as data in the family modules:

* :class:`_Patches` sets attributes and remembers what was there (an instance's bound method, a
  config's attention implementation); ``restore`` undoes them in reverse order. Nothing is patched
  on a class, so other instances (the eager reference that validation compares with) are untouched.
* Each family declares which module classes change and how (``FamilySpec.injection``, a tuple of
  :class:`Rule`), built from :func:`interface`, :func:`post_norm` and its own replacement forwards.
  This module never imports ``vlexport.models`` (the family modules import it).

Attention reaches the kernel in one of two ways:

* ``interface``: transformers 5.x modules that call ``ALL_ATTENTION_FUNCTIONS[config._attn_implementation]``
  (BridgeTower text and cross-modal layers, BLIP-2 vision / Q-Former, OPT, T5, AltCLIP, ViT, BERT, ...).
  ``vlexport`` is registered once as an attention implementation; injection switches every config of
  the model to it. Its masks are HF's eager masks (additive float, materialised), so the kernel sees
  exactly what eager attention sees: the mask is the authority on padding and causality.
* ``forward``: modules that hand-roll ``softmax(QK^T)V`` (BLIP vision and text, BridgeTower's vision
  ``nn.MultiheadAttention``) get a replacement method computing q/k/v with the module's own weights,
  written in their family module with :func:`kernel_attention`.

Bridge norm replaces post-norm ``LayerNorm(dropout(dense(h)) + input)`` blocks (BERT-style SelfOutput /
Output of the text encoders and Q-Former) and BridgeTower's link towers with ``add_layer_norm``.

The kernels materialise no attention probabilities: when a caller asks for attentions
(``output_attentions=True``) or the module is in training mode, the call falls back to the original
code (eager attention, dropout and all), so results stay correct and the fused path stays eval-only.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.fx.experimental.symbolic_shapes import statically_known_true

# transformers is imported when injecting: family modules load without it (compiled artifacts)
if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

from vlexport.contracts.family import Rule
from vlexport.errors import UsageError

ATTN_IMPLEMENTATION = "vlexport"
KERNELS = ("attention", "bridge")  # handle.counts keys, as the CLI's --kernels names them


def _kernels() -> Any:
    # kernels/vlexport_kernels/ (`kernels` itself is a PyPI package transformers imports)
    import vlexport_kernels

    return vlexport_kernels


# ----------------------------------------------------------------------------------------------------------
# The reversible-patch mechanism


_MISSING = object()


class _Patches:
    """Changes that remember how to undo themselves; ``restore`` undoes them, last first."""

    def __init__(self) -> None:
        self._undo: list[Callable[[], None]] = []

    def set(self, obj: object, name: str, value: object) -> None:
        """``setattr`` that restores the instance attribute, or removes it so the class's shows through
        again."""
        old = obj.__dict__.get(name, _MISSING)
        setattr(obj, name, value)
        self._undo.append(lambda: delattr(obj, name) if old is _MISSING else setattr(obj, name, old))

    def hook(self, handle: torch.utils.hooks.RemovableHandle) -> None:
        self._undo.append(handle.remove)

    def restore(self) -> None:
        while self._undo:
            self._undo.pop()()


@dataclass
class Injection:
    """What was injected: ``counts`` maps kernel -> number of modules now running it; ``modules`` names
    them."""

    counts: dict[str, int]
    modules: dict[str, list[str]]
    _patches: _Patches = field(repr=False)

    def restore(self) -> None:
        self._patches.restore()  # idempotent: a second call finds nothing left to undo

    def __enter__(self) -> Injection:  # noqa: PYI034
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()


# ----------------------------------------------------------------------------------------------------------
# Attention: the shared call into the kernel


# One entry per model forward in progress under injection: whether that call asked for attentions.
_CALLS_WANT_ATTENTIONS: list[bool] = []


def _note_call(module: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook on every PreTrainedModel of an injected model: did the caller ask for attentions?

    Models that return the probabilities from their layers (BridgeTower, BLIP) never pass the flag down,
    so it is read where the caller gives it.
    """
    _CALLS_WANT_ATTENTIONS.append(
        bool(kwargs.get("output_attentions", getattr(module.config, "output_attentions", False)))
    )


def _end_call(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
    if _CALLS_WANT_ATTENTIONS:
        _CALLS_WANT_ATTENTIONS.pop()


def _attentions_requested() -> bool:
    """True while a caller asked for attention probabilities (output_attentions=True)."""
    if any(_CALLS_WANT_ATTENTIONS):
        return True
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:  # pragma: no cover - older/newer layouts: nothing to detect
        return False
    collected = _active_collector.get()
    return bool(collected) and ("attentions" in collected or "cross_attentions" in collected)


def use_original(module: nn.Module) -> bool:
    """Training (dropout on probabilities, autograd) and requested attentions need the original code path."""
    return module.training or _attentions_requested()


def additive_bias(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """An HF attention mask as an additive float bias: float masks as they are, boolean (True = attend) to
    0/min.

    HF 5.x sizes masks to the keys (cache-aware), so they are used as given, like its eager attention does.
    """
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.where(mask, torch.zeros((), dtype=dtype, device=mask.device), torch.finfo(dtype).min)
    return mask.to(dtype)


def kernel_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    bias: torch.Tensor | None,
    scale: float,
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B,H,Sq,D) x (B,H,Sk,D) -> (B,H,Sq,D) through ``torch.ops.vlexport.attention``.

    Broadcasts what HF attention broadcasts implicitly through matmul: a batch of 1 against a larger one
    (Q-Former cross-attention) and grouped key/value heads.
    """
    # Only certain mismatches count: comparing symbolic sizes would guard (specialise) a dynamic dim in
    # export.
    if statically_known_true(key.shape[1] != query.shape[1]):
        repeat = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(repeat, dim=1), value.repeat_interleave(repeat, dim=1)
    if statically_known_true(query.shape[0] != key.shape[0]):
        batch = max(query.shape[0], key.shape[0])
        query, key, value = (t.expand(batch, *t.shape[1:]) for t in (query, key, value))
    return _kernels().attention(
        query,
        key,
        value,
        key_padding_mask=key_padding_mask,
        attn_bias=bias,
        causal=causal,
        scale=float(scale),
    )


def _eager_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None,
    dropout: float,
    position_bias: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """HF's eager attention (T5's position bias included): the fallback that materialises probabilities."""
    scores = torch.matmul(query, key.transpose(2, 3)) * (
        query.shape[-1] ** -0.5 if scaling is None else scaling
    )
    if position_bias is not None:
        scores = scores + position_bias
    bias = additive_bias(attention_mask, scores.dtype)
    if bias is not None:
        scores = scores + bias
    probs = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = nn.functional.dropout(probs, p=dropout, training=module.training)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), probs


def vlexport_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    position_bias: torch.Tensor | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The ``vlexport`` entry of transformers' AttentionInterface: returns (B, Sq, H, D) like every HF
    backend.

    Causality comes from the mask (HF's eager masks are always materialised for decoders). ``is_causal``
    is honoured only when passed explicitly with no mask; modules' own ``is_causal`` attribute is not
    trusted: BridgeTower's cross-modal self-attention sets it although its eager reference is bidirectional.
    """
    if use_original(module) or kwargs.get("output_attentions"):
        return _eager_attention(module, query, key, value, attention_mask, scaling, dropout, position_bias)
    bias = additive_bias(attention_mask, query.dtype)
    # T5: relative position bias (1, H, Sq, Sk), added before the mask as in eager
    if position_bias is not None:
        bias = position_bias if bias is None else position_bias + bias
    causal = bool(is_causal) and bias is None and query.shape[-2] > 1
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    out = kernel_attention(query, key, value, bias=bias, scale=scale, causal=causal)
    return out.transpose(1, 2).contiguous(), None


@functools.cache
def _register_attention() -> None:
    """The ``vlexport`` attention implementation in transformers' registries (once, before injecting)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(ATTN_IMPLEMENTATION, vlexport_attention_forward)
    # HF's eager masks (0 / dtype-min, never skipped for decoders) for the same name: registering both is
    # additive and inert for every model whose config does not name "vlexport".
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, eager_mask)


# ----------------------------------------------------------------------------------------------------------
# Rules: what a family declares (FamilySpec.injection)


def add_layer_norm(x: torch.Tensor, residual: torch.Tensor, ln: nn.LayerNorm) -> torch.Tensor:
    """``ln(x + residual)`` through ``torch.ops.vlexport.add_layer_norm``."""
    return _kernels().add_layer_norm(x, residual, ln.weight, ln.bias, ln.eps)


def check_layer_norm(ln: nn.Module) -> str | None:
    if (
        not isinstance(ln, nn.LayerNorm)
        or len(ln.normalized_shape) != 1
        or ln.weight is None
        or ln.bias is None
    ):
        return "expected a LayerNorm over the last dim with weight and bias"
    return None


def _dense_add_norm(
    self: nn.Module, original: Callable, hidden_states: torch.Tensor, input_tensor: torch.Tensor
) -> torch.Tensor:
    """BERT-style SelfOutput/Output: LayerNorm(dropout(dense(h)) + input) -> add_layer_norm."""
    if self.training:
        return original(hidden_states, input_tensor)
    return add_layer_norm(self.dropout(self.dense(hidden_states)), input_tensor, self.LayerNorm)


def _check_post_norm(module: nn.Module) -> str | None:
    if not (
        isinstance(getattr(module, "dense", None), nn.Linear)
        and isinstance(getattr(module, "dropout", None), nn.Dropout)
    ):
        return "expected dense (Linear), dropout and LayerNorm submodules"
    return check_layer_norm(getattr(module, "LayerNorm", None))


def interface(*classes: str) -> Rule:
    """Attention modules that call ALL_ATTENTION_FUNCTIONS: routed by switching their configs."""
    return Rule("attention", classes)


def post_norm(*classes: str) -> Rule:
    """BERT-style ``LayerNorm(dropout(dense(h)) + input)`` blocks (dense, dropout, LayerNorm submodules)."""
    return Rule("bridge", classes, _dense_add_norm, check=_check_post_norm)


# Encoders a VisionTextDualEncoder is usually built from (and that other families reuse).
BERT_LIKE = (
    interface(
        "bert.modeling_bert.BertSelfAttention",
        "bert.modeling_bert.BertCrossAttention",
        "roberta.modeling_roberta.RobertaSelfAttention",
        "roberta.modeling_roberta.RobertaCrossAttention",
        "xlm_roberta.modeling_xlm_roberta.XLMRobertaSelfAttention",
        "xlm_roberta.modeling_xlm_roberta.XLMRobertaCrossAttention",
    ),
    post_norm(
        "bert.modeling_bert.BertSelfOutput",
        "bert.modeling_bert.BertOutput",
        "roberta.modeling_roberta.RobertaSelfOutput",
        "roberta.modeling_roberta.RobertaOutput",
        "xlm_roberta.modeling_xlm_roberta.XLMRobertaSelfOutput",
        "xlm_roberta.modeling_xlm_roberta.XLMRobertaOutput",
    ),
)
# pre-norm: no bridge
VIT_LIKE = (interface("vit.modeling_vit.ViTAttention", "clip.modeling_clip.CLIPAttention"),)


# ----------------------------------------------------------------------------------------------------------
# Injection


def _class_key(module: nn.Module) -> str:
    cls = type(module)
    return f"{cls.__module__.removeprefix('transformers.models.')}.{cls.__qualname__}"


def _configs(model: nn.Module) -> Iterator[PretrainedConfig]:
    """Every distinct config the model's modules read (sub-configs included; models built with
    ``from_config`` may hold copies rather than the parent's sub-config objects)."""
    from transformers import PretrainedConfig

    seen: set[int] = set()
    todo = [model.config] + [
        m.config for m in model.modules() if isinstance(getattr(m, "config", None), PretrainedConfig)
    ]
    while todo:
        config = todo.pop()
        if id(config) in seen:
            continue
        seen.add(id(config))
        yield config
        todo.extend(
            getattr(config, key)
            for key in getattr(config, "sub_configs", {})
            if isinstance(getattr(config, key, None), PretrainedConfig)
        )


def inject(
    model: PreTrainedModel, rules: Sequence[Rule], *, attention: bool = True, bridge_norm: bool = True
) -> Injection:
    """Route ``model``'s attention and bridge layers through vlexport_kernels as ``rules`` (its family's
    ``FamilySpec.injection``) say; returns a handle that restores.

    Checks every module before changing any, so a layout it does not know leaves the model untouched.
    """
    if not rules:
        raise UsageError(
            f"--kernels: no injection rules for model_type {model.config.model_type!r}: its family "
            "declares none. Export without --kernels."
        )
    wanted = {"attention": attention, "bridge": bridge_norm}
    by_class = {cls: rule for rule in rules if wanted[rule.kernel] for cls in rule.classes}
    plan: list[tuple[str, nn.Module, Rule]] = []
    for name, module in model.named_modules():
        rule = by_class.get(_class_key(module))
        if rule is None:
            continue
        problem = rule.check(module)
        if problem:
            raise UsageError(
                f"Cannot inject the {rule.kernel} kernel into {name} ({type(module).__name__}): "
                f"{problem}. Export without --kernels {rule.kernel}."
            )
        plan.append((name, module, rule))

    _kernels()  # fail here, before patching, when the kernels package is missing
    _register_attention()
    from transformers import PreTrainedModel

    patches = _Patches()
    counts = {k: 0 for k in KERNELS if wanted[k]}
    modules: dict[str, list[str]] = {k: [] for k in counts}
    try:
        if attention:
            for config in _configs(model):
                patches.set(config, "_attn_implementation_internal", ATTN_IMPLEMENTATION)
        for module in model.modules():
            if isinstance(module, PreTrainedModel):
                patches.hook(module.register_forward_pre_hook(_note_call, with_kwargs=True))
                patches.hook(module.register_forward_hook(_end_call, with_kwargs=True, always_call=True))
        for name, module, rule in plan:
            if rule.replacement is not None:
                original = getattr(module, rule.method)
                patches.set(module, rule.method, functools.partial(rule.replacement, module, original))
            counts[rule.kernel] += 1
            modules[rule.kernel].append(name)
    except BaseException:
        patches.restore()
        raise
    return Injection(counts, modules, patches)
