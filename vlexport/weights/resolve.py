"""Where a model's weights come from, in this order (docs/ARCHITECTURE.md, "Pitfalls").

1. a local directory given as the model argument (config.json + *.safetensors, written by
   ``save_pretrained``), 2. the offline Hugging Face cache, 3. the hub when reachable.
``--random-weights`` builds the architecture from the shipped config with seeded, sane-range
initialisation instead. Weights are never random silently: the origin is recorded in the manifest.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformers import AutoConfig, PretrainedConfig

from vlexport.errors import CheckError, UsageError
from vlexport.models import FamilySpec, family_for_model_type, get_family
from vlexport.presets import Preset, get_preset
from vlexport.weights.integrity import check_safetensors, check_unchanged, weights_sha256

if TYPE_CHECKING:
    from vlexport.contracts.manifest import Manifest


# BLIP's vision config defaults to initializer_range=1e-10: random weights that small make every
# activation ~0 and every numerical comparison meaninglessly small. Random weights use this instead.
SANE_INITIALIZER_RANGE = 0.02


RANDOM_WEIGHTS_HINT = (
    "--random-weights [--seed N] (seeded random weights, for testing the pipeline; outputs are meaningless)"
)


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


def resolve(
    model: str, *, random_weights: bool = False, seed: int = 0, allow_new_weights: tuple[str, ...] = ()
) -> ModelSource:
    """Resolve a preset name or a local directory into a :class:`ModelSource` (no weights loaded).

    ``allow_new_weights``: glob patterns of tensors a checkpoint may lack (a head meant to be fresh).
    """
    path = Path(model).expanduser()
    if path.is_dir():
        src = _resolve_local(path, model)
    elif os.sep in model and not path.exists() and model.count("/") != 1:
        raise UsageError(
            f"Model directory {model!r} does not exist. Pass a preset name or an existing directory."
        )
    else:
        src = _resolve_preset(get_preset(model), random_weights, seed)
    if allow_new_weights and src.origin["kind"] != "random":  # validation re-creates the same fresh tensors
        src.origin.update(allow_new_weights=list(allow_new_weights), new_weights_seed=seed)
    return src


def _resolve_preset(preset: Preset, random_weights: bool, seed: int) -> ModelSource:
    config = _config_from_dict(preset.config_dict(), where=f"preset {preset.name}")
    src = ModelSource(preset.name, get_family(preset.family), config, preset=preset, tasks=preset.tasks)
    if random_weights:
        # No checkpoint, so no head is missing: every task of the family builds on this architecture (the
        # preset's own tasks stay first, so its default is unchanged)
        family_tasks = tuple(t for t in src.family.tasks if t not in preset.tasks)
        src.tasks = preset.tasks + family_tasks
        src.origin = {"kind": "random", "seed": seed, "initializer_range": SANE_INITIALIZER_RANGE}
        return src
    if preset.checkpoint is None:
        raise UsageError(_no_checkpoint_message(preset))
    cached = _from_hf_cache(preset.checkpoint)
    if cached is not None:
        src.local_dir = cached
        src.origin = {
            "kind": "hf-cache",
            "checkpoint": preset.checkpoint,
            "path": str(cached),
            "sha256": weights_sha256(cached),
        }
        return src
    if _hub_reachable():
        src.origin = {"kind": "hub", "checkpoint": preset.checkpoint}
        return src
    from huggingface_hub import constants

    raise UsageError(
        f"No weights found for {preset.name}: the checkpoint {preset.checkpoint!r} is not in the offline "
        "Hugging "
        "Face cache and the hub is not reachable. Three ways out: (1) pass a local directory written by "
        "save_pretrained (config.json + *.safetensors) instead of the preset name; (2) on a machine with "
        "network "
        f"access run `hf download {preset.checkpoint}` and copy its Hugging Face cache into "
        f"{constants.HF_HUB_CACHE} "
        f"here (or point HF_HUB_CACHE at the copy); (3) add {RANDOM_WEIGHTS_HINT}."
    )


def _no_checkpoint_message(preset: Preset) -> str:
    """Presets without an upstream checkpoint: there is nothing to download, so do not suggest it."""
    if preset.is_tiny:
        return (
            f"{preset.name} is a tiny test preset: it has no upstream checkpoint, so there are no weights to "
            f"download or find in a cache. Only {RANDOM_WEIGHTS_HINT} or a local directory written by "
            "save_pretrained works."
        )
    # the full-size presets without one are composed (`vlexport list` says so too)
    return (
        f"{preset.name} has no upstream checkpoint: it is composed from two encoders. Build a directory with "
        "`vlexport dual-encoder VISION_DIR TEXT_DIR -o DIR` (or pass any local directory written by "
        f"save_pretrained) instead of the preset name, or add {RANDOM_WEIGHTS_HINT}."
    )


def _config_from_dict(d: dict[str, Any], *, where: str) -> PretrainedConfig:
    model_type = d.get("model_type")
    if model_type is None:
        raise UsageError(f"{where}: config.json has no model_type; it was not written by save_pretrained.")
    family_for_model_type(model_type, where=where)  # raises a UsageError for unsupported model types
    return AutoConfig.for_model(model_type, **{k: v for k, v in d.items() if k != "model_type"})


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
        raise UsageError(
            f"{cfg_file} is not valid JSON ({e}). Re-save the model with save_pretrained."
        ) from None
    config = _config_from_dict(d, where=str(path))
    family = family_for_model_type(d["model_type"], where=str(path))
    shards = sorted(path.glob("*.safetensors"))
    if not shards:
        extra = (
            " It has PyTorch pickle files, which vlexport does not load (they can run code);"
            if any(path.glob("*.bin"))
            else ""
        )
        raise UsageError(
            f"{path} has a config.json but no *.safetensors weights.{extra} Re-save it with "
            "model.save_pretrained(dir) (safetensors is the default), or use --random-weights with a preset."
        )
    for shard in shards:
        # a truncated file fails here, naming itself, not deep inside from_pretrained
        check_safetensors(shard)
    archs = d.get("architectures") or []
    tasks = family.tasks_for_architectures(archs)
    origin = {"kind": "local", "path": str(path.resolve()), "sha256": weights_sha256(path)}
    return ModelSource(name, family, config, local_dir=path, origin=origin, tasks=tasks)


def _from_hf_cache(checkpoint: str) -> Path | None:
    try:
        from huggingface_hub import snapshot_download

        snap = Path(
            snapshot_download(
                checkpoint,
                local_files_only=True,
                allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"],
            )
        )
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


def sane_init_config(config: PretrainedConfig) -> PretrainedConfig:
    """A copy of the config whose initializer ranges (including sub-configs) are usable for random weights."""
    config = config.__class__.from_dict(config.to_dict())
    todo = [config]
    while todo:
        c = todo.pop()
        if getattr(c, "initializer_range", None) is not None and c.initializer_range < 1e-3:
            c.initializer_range = SANE_INITIALIZER_RANGE
        todo.extend(v for v in vars(c).values() if isinstance(v, PretrainedConfig))
    return config


def source_from_manifest(manifest: Manifest, directory: Path) -> ModelSource:
    """Rebuild the eager reference's source from an artifact: its config copy plus the recorded weights
    origin."""
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
                f"The eager reference for {directory} was loaded from {path}, which no longer exists. "
                "Restore it (validation needs the original weights), or export again from where it is."
            )
        src.local_dir = path
        check_unchanged(origin, path, directory)
        return src
    checkpoint = origin.get("checkpoint")
    cached = _from_hf_cache(checkpoint) if checkpoint else None
    if cached is not None:
        src.local_dir = cached
        check_unchanged(origin, cached, directory)
        return src
    if kind == "hub" and _hub_reachable():
        src.preset = get_preset(manifest.source["preset"])
        return src
    raise CheckError(
        f"The eager reference weights of {directory} ({checkpoint}) are not available offline: put "
        f"them in the Hugging Face cache (`hf download {checkpoint}` where the hub is reachable, then "
        "copy the cache here), or validate on the machine that exported it."
    )
