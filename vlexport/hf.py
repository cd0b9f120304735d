"""A drop-in for Hugging Face model objects: ``vlexport.hf.from_artifact(directory)``.

Code written against transformers keeps its processor and swaps one line::

    model = BlipForConditionalGeneration.from_pretrained(path)   # before
    model = vlexport.hf.from_artifact(artifact_dir)               # after
    inputs = processor(images=image, return_tensors="pt")
    tokens = model.generate(**inputs, max_new_tokens=20)          # the token tensor HF returns

``__call__`` takes the processor's outputs (``pixel_values``, ``input_ids``, ``attention_mask``,
``pixel_mask``; torch tensors or numpy arrays) and returns an :class:`HFOutput` whose fields are the HF output
class's names (``itm_score``, ``logits``, ``logits_per_image``, ``image_embeds``, ...): torch tensors when
torch tensors came in, numpy arrays otherwise. Only the outputs the artifact exports are there (no hidden
states, no loss). The artifact is loaded once through :func:`vlexport.load`'s task objects, so the same checks
and errors apply.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from vlexport.errors import UsageError
from vlexport.runtime.tasks import DEFAULT_BATCH, EncoderTask, GenerateTask, Task, load


class HFOutput(Mapping[str, Any]):
    """Outputs by HF field name: ``out.logits``, ``out["logits"]``, ``out[0]`` and ``out.to_tuple()``, as
    transformers' ``ModelOutput`` allows."""

    def __init__(self, fields: dict[str, Any]):
        self._fields = dict(fields)

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["_fields"][name]
        except KeyError:
            raise AttributeError(
                f"this artifact's outputs are {list(self.__dict__['_fields'])}; it does not export {name!r}"
            ) from None

    def __getitem__(self, key: str | int) -> Any:
        if isinstance(key, int):
            return self.to_tuple()[key]
        return self._fields[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._fields)

    def __len__(self) -> int:
        return len(self._fields)

    def to_tuple(self) -> tuple[Any, ...]:
        return tuple(self._fields.values())

    def __repr__(self) -> str:
        shown = ", ".join(f"{k}={getattr(v, 'shape', v)}" for k, v in self._fields.items())
        return f"HFOutput({shown})"


def _numpy(value: Any, name: str) -> tuple[np.ndarray, bool]:
    """(array, whether it was a torch tensor); torch is never imported here."""
    if type(value).__module__.startswith("torch"):
        return value.detach().cpu().numpy(), True
    if isinstance(value, np.ndarray):
        return value, False
    if isinstance(value, (list, tuple)):
        return np.asarray(value), False
    raise UsageError(
        f"{name} is {type(value).__name__}; pass the processor's output (a torch tensor or a numpy "
        "array, return_tensors='pt' or 'np')."
    )


class HFModel:
    """What ``from_artifact`` returns; ``task`` is the underlying :func:`vlexport.load` object."""

    def __init__(self, task: Task):
        self.task = task
        self.manifest = task.manifest

    def __repr__(self) -> str:
        return f"<vlexport.hf {self.manifest.hf_class} from {self.task.directory}>"

    def _inputs(self, given: dict[str, Any]) -> tuple[dict[str, np.ndarray], bool]:
        arrays, torch_in = {}, False
        for name, value in given.items():
            if value is None:
                continue
            arrays[name], was_torch = _numpy(value, name)
            torch_in |= was_torch
        if "pixel_values" not in arrays:
            raise UsageError(
                "pixel_values is required: pass the processor's outputs (processor(images=..., "
                "text=..., return_tensors='pt')) as keyword arguments."
            )
        pixels = arrays["pixel_values"]
        if pixels.ndim != 4 or pixels.dtype.kind != "f":
            raise UsageError(
                f"pixel_values must be float [batch, 3, height, width]; got {pixels.dtype} "
                f"{list(pixels.shape)}."
            )
        arrays["pixel_values"] = self.task.pixels(pixels.astype(np.float32))  # size and finiteness checked
        for name in ("input_ids", "attention_mask"):
            if name in arrays:
                if arrays[name].ndim == 1:
                    arrays[name] = arrays[name][None]
                arrays[name] = arrays[name].astype(np.int64)
        return arrays, torch_in

    @staticmethod
    def _out(value: np.ndarray, torch_out: bool) -> Any:
        if not torch_out:
            return value
        import torch

        return torch.from_numpy(np.ascontiguousarray(value))

    def _check_call(self, kwargs: dict[str, Any]) -> None:
        """What ``forward`` cannot take from this artifact, refused before any work."""
        if not isinstance(self.task, EncoderTask):
            raise UsageError(
                f"{self.manifest.hf_class} artifacts are exported for generation (an encoder and a "
                "decoder with its KV cache): call .generate(**inputs), which returns HF's tokens."
            )
        unknown = set(kwargs) - {"pixel_mask", "token_type_ids", "return_dict", "return_loss", "use_itm_head"}
        if unknown:
            raise UsageError(
                f"unexpected argument(s) {sorted(unknown)}: pass the processor's outputs "
                "(pixel_values, input_ids, attention_mask, pixel_mask)."
            )
        if "use_itm_head" in kwargs and bool(kwargs["use_itm_head"]) != (self.manifest.task == "itm"):
            raise UsageError(
                f"{self.task.directory} holds the {self.manifest.task} head; use_itm_head="
                f"{kwargs['use_itm_head']} asks for the other one: export --task "
                f"{'itc' if self.manifest.task == 'itm' else 'itm'} for it."
            )

    def __call__(
        self, pixel_values: Any = None, input_ids: Any = None, attention_mask: Any = None, **kwargs: Any
    ) -> HFOutput:
        """One forward over the batch, as the HF model's ``forward``: outputs by HF field name."""
        self._check_call(kwargs)
        arrays, torch_out = self._inputs(
            {
                "pixel_values": pixel_values,
                "input_ids": input_ids,
                "attention_mask": attention_mask,
                "pixel_mask": kwargs.get("pixel_mask"),
            }
        )
        if "input_ids" not in arrays:
            raise UsageError(
                f"{self.manifest.hf_class} takes texts as well: pass input_ids (and attention_mask)."
            )
        ids, pixels = arrays["input_ids"], arrays["pixel_values"]
        mask = arrays.get("attention_mask", np.ones_like(ids))
        if ids.ndim != 2 or mask.shape != ids.shape:
            raise UsageError(
                f"input_ids must be [batch, sequence] with an attention_mask of the same shape; got "
                f"{list(ids.shape)} and {list(mask.shape)}."
            )
        limit = self.task._limit
        if limit is not None and ids.shape[1] > limit:
            raise UsageError(
                f"input_ids are {ids.shape[1]} tokens, more than the {limit} this model's position "
                "table holds; truncate them (processor(..., truncation=True, max_length=...))."
            )
        m, n = len(pixels), len(ids)
        if m != n and self.task.matrix is None:
            raise UsageError(
                f"{m} images and {n} texts: this graph pairs them row by row, so pass as many of each."
            )
        width = max(m, n)  # a two-tower graph takes one batch size: repeat the last row of the shorter side
        take_i, take_t = np.minimum(np.arange(width), m - 1), np.minimum(np.arange(width), n - 1)
        feeds = self.task.spec.run_inputs(
            {"input_ids": ids[take_t], "attention_mask": mask[take_t], "pixel_values": pixels[take_i]}
        )
        if "pixel_mask" in arrays:
            feeds["pixel_mask"] = arrays["pixel_mask"][take_i].astype(
                feeds.get("pixel_mask", arrays["pixel_mask"]).dtype
            )
        names = getattr(self.task.component, "input_names", list(feeds))
        with self.task._lock:
            out = self.task.component({k: feeds[k] for k in names if k in feeds})
        fields = {}
        for spec in self.manifest.components[self.task.component_name].outputs:
            value = out[spec.name]
            if spec.name == self.task.matrix:
                value = value[:m, :n]
            elif m != n:  # per-row outputs of the padded side are cut back to that side's count
                value = value[: (n if "text" in spec.name else m)]
            fields[spec.name] = value
        if "logits_per_image" in fields and "logits_per_text" not in fields:
            fields = {
                "logits_per_image": fields["logits_per_image"],
                "logits_per_text": np.ascontiguousarray(fields["logits_per_image"].T),
                **{k: v for k, v in fields.items() if k != "logits_per_image"},
            }
        return HFOutput({k: self._out(v, torch_out) for k, v in fields.items()})

    def generate(
        self,
        pixel_values: Any = None,
        input_ids: Any = None,
        attention_mask: Any = None,
        *,
        max_new_tokens: int | None = None,
        num_beams: int | None = None,
        **kwargs: Any,
    ) -> Any:
        """HF ``generate()``: the ``[batch, prompt + new tokens]`` token tensor (rows that end early
        padded)."""
        if not isinstance(self.task, GenerateTask):
            raise UsageError(
                f"{self.manifest.hf_class} artifacts score or embed their inputs; call the object "
                "(model(**inputs)) instead of generate()."
            )
        sampling = {
            k: v for k, v in kwargs.items() if k in ("do_sample", "temperature", "top_k", "top_p") and v
        }
        unknown = set(kwargs) - {"do_sample", "temperature", "top_k", "top_p", "interpolate_pos_encoding"}
        if sampling or unknown:
            drop = sorted(unknown) or sorted(sampling)
            raise UsageError(f"generate() of an artifact runs greedy or beam search only; drop {drop}.")
        arrays, torch_out = self._inputs(
            {"pixel_values": pixel_values, "input_ids": input_ids, "attention_mask": attention_mask}
        )
        s = self.task.settings
        new = int(s.get("default_max_new_tokens", 20)) if max_new_tokens is None else max_new_tokens
        beams = int(s.get("default_num_beams", 1)) if num_beams is None else num_beams
        with self.task._lock:
            result = self.task.generator.generate(
                arrays["pixel_values"],
                arrays.get("input_ids"),
                arrays.get("attention_mask"),
                max_new_tokens=new,
                num_beams=beams,
            )
        return self._out(result.sequences.astype(np.int64), torch_out)


def from_artifact(directory: str | Path, device: str = "auto", threads: int | None = None) -> HFModel:
    """Load an artifact as a stand-in for the HF model object it was exported from (see the module doc)."""
    return HFModel(load(directory, device=device, threads=threads, batch_size=DEFAULT_BATCH))
