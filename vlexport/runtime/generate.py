"""Generation on an artifact: encoders once, then a KV-cache decode loop with HF ``generate()`` semantics.

The ``Generator`` checks a request, runs the task's recipe (models/generative.py: what the model's own
``generate()`` does before its decode loop: encoders, prompt rules) and hands the decoder prompt to a decode
strategy (runtime/decode.py: greedy and beam search as in transformers, numpy only) stepping the exported
decoder (runtime/decoder_session.py: KV cache, ONNX Runtime IO binding). The mask is inferred from pad
tokens when none is given, as ``_prepare_attention_mask_for_generation`` does.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from vlexport.errors import CheckError, UsageError
from vlexport.models.host import DECODER, GenerationRecipe
from vlexport.runtime.decode import SearchSettings, search
from vlexport.runtime.decoder_session import DecoderSession, input_dtypes

if TYPE_CHECKING:
    from vlexport.contracts.family import ComponentSpec
    from vlexport.runtime import Artifact


@dataclass
class GenerationOutput:
    sequences: np.ndarray  # [batch, decoder prompt + new tokens], what HF generate() returns
    prompt_length: int  # decoder prompt length: sequences[:, prompt_length:] are the new tokens
    logits: list[np.ndarray] = field(default_factory=list)  # raw logits per step, [batch * beams, vocab]
    # beam search, with output_logits: per step and batch row, the smallest gap between the ranked candidate
    # scores that decide which hypotheses run next, and in which row order ([batch]); see
    # decode.selection_margin
    beam_margins: list[np.ndarray] = field(default_factory=list)

    @property
    def new_tokens(self) -> np.ndarray:
        return self.sequences[:, self.prompt_length :]


class ConfigView:
    """Attribute view of a config.json (nested dicts as views): what recipes read, without transformers."""

    def __init__(self, d: Mapping[str, Any]):
        self.__dict__.update({k: ConfigView(v) if isinstance(v, dict) else v for k, v in d.items()})


def artifact_config(directory: Path) -> Any:
    """The HF config copy of an artifact (recipes depend on it, e.g. BLIP-2 with OPT or T5).

    Without transformers installed (a compiled artifact deployed with torch alone), a plain view of the file.
    """
    from vlexport.userdata import brief, kind_of, read_json

    try:
        from transformers import AutoConfig
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    except ImportError:
        AutoConfig = CONFIG_MAPPING = None

    path = Path(directory) / "config.json"
    if not path.is_file():
        raise CheckError(f"{directory} has no config.json; the artifact is incomplete, export it again.")
    again = "The artifact is damaged: export it again."
    d = read_json(path, advice=again)
    if not isinstance(d, dict):
        raise CheckError(f"{path} holds {kind_of(d)}, not a model config object. {again}")
    model_type = d.pop("model_type", None)
    if model_type is None:
        raise CheckError(f"{path} has no model_type; the artifact is damaged, export it again.")
    if AutoConfig is None:
        return ConfigView({**d, "model_type": model_type})
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        raise CheckError(
            f"{path}: model_type {model_type!r:.60} is not a model type this transformers knows. {again}"
        )
    try:
        return AutoConfig.for_model(model_type, **d)
    except Exception as e:  # noqa: BLE001  a config class may raise anything on values of the wrong type
        raise CheckError(f"{path} is not a valid {model_type} config ({brief(e)}). {again}") from None


class Generator:
    """An artifact directory as a generator: ``generate(pixel_values, input_ids, attention_mask, ...)``.

    Same call and result as the eager model's ``generate()`` for the task (token ids in, token ids out);
    text in / text out lives in runtime/run.py.
    """

    def __init__(self, artifact: Artifact, config: Any | None = None):
        task = artifact.task_spec
        if not task.generative or task.generation is None:
            raise UsageError(
                f"{artifact.directory} holds a {artifact.manifest.task!r} artifact, which does not "
                "generate text; `vlexport run` prints its scores instead."
            )
        self.artifact = artifact
        self.config = config if config is not None else artifact_config(artifact.directory)
        self.recipe: GenerationRecipe = task.generation(self.config)
        self.settings: dict[str, Any] = dict(artifact.manifest.generation)
        if not self.settings:
            raise CheckError(
                f"{artifact.directory}/manifest.json has no generation settings; export it again."
            )
        needed = [s for s in self.recipe.stages if isinstance(s, str)] + [DECODER]
        missing = [n for n in needed if n not in artifact.components]
        if missing:
            raise CheckError(
                f"{artifact.directory} lacks component(s) {missing} that {artifact.manifest.family} "
                f"{artifact.manifest.task} generation needs (has {sorted(artifact.components)}); "
                "the manifest does not describe a complete artifact. Export it again."
            )
        check_components_match_manifest(artifact)
        specs = artifact.manifest.components
        # Declared input dtypes per stage component: the request's arrays are cast to what each graph takes.
        self._dtypes = {n: input_dtypes(specs.get(n)) for n in needed if n != DECODER}
        self._search = SearchSettings.from_settings(self.settings)
        self.eos = np.array(self._search.eos_token_id, dtype=np.int64)

    @functools.cached_property
    def decoder(self) -> Any:
        """The decode-step source, made on first use: a lazily loaded artifact (``load_artifact(lazy=True)``)
        loads its decoder only when the encoders are done."""
        spec = self.artifact.manifest.components.get(DECODER)
        return _decoder_session(self.artifact.components[DECODER], spec)

    def release_encoders(self) -> None:
        """Give back the memory of the recipe's encoder components (lazily loaded ones; others stay): a
        one-shot run calls it between encoding its requests and decoding them."""
        for stage in self.recipe.stages:
            if isinstance(stage, str):
                release = getattr(self.artifact.components[stage], "release", None)
                if release is not None:
                    release()

    # ------------------------------------------------------------ public
    def generate(
        self,
        pixel_values: np.ndarray,
        input_ids: np.ndarray | None = None,
        attention_mask: np.ndarray | None = None,
        *,
        max_new_tokens: int = 20,
        num_beams: int = 1,
        min_new_tokens: int = 0,
        output_logits: bool = False,
        on_step: Callable[[int], None] | None = None,
        decoder: Any | None = None,
    ) -> GenerationOutput:
        """Greedy (``num_beams=1``) or beam search; ``on_step(i)`` is called when step i's logits are
        ready. ``decoder``: what makes the request's decode step instead of the artifact's own decoder session
        (a ``step(env, mask, first_step=, repeat=)`` like DecoderSession's; serving's batcher)."""
        self.check_request(pixel_values, input_ids, max_new_tokens, num_beams, min_new_tokens)
        env = self.encode(pixel_values, input_ids, attention_mask)
        return self.decode(
            env,
            max_new_tokens=max_new_tokens,
            num_beams=num_beams,
            min_new_tokens=min_new_tokens,
            output_logits=output_logits,
            on_step=on_step,
            decoder=decoder,
        )

    def encode(
        self,
        pixel_values: np.ndarray,
        input_ids: np.ndarray | None = None,
        attention_mask: np.ndarray | None = None,
    ) -> dict[str, np.ndarray]:
        """Run the recipe's stages (encoders and prompt rules) once per request."""
        env: dict[str, Any] = {"pixel_values": np.ascontiguousarray(pixel_values, dtype=self._pixel_dtype())}
        if input_ids is not None:
            env["input_ids"] = np.asarray(input_ids, dtype=np.int64)
        if attention_mask is not None:
            env["attention_mask"] = np.asarray(attention_mask, dtype=np.int64)
        for stage in self.recipe.stages:
            if isinstance(stage, str):
                component = self.artifact.components[stage]
                names = getattr(component, "input_names", None) or [n for n in env]
                lacking = [n for n in names if n not in env]
                if lacking:
                    raise UsageError(
                        f"{stage} needs {lacking}: the {self.artifact.manifest.task} task needs a text "
                        "prompt (--text) besides the image."
                    )
                dtypes = self._dtypes.get(stage, {})
                env.update(component({n: _as_dtype(env[n], dtypes.get(n)) for n in names}))
            else:
                env.update(stage(env, self.settings))
        return env

    def decode(
        self,
        env: Mapping[str, Any],
        *,
        max_new_tokens: int,
        num_beams: int = 1,
        min_new_tokens: int = 0,
        output_logits: bool = False,
        on_step: Callable[[int], None] | None = None,
        decoder: Any | None = None,
    ) -> GenerationOutput:
        prompt = env["decoder_input_ids"].astype(np.int64)
        mask = env.get("decoder_attention_mask")
        max_pos = self.settings.get("max_positions")
        if max_pos is not None and prompt.shape[1] + max_new_tokens > max_pos:
            raise UsageError(
                f"The prompt is {prompt.shape[1]} tokens and {max_new_tokens} new tokens are asked for: "
                f"{prompt.shape[1] + max_new_tokens} positions, more than the model's {max_pos} "
                "(max_position_embeddings). Shorten the prompt or lower --max-new-tokens."
            )
        if prompt.shape[1] == 0:
            raise UsageError("The decoder prompt is empty: give at least one token besides the special ones.")
        if mask is None:
            mask = self._default_mask(prompt)
        # static-cache packages: compiled length and rows
        check = getattr(self.decoder, "check_request", None)
        if check is not None:
            check(prompt.shape[0] * num_beams, prompt.shape[1], max_new_tokens)
        source = self.decoder if decoder is None else decoder
        step = source.step(env, mask, first_step=self.recipe.first_step, repeat=num_beams)
        out = search(
            step,
            prompt,
            self._search,
            num_beams=num_beams,
            max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens,
            output_logits=output_logits,
            on_step=on_step,
        )
        return GenerationOutput(out.sequences, prompt.shape[1], out.logits, out.beam_margins)

    # ------------------------------------------------------------ checks
    def check_request(
        self,
        pixel_values: np.ndarray,
        input_ids: np.ndarray | None,
        max_new_tokens: int,
        num_beams: int,
        min_new_tokens: int = 0,
    ) -> None:
        """A request's shapes and options, refused before any work (UsageError)."""
        if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens <= 0:
            raise UsageError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}.")
        if not isinstance(num_beams, (int, np.integer)) or num_beams < 1:
            raise UsageError(f"num_beams must be an integer >= 1, got {num_beams!r}.")
        if min_new_tokens < 0:
            raise UsageError(f"min_new_tokens must be >= 0, got {min_new_tokens!r}.")
        if pixel_values.ndim != 4:
            raise UsageError(
                f"pixel_values must be [batch, channels, height, width], got shape {pixel_values.shape}."
            )
        size = self.artifact.manifest.image_size
        if size is not None and tuple(pixel_values.shape[2:]) != (size, size):
            raise UsageError(
                f"The artifact takes {size}x{size} images; got {pixel_values.shape[2]}x"
                f"{pixel_values.shape[3]}. Resize to the manifest's image_size."
            )
        if input_ids is None and self.recipe.needs_prompt:
            raise UsageError(
                f"{self.artifact.manifest.family} {self.artifact.manifest.task} needs a text prompt "
                "(--text): the model generates an answer to it."
            )
        max_pos = self.settings.get("max_positions")
        if input_ids is not None:
            if input_ids.ndim != 2 or input_ids.shape[0] != pixel_values.shape[0]:
                raise UsageError(
                    f"input_ids must be [batch, sequence] with the images' batch "
                    f"{pixel_values.shape[0]}; got shape {tuple(input_ids.shape)}."
                )
            if max_pos is not None and input_ids.shape[1] > max_pos:
                raise UsageError(
                    f"The prompt is {input_ids.shape[1]} tokens, longer than the model's "
                    f"{max_pos} positions (max_position_embeddings). Shorten the prompt."
                )

    def _default_mask(self, ids: np.ndarray) -> np.ndarray:
        """HF's mask when none is given: ones, unless pad occurs in the prompt and pad is not an eos token."""
        pad = self.settings["pad_token_id"]
        if pad is not None and (ids == pad).any() and not np.isin(self.eos, [pad]).any():
            return (ids != pad).astype(np.int64)
        return np.ones_like(ids)

    def _pixel_dtype(self) -> np.dtype:
        """The dtype of the first stage component that takes pixel_values (fp16 graphs take fp16 images)."""
        for dtypes in self._dtypes.values():
            if "pixel_values" in dtypes:
                return dtypes["pixel_values"]
        return np.dtype(np.float32)


def _decoder_session(component: Any, spec: ComponentSpec) -> Any:
    """The decoder's DecodeStep source: a static-cache package (runtime/static_step.py) or a
    past-in/present-out graph (runtime/decoder_session.py), told apart by the inputs the package declares."""
    # static_step imports torch: only a static-cache package (it declares cache_position) loads it
    if "cache_position" not in getattr(component, "input_names", ()):
        return DecoderSession(component, spec)
    from vlexport.runtime.static_step import StaticDecoderSession, is_static_decoder

    return (
        StaticDecoderSession(component, spec)
        if is_static_decoder(component)
        else DecoderSession(component, spec)
    )


def _as_dtype(array: Any, dtype: np.dtype | None) -> Any:
    """``array`` in a graph's declared input dtype; unchanged when the manifest records none."""
    return array if dtype is None else np.asarray(array).astype(dtype, copy=False)


def check_components_match_manifest(artifact: Artifact) -> None:
    """Every loaded graph must declare the inputs/outputs its manifest entry records (swapped files fail
    here); a lazy component not loaded yet is checked when it loads (runtime.load_artifact)."""
    from vlexport.runtime.loading import LazyComponent, check_component

    for name in artifact.manifest.components:
        loaded = artifact.components.get(name)
        if loaded is None or (isinstance(loaded, LazyComponent) and not loaded.loaded):
            continue
        check_component(artifact.directory, name, artifact.manifest, loaded)


def prompt_ids(
    text: str | None, tokenizer: Any, s: dict[str, Any], recipe: Any, raw_prompt: bool
) -> np.ndarray | None:
    """`vlexport run`'s decoder-side prompt (template, BLIP-2's image tokens); None: the model's default."""
    queries = s.get("num_query_tokens")
    if text is None and not (recipe.needs_prompt and queries):
        return None  # the model's own default prompt (BLIP caption: [bos]; BLIP-2 OPT: image tokens + bos)
    if tokenizer is None:
        raise UsageError(
            "This task needs a text prompt, and the artifact has no tokenizer to encode it with."
        )
    if text is not None and recipe.prompt_template and not raw_prompt and "{}" in recipe.prompt_template:
        text = recipe.prompt_template.format(text)
    ids = tokenizer.encode(text or "")
    if queries:  # BLIP-2: the image is used only where the prompt holds its query tokens
        ids = [s["image_token_id"]] * int(queries) + ids
    return np.array([ids], dtype=np.int64)
