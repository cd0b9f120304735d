"""Loading a resolved model: a checkpoint that lacks tensors of the task's class (or holds tensors of the
wrong shape or that no class of the family has) is refused unless ``--allow-new-weights`` names them (they
then get values seeded from ``--seed``, so that ``vlexport validate`` rebuilds the same reference)."""

from __future__ import annotations

import fnmatch
import logging
import zlib
from typing import Any

import torch
from transformers import PreTrainedModel

from vlexport.errors import CheckError
from vlexport.weights.resolve import SANE_INITIALIZER_RANGE, ModelSource, sane_init_config


def load_model(source: ModelSource, task: str) -> PreTrainedModel:
    """Instantiate the task's HF class with the source's weights: fp32, eval mode, eager reference.

    A checkpoint must fill the class exactly, or ``allow_new_weights`` cover the difference
    (:func:`_check_loaded`).
    """
    task_spec = source.family.task(task)
    cls = task_spec.hf_class()
    if source.origin.get("kind") == "random":
        torch.manual_seed(source.origin["seed"])
        model = cls(sane_init_config(source.config))
        source.family.random_init(model)  # what the config alone cannot fix (BLIP-2's T5 LM head)
    else:
        where = source.local_dir if source.local_dir is not None else source.origin["checkpoint"]
        report, drop = (
            logging.getLogger("transformers.modeling_utils"),
            lambda r: "LOAD REPORT" not in str(r.msg),
        )
        # our error replaces its stderr report (not a level: 5.24 then logs its TP-plan check)
        report.addFilter(drop)
        try:
            # ignore_mismatched_sizes: shape mismatches come back in the loading info and are judged below
            model, info = cls.from_pretrained(
                where,
                use_safetensors=True,
                dtype=torch.float32,
                output_loading_info=True,
                ignore_mismatched_sizes=True,
                **task_spec.load_kwargs(source.config),
            )
        except (OSError, ValueError, RuntimeError) as e:
            raise CheckError(f"Could not load weights for {source.name} as {cls.__name__}: {e}") from None
        finally:
            report.removeFilter(drop)
        _check_loaded(model, info, source, task, where)
    task_spec.prepare(model)
    return model.eval()


def _check_loaded(
    model: PreTrainedModel, info: dict[str, Any], source: ModelSource, task: str, where: Any
) -> None:
    """Missing, mismatched or unknown tensors are an error: transformers gives them unseeded random values
    (tied ones it reports as present), so the export passes against a model that is not the one saved and a
    later validate fails. Those the allow patterns cover get seeded values; their names go in
    origin["new_weights"]."""
    origin = source.origin
    patterns = tuple(origin.get("allow_new_weights", ()))
    allowed = lambda key: any(fnmatch.fnmatchcase(key, p) for p in patterns)
    missing = sorted(info["missing_keys"])
    shapes = {k: (tuple(ckpt), tuple(mine)) for k, ckpt, mine in info["mismatched_keys"]}
    unexpected = sorted(k for k in info["unexpected_keys"] if not allowed(k))
    if unexpected:  # a head of another task of the family (features from an ITM checkpoint) is only unused
        unexpected = sorted(set(unexpected) - _family_keys(source))
    bad_missing = [k for k in missing if not allowed(k)]
    bad_shapes = [k for k in sorted(shapes) if not allowed(k)]
    if bad_missing or bad_shapes or unexpected:
        raise CheckError(
            _mismatch_message(model, source, task, where, bad_missing, bad_shapes, shapes, unexpected)
        )
    fresh = sorted({*missing, *shapes})
    recorded = origin.get("new_weights")
    # validate: the checkpoint no longer loads as exported
    if recorded is not None and sorted(recorded) != fresh:
        raise CheckError(
            f"{where} no longer loads as it did at export: the fresh tensors were {_names(recorded)}, "
            f"now {_names(fresh)}. Re-export, or restore the weights."
        )
    if patterns:
        _fresh_init(model, fresh, int(origin.get("new_weights_seed", 0)))
        origin["new_weights"] = fresh
        if ignored := sorted(k for k in info["unexpected_keys"] if allowed(k)):
            origin["ignored_weights"] = ignored


def _family_keys(source: ModelSource) -> set[str]:
    """Every tensor name a complete save_pretrained of one of the family's task classes holds (meta
    device)."""
    keys: set[str] = set()
    for spec in {t.hf_class_name: t for t in source.family.tasks.values()}.values():
        try:
            with torch.device("meta"):
                keys.update(
                    spec.hf_class()(source.config.__class__.from_dict(source.config.to_dict())).state_dict()
                )
        except Exception:  # noqa: BLE001, S112  a class this config cannot build has no keys to offer
            continue
    return keys


def _names(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "") if keys else "none"


def _mismatch_message(
    model: PreTrainedModel,
    source: ModelSource,
    task: str,
    where: Any,
    missing: list[str],
    bad_shapes: list[str],
    shapes: dict[str, Any],
    unexpected: list[str],
) -> str:
    cls = type(model).__name__
    parts = []
    if missing:
        parts.append(
            f"lacks {len(missing)} of the {len(model.state_dict())} tensors of {cls}: {_names(missing)}"
        )
    if bad_shapes:
        shown = [f"{k} (checkpoint {list(shapes[k][0])}, model {list(shapes[k][1])})" for k in bad_shapes]
        parts.append(
            f"has {len(bad_shapes)} tensor(s) of another shape than its config.json gives: {_names(shown)}"
        )
    if unexpected:
        parts.append(
            f"holds {len(unexpected)} tensor(s) that no {source.family.title} class has: {_names(unexpected)}"
        )
    names, prefix = [*missing, *bad_shapes, *unexpected], getattr(model, "base_model_prefix", "")
    heads = sorted(
        {
            k if "." not in k else ".".join(k.split(".")[: 2 if k.startswith(prefix + ".") else 1]) + ".*"
            for k in names
        }
    )
    own = [
        t
        for t, spec in source.family.tasks.items()
        if spec.hf_class_name in (source.config.architectures or [])
    ]
    hint = (
        f" It was saved as {source.config.architectures[0]}: export {' or '.join(own)} (--task), or re-save "
        "it."
        if own and task not in own
        else " Re-save the complete model with save_pretrained (config.json and weights together)."
    )
    allow = (
        f" If that is meant (a head that starts untrained, tensors to drop), pass --allow-new-weights "
        f"{','.join(heads)}: fresh tensors get values seeded from --seed, and the manifest records them."
        if len(heads) <= 4 and len(names) * 4 <= len(model.state_dict())
        else ""
    )
    return (
        f"The weights in {where} do not fit {cls} (task {task}): the checkpoint {'; it '.join(parts)}. "
        "Loaded "
        "anyway, those tensors would get unseeded random values (or be dropped), so the export would not be "
        "the "
        f"model that was saved.{hint}{allow}"
    )


def _fresh_init(model: PreTrainedModel, names: list[str], seed: int) -> None:
    """Seeded per tensor name (not by load order), so a later ``vlexport validate`` rebuilds the same values.
    The usual layer init: biases 0, 1-D weights (norms) 1, the rest normal(0, SANE_INITIALIZER_RANGE)."""
    state = model.state_dict(keep_vars=True)  # the loading info names tensors as the model does
    with torch.no_grad():
        for name in names:
            if (t := state.get(name)) is None:
                raise CheckError(
                    f"--allow-new-weights: {type(model).__name__} has no tensor {name!r} to initialise."
                )
            if not t.is_floating_point():
                continue  # an integer buffer (position ids): the model's own values are not random
            if name.endswith("bias"):
                t.zero_()
            elif t.ndim == 1 and name.endswith("weight"):
                t.fill_(1.0)
            else:
                gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
                t.copy_(torch.randn(t.shape, generator=gen) * SANE_INITIALIZER_RANGE)
