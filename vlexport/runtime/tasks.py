"""``vlexport.load``: an artifact loaded once as a task object, called many times with images and strings.

The manifest picks the class: generative artifacts (caption, vqa, generate) get a :class:`GenerateTask`;
image-text matching (``itm``) a :class:`MatchTask`; contrastive / two-tower tasks (``itc``, ``features`` with
a similarity) a :class:`SimilarityTask`; masked LM (``mlm``) a :class:`FillMaskTask`; any other encoder an
:class:`EncoderTask` (raw outputs). `vlexport run` calls these objects, so the CLI and the API are one code
path.

Batches: inputs are split at ``batch_size`` (and the artifact's own limits); texts of one call are padded to
one width, as `vlexport run` pads them, so a text scores the same whatever else is in its batch. Generation
batches only prompts of one length, so that no prompt is padded and a batched caption is the one-at-a-time
caption. Thread safety: ONNX Runtime sessions take concurrent calls and every call keeps its own state;
artifacts of other backends (compiled packages with static caches) run one call at a time.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vlexport.contracts.manifest import Manifest
from vlexport.errors import CheckError, UsageError
from vlexport.models.host import DECODER
from vlexport.runtime import Artifact, load_artifact
from vlexport.runtime.generate import prompt_ids
from vlexport.runtime.inputs import ImageInput, TextInput, broadcast, image_pixels, is_single_image, text_list
from vlexport.runtime.loading import LazyComponent
from vlexport.runtime.preprocess import image_settings
from vlexport.runtime.texts import PlaceholderTexts, check_options, encode_batch, token_limit
from vlexport.runtime.tokenizer import ArtifactTokenizer

DEFAULT_BATCH = 8


@dataclass(frozen=True)
class Generation:
    """One generated text: ``ids`` is the whole sequence (decoder prompt + new tokens, what `run --ids`
    prints); ``text`` its decoding (None when the artifact has no tokenizer)."""

    text: str | None
    ids: list[int]
    prompt: str | None = None


@dataclass(frozen=True)
class MatchResult:
    """Image-text matching, ``[images, texts]`` (the axis of a single image or text dropped)."""

    probability: np.ndarray  # softmax of the (no match, match) head: P(match)
    logit: np.ndarray  # match logit - no-match logit


@dataclass(frozen=True)
class Scored:
    """One text scored against one image, as `vlexport run` prints it."""

    text: str
    ids: list[int]
    scores: dict[str, float]


@dataclass(frozen=True)
class MaskFill:
    """The ``top_k`` predictions at one mask token of a text."""

    position: int
    ids: list[int]
    tokens: list[str]
    probabilities: list[float]


class Task:
    """What every task object shares: the manifest, the loaded components, image and text preparation."""

    def __init__(self, artifact: Artifact, batch_size: int = DEFAULT_BATCH):
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise UsageError(f"batch_size must be a positive integer, got {batch_size!r}.")
        self.artifact, self.manifest, self.directory = artifact, artifact.manifest, artifact.directory
        self.task, self.batch_size = artifact.manifest.task, batch_size
        self.notes: list[str] = []
        self._tokenizer: ArtifactTokenizer | None = None
        if self.manifest.tokenizer.get("kind", "none") != "none":
            self._tokenizer = ArtifactTokenizer(self.directory, self.manifest)
        self._image_settings = image_settings(self.directory, self.manifest)
        # ORT sessions are thread-safe; other backends' components may share buffers between calls. Lazy
        # components are ONNX graphs (load(one_shot=True)): asking would load them.
        concurrent = all(
            isinstance(c, LazyComponent) or hasattr(c, "session") for c in artifact.components.values()
        )
        self._lock: Any = contextlib.nullcontext() if concurrent else threading.Lock()
        self._text_lock = threading.Lock()  # a fast tokenizer's padding/truncation state is per object

    def __repr__(self) -> str:
        m = self.manifest
        return f"<{type(self).__name__} {m.family} {self.task} ({m.backend}) {self.directory}>"

    def pixels(self, images: ImageInput | Sequence[ImageInput]) -> np.ndarray:
        """``[N, 3, S, S]`` float32: the artifact's preprocessing of the images (also useful to time it
        apart)."""
        return image_pixels(images, self._image_settings)


# ---------------------------------------------------------------- generation
class GenerateTask(Task):
    """Captioning / VQA / prompted generation; ``caption`` and ``answer`` where the task is one of those."""

    def __init__(self, artifact: Artifact, batch_size: int = DEFAULT_BATCH):
        from vlexport.runtime.generate import Generator

        super().__init__(artifact, batch_size)
        self.generator = Generator(artifact)
        self.settings, self.recipe = self.generator.settings, self.generator.recipe
        # a compiled package's decoder rows (a lazy component is an ONNX graph: no limit, nothing to load)
        self._one_shot = isinstance(artifact.components[DECODER], LazyComponent)
        static_rows = None if self._one_shot else getattr(self.generator.decoder, "max_batch", None)
        if static_rows:
            self.batch_size = max(1, min(self.batch_size, int(static_rows)))
        if self._tokenizer is None:
            self.notes.append("the artifact has no tokenizer: showing token ids only")
        elif self._tokenizer.kind == "placeholder":
            self.notes.append(
                "random weights: the text comes from a placeholder tokenizer and is not meaningful"
            )

    def generate(
        self,
        images: ImageInput | Sequence[ImageInput],
        prompts: TextInput | None = None,
        *,
        max_new_tokens: int | None = None,
        num_beams: int | None = None,
        return_ids: bool = False,
        raw_prompt: bool = False,
    ) -> Any:
        """Texts for images (and prompts: one for all, or one per image; or one image and several prompts).

        Returns a str per input pair (a list unless one image and at most one prompt were given), or
        :class:`Generation` records with ``return_ids=True``. Defaults come from the artifact's settings.
        """
        check_options(
            self.directory, self.manifest, max_new_tokens=None, num_beams=None, raw_prompt=raw_prompt
        )
        s = self.settings
        new = int(s.get("default_max_new_tokens", 20)) if max_new_tokens is None else max_new_tokens
        beams = int(s.get("default_num_beams", 1)) if num_beams is None else num_beams
        pixels = self.pixels(images)
        texts, one_text = ([None], True) if prompts is None else text_list(prompts, "prompts")
        if self._tokenizer is None and prompts is not None:
            raise UsageError(
                f"{self.directory} has no tokenizer to encode the prompts with (the export source had "
                "none). Export from a checkpoint directory that includes its tokenizer files."
            )
        n = broadcast(len(pixels), len(texts), "prompts")
        with self._text_lock:
            ids = [
                prompt_ids(texts[min(i, len(texts) - 1)], self._tokenizer, s, self.recipe, raw_prompt)
                for i in range(n)
            ]
        groups: dict[int | None, list[int]] = {}
        for i, row in enumerate(ids):
            groups.setdefault(None if row is None else row.shape[1], []).append(i)
        chunks = [
            indices[start : start + self.batch_size]
            for indices in groups.values()
            for start in range(0, len(indices), self.batch_size)
        ]
        out: list[Generation | None] = [None] * n

        def encoded() -> Iterator[tuple[list[int], dict[str, np.ndarray]]]:
            for chunk in chunks:
                batch_ids = None if ids[chunk[0]] is None else np.concatenate([ids[i] for i in chunk])
                batch_pixels = pixels[[min(i, len(pixels) - 1) for i in chunk]]
                self.generator.check_request(batch_pixels, batch_ids, new, beams)
                mask = None if batch_ids is None else np.ones_like(batch_ids)
                yield chunk, self.generator.encode(batch_pixels, batch_ids, mask)

        with self._lock:
            pairs: Iterable[tuple[list[int], dict[str, np.ndarray]]] = encoded()
            if (
                self._one_shot
            ):  # every chunk's encoders, give them back, then the decoder (load(one_shot=True))
                pairs = list(pairs)
                self.generator.release_encoders()
            for chunk, env in pairs:  # else chunk by chunk: one chunk's encoder outputs held at a time
                result = self.generator.decode(env, max_new_tokens=new, num_beams=beams)
                for row, i in enumerate(chunk):
                    out[i] = self._record(
                        result.sequences[row], result.prompt_length, texts[min(i, len(texts) - 1)]
                    )
        records = [r for r in out if r is not None]
        results = records if return_ids else [r.text if r.text is not None else r.ids for r in records]
        return results[0] if is_single_image(images) and one_text else results

    def caption(
        self, images: ImageInput | Sequence[ImageInput], prompt: TextInput | None = None, **kwargs: Any
    ) -> Any:
        """Captions (a BLIP caption continues ``prompt``, e.g. "a picture of"); see :meth:`generate`."""
        if self.recipe.needs_prompt and not self.settings.get("num_query_tokens"):
            raise UsageError(
                f"{self.directory} holds a {self.task} artifact, which answers questions: call "
                ".answer(images, questions)."
            )
        return self.generate(images, prompt, **kwargs)

    def answer(self, images: ImageInput | Sequence[ImageInput], questions: TextInput, **kwargs: Any) -> Any:
        """Answers to questions about the images (BLIP-2 wraps them in its "Question: ... Answer:"
        template)."""
        if not (self.recipe.needs_prompt or self.recipe.prompt_template):
            raise UsageError(
                f"{self.directory} holds a {self.task} artifact, which captions images: call "
                ".caption(images) (a prompt there is the start of the caption)."
            )
        return self.generate(images, questions, **kwargs)

    def _record(self, seq: np.ndarray, prompt_length: int, prompt: str | None) -> Generation:
        """One row of a batch, cut after its first eos: rows that finished early are padded in the batch."""
        eos = np.isin(seq[prompt_length:], self.generator.eos)
        if eos.any():
            seq = seq[: prompt_length + int(np.argmax(eos)) + 1]
        shown = seq if self.recipe.continues_prompt else seq[prompt_length:]
        text = self._tokenizer.decode(shown) if self._tokenizer is not None else None
        return Generation(text, [int(t) for t in seq], prompt)


# ---------------------------------------------------------------- encoders
class EncoderTask(Task):
    """A one-graph encoder over image-text pairs: ``outputs`` returns its raw outputs per pair."""

    def __init__(self, artifact: Artifact, batch_size: int = DEFAULT_BATCH):
        super().__init__(artifact, batch_size)
        if len(artifact.components) != 1:
            raise CheckError(
                f"{self.directory} has components {sorted(artifact.components)}; an encoder task has "
                "one. The manifest does not describe a complete artifact: export it again."
            )
        ((self.component_name, self.component),) = artifact.components.items()
        self.spec = artifact.task_spec
        outputs = self.manifest.components[self.component_name].outputs
        # an images x texts matrix (two-tower logits_per_image, BLIP's contrastive itm_score)
        self.matrix = next(
            (t.name for t in outputs if len(t.shape) == 2 and t.shape[0] == t.shape[1] == "batch"), None
        )
        self.output_names = [t.name for t in outputs]
        self._limit = token_limit(self.directory, self.manifest)
        self._encoder: ArtifactTokenizer | PlaceholderTexts = self._tokenizer or PlaceholderTexts(
            self.directory
        )
        if self._tokenizer is None:
            self.notes.append(
                "no tokenizer in the artifact (random weights): texts encoded with a byte-level placeholder"
            )

    def texts(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Ids and mask of texts padded to one width (as `vlexport run` encodes them)."""
        with self._text_lock:
            return encode_batch(self._encoder, texts, self._limit)

    def call(self, pixels: np.ndarray, ids: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
        """One graph call on row-aligned images and texts (the family adds its extra inputs)."""
        feeds = self.spec.run_inputs({"input_ids": ids, "attention_mask": mask, "pixel_values": pixels})
        names = getattr(self.component, "input_names", list(feeds))
        with self._lock:
            return self.component({k: feeds[k] for k in names if k in feeds})

    def scores(self, image: ImageInput, texts: TextInput) -> list[Scored]:
        """`vlexport run`'s scores: every text against one image, in one call."""
        if self.spec.scores is None:
            raise UsageError(
                f"{self.manifest.family} {self.task} has no image-text score (its outputs are not a "
                "matching or similarity score); `vlexport.load(...).outputs(images, texts)` returns them."
            )
        if not is_single_image(image):
            raise UsageError("scores() takes one image; match() / similarity() take several.")
        items, _ = text_list(texts)
        ids, mask = self.texts(items)
        n = len(items)
        scores = self.spec.scores(self.call(np.repeat(self.pixels(image), n, axis=0), ids, mask), n)
        return [
            Scored(t, ids[i][mask[i] == 1].tolist(), {k: float(v[i]) for k, v in scores.items()})
            for i, t in enumerate(items)
        ]

    def outputs(self, images: ImageInput | Sequence[ImageInput], texts: TextInput) -> dict[str, np.ndarray]:
        """The graph's outputs per (image, text) pair (paired in order, a single one repeated), batch first.

        An images x texts matrix output is left out (``similarity`` returns it whole).
        """
        pixels, (items, _) = self.pixels(images), text_list(texts)
        ids, mask = self.texts(items)
        n = broadcast(len(pixels), len(items))
        rows = np.arange(n)
        return self._pairs(
            pixels, ids, mask, np.minimum(rows, len(pixels) - 1), np.minimum(rows, len(items) - 1)
        )

    def _pairs(
        self,
        pixels: np.ndarray,
        ids: np.ndarray,
        mask: np.ndarray,
        image_rows: np.ndarray,
        text_rows: np.ndarray,
        read: Any = None,
    ) -> dict[str, np.ndarray]:
        """Pairs (pixels[image_rows[k]], texts[text_rows[k]]) in batches; ``read`` turns outputs into per-row
        values (a family score reader), else every non-matrix output is kept."""
        parts: dict[str, list[np.ndarray]] = {}
        for start in range(0, len(image_rows), self.batch_size):
            i, j = image_rows[start : start + self.batch_size], text_rows[start : start + self.batch_size]
            out = self.call(pixels[i], ids[j], mask[j])
            values = read(out, len(i)) if read else {k: v for k, v in out.items() if k != self.matrix}
            for k, v in values.items():
                parts.setdefault(k, []).append(np.asarray(v))
        return {k: np.concatenate(v) for k, v in parts.items()}

    def _all_pairs(self, images: Any, texts: Any) -> tuple[dict[str, np.ndarray], tuple[int, ...]]:
        """Every image with every text through the family's score reader; values shaped [images, texts]."""
        pixels, (items, one_text) = self.pixels(images), text_list(texts)
        ids, mask = self.texts(items)
        m, n = len(pixels), len(items)
        values = self._pairs(
            pixels, ids, mask, np.repeat(np.arange(m), n), np.tile(np.arange(n), m), self.spec.scores
        )
        return values, _shape(m, n, is_single_image(images), one_text)


def _shape(m: int, n: int, one_image: bool, one_text: bool) -> tuple[int, ...]:
    return tuple(d for d, drop in ((m, one_image), (n, one_text)) if not drop)


class MatchTask(EncoderTask):
    """Image-text matching (an ITM head): ``match(images, texts)``."""

    def match(self, images: ImageInput | Sequence[ImageInput], texts: TextInput) -> MatchResult:
        """Every image against every text: ``probability`` and ``logit`` arrays ``[images, texts]``."""
        values, shape = self._all_pairs(images, texts)
        return MatchResult(values["match_probability"].reshape(shape), values["match_logit"].reshape(shape))


class SimilarityTask(EncoderTask):
    """Contrastive / two-tower similarity: ``similarity``; two-tower graphs also
    ``embed_images/embed_texts``."""

    def similarity(self, images: ImageInput | Sequence[ImageInput], texts: TextInput) -> np.ndarray:
        """The images x texts similarity (the graph's matrix, e.g. ``logits_per_image``, or the cosine of each
        pair's embeddings), ``[images, texts]`` with the axis of a single image or text dropped."""
        if self.matrix is None:  # cross-modal embeddings depend on the pair: run every pair
            values, shape = self._all_pairs(images, texts)
            return values[next(iter(values))].reshape(shape)
        pixels, (items, one_text) = self.pixels(images), text_list(texts)
        ids, mask = self.texts(items)
        m, n, b = len(pixels), len(items), self.batch_size
        out = np.empty((m, n), dtype=np.float32)
        for i0 in range(0, m, b):
            for j0 in range(0, n, b):
                i, j = np.arange(i0, min(i0 + b, m)), np.arange(j0, min(j0 + b, n))
                # the graph pairs its batch: pad the shorter side with its last row
                width = max(len(i), len(j))
                ii, jj = np.resize(i, width), np.resize(j, width)
                ii[len(i) :], jj[len(j) :] = i[-1], j[-1]
                out[i0 : i0 + len(i), j0 : j0 + len(j)] = self.call(pixels[ii], ids[jj], mask[jj])[
                    self.matrix
                ][: len(i), : len(j)]
        return out.reshape(_shape(m, n, is_single_image(images), one_text))

    def embed_images(self, images: ImageInput | Sequence[ImageInput]) -> np.ndarray:
        """Image embeddings ``[images, dim]`` as the model returns them (two-tower graphs only)."""
        pixels = self.pixels(images)
        # the graph runs both towers: a one-token text (an empty one is 0 tokens wide with no special tokens)
        ids = np.ones((len(pixels), 1), dtype=np.int64)
        out = self._embeddings("image_embeds", pixels, ids, np.ones_like(ids))
        return out[0] if is_single_image(images) else out

    def embed_texts(self, texts: TextInput) -> np.ndarray:
        """Text embeddings ``[texts, dim]`` as the model returns them (two-tower graphs only)."""
        items, one = text_list(texts)
        ids, mask = self.texts(items)
        size = self._image_settings.size
        out = self._embeddings("text_embeds", np.zeros((len(items), 3, size, size), np.float32), ids, mask)
        return out[0] if one else out

    def _embeddings(self, name: str, pixels: np.ndarray, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        if self.matrix is None or name not in self.output_names:
            raise UsageError(
                f"{self.manifest.family} {self.task} has no separate {name} (its graph outputs "
                f"{self.output_names}); use similarity(images, texts), or export the features task."
            )
        rows = np.arange(len(pixels))
        return self._pairs(pixels, ids, mask, rows, rows)[name]


class FillMaskTask(EncoderTask):
    """Masked LM conditioned on an image: ``fill_mask(images, texts)`` where the texts hold mask tokens."""

    def fill_mask(
        self, images: ImageInput | Sequence[ImageInput], texts: TextInput, top_k: int = 5
    ) -> list[list[MaskFill]]:
        """Per (image, text) pair (paired as in ``outputs``), the ``top_k`` tokens at each mask token."""
        tok = self._tokenizer.tok if self._tokenizer is not None else None
        mask_id = getattr(tok, "mask_token_id", None)
        if mask_id is None:
            raise UsageError(
                f"{self.directory}'s tokenizer has no mask token (random-weights exports carry a "
                "placeholder tokenizer without one); outputs(images, texts) returns the raw logits."
            )
        if not isinstance(top_k, int) or top_k < 1:
            raise UsageError(f"top_k must be a positive integer, got {top_k!r}.")
        pixels, (items, _) = self.pixels(images), text_list(texts)
        ids, mask = self.texts(items)
        n = broadcast(len(pixels), len(items))
        rows = np.arange(n)
        text_rows = np.minimum(rows, len(items) - 1)
        logits = self._pairs(pixels, ids, mask, np.minimum(rows, len(pixels) - 1), text_rows)["logits"]
        out = []
        for k, t in enumerate(text_rows):
            fills = []
            for pos in np.flatnonzero(ids[t] == mask_id):
                z = logits[k, pos] - logits[k, pos].max()
                p = np.exp(z) / np.exp(z).sum()
                best = np.argsort(-p, kind="stable")[:top_k]
                fills.append(
                    MaskFill(
                        int(pos),
                        best.tolist(),
                        [tok.decode([int(b)]).strip() for b in best],
                        p[best].tolist(),
                    )
                )
            out.append(fills)
        return out


_ENCODERS = {"itm": MatchTask, "itc": SimilarityTask, "mlm": FillMaskTask}


def load(
    directory: str | Path,
    device: str = "auto",
    threads: int | None = None,
    batch_size: int = DEFAULT_BATCH,
    verify: bool = False,
    one_shot: bool = False,
) -> Task:
    """Load an artifact once; the manifest picks the task object (see the module doc and docs/api.md).

    ``verify``: check every file's sha256 against the manifest first (native code, .pt2 / .plan, always is).
    ``one_shot``: the caller generates once and exits (`vlexport run`): ONNX components load when first used
    and the encoders are released before the decoder loads, so the peak memory is the larger of the two
    phases, not their sum (BLIP-2 OPT-2.7b int4 mix: the vision tower's 1.3 GB and the decoder's 1.7 GB).
    """
    directory = Path(directory)
    if device not in ("auto", "cpu", "cuda"):
        raise UsageError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}.")
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise UsageError(f"threads must be a positive integer or None, got {threads!r}.")
    manifest = Manifest.read(directory)  # missing files / size mismatches fail here, before any work
    # compiled packages load eagerly: their decoder's row limit sizes the batches (GenerateTask)
    lazy = one_shot and all(c.file.endswith(".onnx") for c in manifest.components.values())
    artifact = load_artifact(
        directory,
        manifest=manifest,
        device=device,
        threads=threads,
        verify="full" if verify else "native",
        lazy=lazy,
    )
    if artifact.task_spec.generative:
        return GenerateTask(artifact, batch_size)
    cls = _ENCODERS.get(manifest.task)
    if cls is None:  # features: a similarity where the family reads one, else raw outputs
        cls = SimilarityTask if artifact.task_spec.scores is not None else EncoderTask
    return cls(artifact, batch_size)
