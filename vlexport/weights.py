"""Where a model's weights come from, in this order (docs/ARCHITECTURE.md, "Pitfalls").

1. a local directory given as the model argument (config.json + *.safetensors, written by
   ``save_pretrained``), 2. the offline Hugging Face cache, 3. the hub when reachable.
``--random-weights`` builds the architecture from the shipped config with seeded, sane-range
initialisation instead. Weights are never random silently: the origin is recorded in the manifest.
Only safetensors are loaded (no pickle).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import struct
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
            raise UsageError(
                f"Task {task!r} is not supported by {self.name} ({self.family.name}). "
                f"Supported tasks: {', '.join(self.tasks)}. Pick one with --task."
            )
        return task


def resolve(model: str, *, random_weights: bool = False, seed: int = 0,
            allow_new_weights: tuple[str, ...] = ()) -> ModelSource:
    """Resolve a preset name or a local directory into a :class:`ModelSource` (no weights loaded).

    ``allow_new_weights``: glob patterns of tensors a checkpoint may lack (a head meant to be fresh).
    """
    path = Path(model).expanduser()
    if path.is_dir():
        return _resolve_local(path, model)
    if os.sep in model and not path.exists() and model.count("/") != 1:
        raise UsageError(f"Model directory {model!r} does not exist. Pass a preset name or an existing directory.")
    preset = get_preset(model)
    config = _config_from_dict(preset.config_dict(), where=f"preset {preset.name}")
    family = get_family(preset.family)
    src = ModelSource(model, family, config, preset=preset, tasks=preset.tasks)
    if random_weights:
        src.origin = {"kind": "random", "seed": seed, "initializer_range": SANE_INITIALIZER_RANGE}
        return src
    if preset.checkpoint is not None:
        cached = _from_hf_cache(preset.checkpoint)
        if cached is not None:
            src.local_dir = cached
            src.origin = {"kind": "hf-cache", "checkpoint": preset.checkpoint, "path": str(cached)}
            return src
        if _hub_reachable():
            src.origin = {"kind": "hub", "checkpoint": preset.checkpoint}
            return src
    where = f"the checkpoint {preset.checkpoint!r}" if preset.checkpoint else "this preset (it has no upstream checkpoint)"
    raise UsageError(
        f"No weights found for {model}: {where} is not in the offline Hugging Face cache and the hub is not "
        "reachable. Three ways out: (1) pass a local directory written by save_pretrained (config.json + "
        "*.safetensors) instead of the preset name; (2) download the checkpoint into the HF cache on a machine "
        f"with network access (huggingface-cli download {preset.checkpoint or '<id>'}) and copy the cache here; "
        "(3) add --random-weights [--seed N] to build the architecture with seeded random weights (for testing "
        "the pipeline; outputs are meaningless)."
    )


def _config_from_dict(d: dict[str, Any], *, where: str) -> PretrainedConfig:
    model_type = d.get("model_type")
    if model_type is None:
        raise UsageError(f"{where}: config.json has no model_type; it was not written by save_pretrained.")
    family_for_model_type(model_type, where=where)  # raises a UsageError for unsupported model types
    d = dict(d)
    d.pop("model_type")
    return AutoConfig.for_model(model_type, **d)


def _resolve_local(path: Path, name: str) -> ModelSource:
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise UsageError(
            f"{path} has no config.json. Pass a directory written by save_pretrained (config.json + "
            "*.safetensors), or a preset name (`vlexport list`)."
        )
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
    digest = hashlib.sha256()
    for shard in shards:
        digest.update(check_safetensors(shard).encode())
    archs = d.get("architectures") or []
    tasks = family.tasks_for_architectures(archs)
    origin = {"kind": "local", "path": str(path.resolve()), "header_sha256": digest.hexdigest()[:16]}
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


def _from_hf_cache(checkpoint: str) -> Path | None:
    try:
        from huggingface_hub import snapshot_download

        snap = Path(snapshot_download(checkpoint, local_files_only=True, allow_patterns=["*.json", "*.safetensors",
                                                                                      "*.txt", "*.model"]))
    except Exception:  # not cached (huggingface_hub raises several types for that)
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
    """Instantiate the task's HF class with the source's weights: fp32, eval mode, eager reference."""
    task_spec = source.family.task(task)
    cls = task_spec.hf_class()
    if source.origin.get("kind") == "random":
        torch.manual_seed(source.origin["seed"])
        model = cls(_sane_init_config(source.config))
        source.family.random_init(model)  # what the config alone cannot fix (BLIP-2's T5 LM head)
    else:
        where = source.local_dir if source.local_dir is not None else source.origin["checkpoint"]
        try:
            model = cls.from_pretrained(where, use_safetensors=True, dtype=torch.float32,
                                        **task_spec.load_kwargs(source.config))
        except (OSError, ValueError, RuntimeError) as e:
            raise CheckError(f"Could not load weights for {source.name} as {cls.__name__}: {e}") from None
    task_spec.prepare(model)
    return model.eval()


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
            raise CheckError(
                f"The eager reference for {directory} was loaded from {path}, which no longer exists. Restore it "
                "(validation needs the original weights), or export again from the new location."
            )
        src.local_dir = path
        return src
    checkpoint = origin.get("checkpoint")
    cached = _from_hf_cache(checkpoint) if checkpoint else None
    if cached is not None:
        src.local_dir = cached
        return src
    if kind == "hub" and _hub_reachable():
        src.preset = get_preset(manifest.source["preset"])
        return src
    raise CheckError(f"The eager reference weights of {directory} ({checkpoint}) are not available offline; "
                     "put the checkpoint in the HF cache or validate on the machine that exported it.")
