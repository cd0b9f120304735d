"""Where a model's weights come from, in this order (docs/ARCHITECTURE.md, "Pitfalls").

1. a local directory given as the model argument (config.json + *.safetensors, written by
   ``save_pretrained``), 2. the offline Hugging Face cache, 3. the hub when reachable.
``--random-weights`` builds the architecture from the shipped config with seeded, sane-range
initialisation instead. Weights are never random silently: the origin is recorded in the manifest, a
checkpoint that lacks tensors of the task's class (or holds tensors of the wrong shape or that no class of
the family has) is refused unless ``--allow-new-weights`` names them (they then get values seeded from
``--seed``, so that ``vlexport validate`` rebuilds the same reference), and the manifest records a sha256 of
the weight files that validation checks. Only safetensors are loaded (no pickle).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import os
import socket
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel

from vlexport.errors import CheckError, UsageError
from vlexport.models import FamilySpec, family_for_model_type, get_family
from vlexport.presets import Preset, get_preset

# BLIP's vision config defaults to initializer_range=1e-10: random weights that small make every
# activation ~0 and every numerical comparison meaninglessly small. Random weights use this instead.
SANE_INITIALIZER_RANGE = 0.02
# Weight files are hashed in chunks this size: disk speed, flat memory (BLIP-2 is 14 GB).
HASH_CHUNK = 4 << 20
_RANDOM = "--random-weights [--seed N] (seeded random weights, for testing the pipeline; outputs are meaningless)"
_HASHES: dict[tuple[Any, ...], str] = {}  # (path, size, mtime, inode per file) -> sha256: one hash per process


@dataclass
class ModelSource:
    """A resolved model: its config, family and where the weights come from."""

    name: str  # preset name or local path, as the user gave it
    family: FamilySpec
    config: PretrainedConfig
    preset: Preset | None = None
    local_dir: Path | None = None
    origin: dict[str, Any] = field(default_factory=dict)  # {"kind": local|hf-cache|hub|random, ...}
    tasks: tuple[str, ...] = ()

    @property
    def default_task(self) -> str:
        return self.tasks[0]

    def check_task(self, task: str | None) -> str:
        task = task or self.default_task
        if task not in self.tasks:
            raise UsageError(f"Task {task!r} is not supported by {self.name} ({self.family.name}). "
                             f"Supported tasks: {', '.join(self.tasks)}. Pick one with --task.")
        return task


def resolve(model: str, *, random_weights: bool = False, seed: int = 0,
            allow_new_weights: tuple[str, ...] = ()) -> ModelSource:
    """Resolve a preset name or a local directory into a :class:`ModelSource` (no weights loaded).

    ``allow_new_weights``: glob patterns of tensors a checkpoint may lack (a head meant to be fresh).
    """
    path = Path(model).expanduser()
    if path.is_dir():
        src = _resolve_local(path, model)
    elif os.sep in model and not path.exists() and model.count("/") != 1:
        raise UsageError(f"Model directory {model!r} does not exist. Pass a preset name or an existing directory.")
    else:
        src = _resolve_preset(get_preset(model), random_weights, seed)
    if allow_new_weights and src.origin["kind"] != "random":  # validation re-creates the same fresh tensors
        src.origin.update(allow_new_weights=list(allow_new_weights), new_weights_seed=seed)
    return src


def _resolve_preset(preset: Preset, random_weights: bool, seed: int) -> ModelSource:
    config = _config_from_dict(preset.config_dict(), where=f"preset {preset.name}")
    src = ModelSource(preset.name, get_family(preset.family), config, preset=preset, tasks=preset.tasks)
    if random_weights:
        src.origin = {"kind": "random", "seed": seed, "initializer_range": SANE_INITIALIZER_RANGE}
        return src
    if preset.checkpoint is None:
        raise UsageError(_no_checkpoint_message(preset))
    cached = _from_hf_cache(preset.checkpoint)
    if cached is not None:
        src.local_dir = cached
        src.origin = {"kind": "hf-cache", "checkpoint": preset.checkpoint, "path": str(cached),
                      "sha256": weights_sha256(cached)}
        return src
    if _hub_reachable():
        src.origin = {"kind": "hub", "checkpoint": preset.checkpoint}
        return src
    from huggingface_hub import constants

    raise UsageError(
        f"No weights found for {preset.name}: the checkpoint {preset.checkpoint!r} is not in the offline Hugging "
        "Face cache and the hub is not reachable. Three ways out: (1) pass a local directory written by "
        "save_pretrained (config.json + *.safetensors) instead of the preset name; (2) on a machine with network "
        f"access run `hf download {preset.checkpoint}` and copy its Hugging Face cache into {constants.HF_HUB_CACHE} "
        f"here (or point HF_HUB_CACHE at the copy); (3) add {_RANDOM}.")


def _no_checkpoint_message(preset: Preset) -> str:
    """Presets without an upstream checkpoint: there is nothing to download, so do not suggest it."""
    if preset.is_tiny:
        return (f"{preset.name} is a tiny test preset: it has no upstream checkpoint, so there are no weights to "
                f"download or find in a cache. Only {_RANDOM} or a local directory written by save_pretrained works.")
    # the full-size presets without one are composed (`vlexport list` says so too)
    return (f"{preset.name} has no upstream checkpoint: it is composed from two encoders. Build a directory with "
            "`vlexport dual-encoder VISION_DIR TEXT_DIR -o DIR` (or pass any local directory written by "
            f"save_pretrained) instead of the preset name, or add {_RANDOM}.")


def _config_from_dict(d: dict[str, Any], *, where: str) -> PretrainedConfig:
    model_type = d.get("model_type")
    if model_type is None:
        raise UsageError(f"{where}: config.json has no model_type; it was not written by save_pretrained.")
    family_for_model_type(model_type, where=where)  # raises a UsageError for unsupported model types
    return AutoConfig.for_model(model_type, **{k: v for k, v in d.items() if k != "model_type"})


def _resolve_local(path: Path, name: str) -> ModelSource:
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise UsageError(f"{path} has no config.json. Pass a directory written by save_pretrained (config.json + "
                         "*.safetensors), or a preset name (`vlexport list`).")
    try:
        d = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{cfg_file} is not valid JSON ({e}). Re-save the model with save_pretrained.") from None
    config = _config_from_dict(d, where=str(path))
    family = family_for_model_type(d["model_type"], where=str(path))
    shards = sorted(path.glob("*.safetensors"))
    if not shards:
        extra = " It has PyTorch pickle files, which vlexport does not load (they can run code);" if any(
            path.glob("*.bin")) else ""
        raise UsageError(
            f"{path} has a config.json but no *.safetensors weights.{extra} Re-save it with "
            "model.save_pretrained(dir) (safetensors is the default), or use --random-weights with a preset."
        )
    for shard in shards:
        check_safetensors(shard)  # a truncated file fails here, naming itself, not deep inside from_pretrained
    archs = d.get("architectures") or []
    tasks = family.tasks_for_architectures(archs)
    origin = {"kind": "local", "path": str(path.resolve()), "sha256": weights_sha256(path)}
    return ModelSource(name, family, config, local_dir=path, origin=origin, tasks=tasks)


def check_safetensors(path: Path) -> str:
    """Check that a safetensors file is complete (header parses, data size matches); return its header.

    A truncated download otherwise fails deep inside from_pretrained with an unhelpful message.
    """
    size = path.stat().st_size
    try:
        with path.open("rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n <= 0 or 8 + n > size:
                raise ValueError("header length past end of file")
            header = f.read(n).decode("utf-8")
        meta = json.loads(header)
        end = max((v["data_offsets"][1] for k, v in meta.items() if k != "__metadata__"), default=0)
    except (struct.error, ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise CheckError(f"{path} is not a valid safetensors file ({e}). Re-download or re-save the weights.") from None
    if 8 + n + end != size:
        raise CheckError(
            f"{path} is truncated or corrupt: its header describes {8 + n + end} bytes, the file has {size}. "
            "Re-download or re-save the weights."
        )
    return header


def weights_sha256(directory: Path) -> str:
    """sha256 over the names and bytes of a directory's *.safetensors files (sorted), streamed in chunks.

    Memoised per process on each file's size, mtimes and inode: an export resolves its model more than once (a
    derived backend's parent, the benchmark's variants), and BLIP-2's 14 GB is hashed once."""
    shards = sorted(directory.glob("*.safetensors"))
    stats = [(s.name, s.stat()) for s in shards]  # stat follows the HF cache's symlinks to the blobs
    key = (str(directory.resolve()), *((n, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino) for n, st in stats))
    if key not in _HASHES:
        digest, buf = hashlib.sha256(), bytearray(HASH_CHUNK)
        view = memoryview(buf)
        for shard in shards:
            digest.update(shard.name.encode() + b"\0")
            with shard.open("rb") as f:
                while n := f.readinto(buf):
                    digest.update(view[:n])
        _HASHES[key] = digest.hexdigest()
    return _HASHES[key]


def _from_hf_cache(checkpoint: str) -> Path | None:
    try:
        from huggingface_hub import snapshot_download

        snap = Path(snapshot_download(checkpoint, local_files_only=True, allow_patterns=["*.json", "*.safetensors",
                                                                                      "*.txt", "*.model"]))
    except Exception:  # noqa: BLE001  not cached (huggingface_hub raises several types for that)
        return None
    return snap if (snap / "config.json").is_file() and any(snap.glob("*.safetensors")) else None


def _hub_reachable(timeout: float = 2.0) -> bool:
    """A quick probe: huggingface_hub otherwise retries for ~25 s before saying it is offline."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
        return False
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("://")[-1].split("/")[0]
    try:
        socket.create_connection((endpoint, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _sane_init_config(config: PretrainedConfig) -> PretrainedConfig:
    """A copy of the config whose initializer ranges (including sub-configs) are usable for random weights."""
    config = config.__class__.from_dict(config.to_dict())
    todo = [config]
    while todo:
        c = todo.pop()
        if getattr(c, "initializer_range", None) is not None and c.initializer_range < 1e-3:
            c.initializer_range = SANE_INITIALIZER_RANGE
        todo.extend(v for v in vars(c).values() if isinstance(v, PretrainedConfig))
    return config


def load_model(source: ModelSource, task: str) -> PreTrainedModel:
    """Instantiate the task's HF class with the source's weights: fp32, eval mode, eager reference.

    A checkpoint must fill the class exactly, or ``allow_new_weights`` cover the difference (:func:`_check_loaded`).
    """
    task_spec = source.family.task(task)
    cls = task_spec.hf_class()
    if source.origin.get("kind") == "random":
        torch.manual_seed(source.origin["seed"])
        model = cls(_sane_init_config(source.config))
        source.family.random_init(model)  # what the config alone cannot fix (BLIP-2's T5 LM head)
    else:
        where = source.local_dir if source.local_dir is not None else source.origin["checkpoint"]
        report, drop = logging.getLogger("transformers.modeling_utils"), lambda r: "LOAD REPORT" not in str(r.msg)
        report.addFilter(drop)  # our error replaces its stderr report (not a level: 5.24 then logs its TP-plan check)
        try:
            # ignore_mismatched_sizes: shape mismatches come back in the loading info and are judged below
            model, info = cls.from_pretrained(where, use_safetensors=True, dtype=torch.float32,
                                              output_loading_info=True, ignore_mismatched_sizes=True,
                                              **task_spec.load_kwargs(source.config))
        except (OSError, ValueError, RuntimeError) as e:
            raise CheckError(f"Could not load weights for {source.name} as {cls.__name__}: {e}") from None
        finally:
            report.removeFilter(drop)
        _check_loaded(model, info, source, task, where)
    task_spec.prepare(model)
    return model.eval()


def _check_loaded(model: PreTrainedModel, info: dict[str, Any], source: ModelSource, task: str, where: Any) -> None:
    """Missing, mismatched or unknown tensors are an error: transformers gives them unseeded random values (tied
    ones it reports as present), so the export passes against a model that is not the one saved and a later
    validate fails. Those the allow patterns cover get seeded values; their names go in origin["new_weights"]."""
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
        raise CheckError(_mismatch_message(model, source, task, where, bad_missing, bad_shapes, shapes, unexpected))
    fresh = sorted({*missing, *shapes})
    recorded = origin.get("new_weights")
    if recorded is not None and sorted(recorded) != fresh:  # validate: the checkpoint no longer loads as exported
        raise CheckError(f"{where} no longer loads as it did at export: the fresh tensors were {_names(recorded)}, "
                         f"now {_names(fresh)}. Re-export, or restore the weights.")
    if patterns:
        _fresh_init(model, fresh, int(origin.get("new_weights_seed", 0)))
        origin["new_weights"] = fresh
        if ignored := sorted(k for k in info["unexpected_keys"] if allowed(k)):
            origin["ignored_weights"] = ignored


def _family_keys(source: ModelSource) -> set[str]:
    """Every tensor name a complete save_pretrained of one of the family's task classes holds (meta device)."""
    keys: set[str] = set()
    for spec in {t.hf_class_name: t for t in source.family.tasks.values()}.values():
        try:
            with torch.device("meta"):
                keys.update(spec.hf_class()(source.config.__class__.from_dict(source.config.to_dict())).state_dict())
        except Exception:  # noqa: BLE001, S112  a class this config cannot build has no keys to offer
            continue
    return keys


def _names(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "") if keys else "none"


def _mismatch_message(model: PreTrainedModel, source: ModelSource, task: str, where: Any, missing: list[str],
                      bad_shapes: list[str], shapes: dict[str, Any], unexpected: list[str]) -> str:
    cls = type(model).__name__
    parts = []
    if missing:
        parts.append(f"lacks {len(missing)} of the {len(model.state_dict())} tensors of {cls}: {_names(missing)}")
    if bad_shapes:
        shown = [f"{k} (checkpoint {list(shapes[k][0])}, model {list(shapes[k][1])})" for k in bad_shapes]
        parts.append(f"has {len(bad_shapes)} tensor(s) of another shape than its config.json gives: {_names(shown)}")
    if unexpected:
        parts.append(f"holds {len(unexpected)} tensor(s) that no {source.family.title} class has: {_names(unexpected)}")
    names, prefix = [*missing, *bad_shapes, *unexpected], getattr(model, "base_model_prefix", "")
    heads = sorted({k if "." not in k else ".".join(k.split(".")[:2 if k.startswith(prefix + ".") else 1]) + ".*"
                    for k in names})
    own = [t for t, spec in source.family.tasks.items() if spec.hf_class_name in (source.config.architectures or [])]
    hint = (f" It was saved as {source.config.architectures[0]}: export {' or '.join(own)} (--task), or re-save it."
            if own and task not in own else " Re-save the complete model with save_pretrained (config.json and "
            "weights together).")
    allow = (f" If that is meant (a head that starts untrained, tensors to drop), pass --allow-new-weights "
             f"{','.join(heads)}: fresh tensors get values seeded from --seed, and the manifest records them."
             if len(heads) <= 4 and len(names) * 4 <= len(model.state_dict()) else "")
    return (f"The weights in {where} do not fit {cls} (task {task}): the checkpoint {'; it '.join(parts)}. Loaded "
            "anyway, those tensors would get unseeded random values (or be dropped), so the export would not be the "
            f"model that was saved.{hint}{allow}")


def _fresh_init(model: PreTrainedModel, names: list[str], seed: int) -> None:
    """Seeded per tensor name (not by load order), so a later ``vlexport validate`` rebuilds the same values.
    The usual layer init: biases 0, 1-D weights (norms) 1, the rest normal(0, SANE_INITIALIZER_RANGE)."""
    state = model.state_dict(keep_vars=True)  # the loading info names tensors as the model does
    with torch.no_grad():
        for name in names:
            if (t := state.get(name)) is None:
                raise CheckError(f"--allow-new-weights: {type(model).__name__} has no tensor {name!r} to initialise.")
            if not t.is_floating_point():
                continue  # an integer buffer (position ids): the model's own values are not random
            if name.endswith("bias"):
                t.zero_()
            elif t.ndim == 1 and name.endswith("weight"):
                t.fill_(1.0)
            else:
                gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
                t.copy_(torch.randn(t.shape, generator=gen) * SANE_INITIALIZER_RANGE)


def source_from_manifest(manifest: Any, directory: Path) -> ModelSource:
    """Rebuild the eager reference's source from an artifact: its config copy plus the recorded weights origin."""
    cfg_file = directory / "config.json"
    if not cfg_file.is_file():
        raise CheckError(f"{directory} has no config.json copy; the artifact is incomplete, export it again.")
    config = _config_from_dict(json.loads(cfg_file.read_text()), where=str(directory))
    origin = dict(manifest.weights)
    family = get_family(manifest.family)
    name = manifest.source.get("preset") or manifest.source.get("path") or str(directory)
    src = ModelSource(name, family, config, origin=origin, tasks=(manifest.task,))
    kind = origin.get("kind")
    if kind == "random":
        return src
    if kind == "local":
        path = Path(origin["path"])
        if not (path / "config.json").is_file():
            raise CheckError(f"The eager reference for {directory} was loaded from {path}, which no longer exists. "
                             "Restore it (validation needs the original weights), or export again from where it is.")
        src.local_dir = path
        _check_unchanged(origin, path, directory)
        return src
    checkpoint = origin.get("checkpoint")
    cached = _from_hf_cache(checkpoint) if checkpoint else None
    if cached is not None:
        src.local_dir = cached
        _check_unchanged(origin, cached, directory)
        return src
    if kind == "hub" and _hub_reachable():
        src.preset = get_preset(manifest.source["preset"])
        return src
    raise CheckError(f"The eager reference weights of {directory} ({checkpoint}) are not available offline: put "
                     f"them in the Hugging Face cache (`hf download {checkpoint}` where the hub is reachable, then "
                     "copy the cache here), or validate on the machine that exported it.")


def _check_unchanged(origin: dict[str, Any], weights: Path, directory: Path) -> None:
    """The eager reference must be the model that was exported: the recorded hash of the weights must hold."""
    recorded = origin.get("sha256")  # none: a hub origin, or a manifest from before the content hash
    if recorded is not None and (now := weights_sha256(weights)) != recorded:
        raise CheckError(
            f"The weights in {weights} changed since {directory} was exported (sha256 {recorded[:16]} recorded, "
            f"{now[:16]} now): validating against them would compare the artifact with another model. Re-export, "
            "or restore the weights.")
