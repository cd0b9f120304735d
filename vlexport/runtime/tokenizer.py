"""Tokenizers of an artifact: the copied one, or a deterministic placeholder for random-weights exports.

The placeholder is a byte-level tokenizer built in code with the model's vocabulary size: every byte
of any text has an id (so prompts encode reversibly), the model's special tokens sit at their config ids
(pad, bos, eos/sep, image token), and the remaining ids decode to filler words `` w123``. The ids it
produces are stable across runs; the text a random model generates through it is not meaningful.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlexport.errors import CheckError, UsageError
from vlexport.userdata import brief, kind_of, read_json

if TYPE_CHECKING:
    from vlexport.contracts.manifest import Manifest


PLACEHOLDER_NOTE = (
    "deterministic byte-level placeholder written by vlexport because the weights are random and "
    "the source has no tokenizer: token ids are stable, generated text is not meaningful"
)

# settings key -> token string, in priority order (two keys may share an id, e.g. OPT's bos == eos)
_SPECIAL_NAMES = (
    ("pad_token_id", "<pad>"),
    ("bos_token_id", "<s>"),
    ("eos_token_id", "</s>"),
    ("sep_token_id", "[SEP]"),
    ("text_eos_token_id", "[EOS]"),
    ("decoder_start_token_id", "<start>"),
    ("image_token_id", "<image>"),
)


def special_tokens(settings: Mapping[str, Any]) -> dict[int, tuple[str, str]]:
    """id -> (settings key, token string) for every special id the generation settings name."""
    out: dict[int, tuple[str, str]] = {}
    for key, name in _SPECIAL_NAMES:
        value = settings.get(key)
        for i in value if isinstance(value, list) else [value]:
            if i is not None and int(i) not in out:
                out[int(i)] = (key, name)
    return out


def build_placeholder(
    vocab_size: int, settings: Mapping[str, Any], template: tuple[Sequence[str], Sequence[str]] = ((), ())
) -> Any:
    """A ``tokenizers.Tokenizer`` of ``vocab_size`` ids; ``template`` = settings keys of the special tokens
    the model's real tokenizer puts before / after the text (BLIP: [CLS] ... [SEP]; OPT: </s> ...; T5: ...
    </s>)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from tokenizers.pre_tokenizers import ByteLevel

    specials = special_tokens(settings)
    alphabet = sorted(ByteLevel.alphabet())
    free = [i for i in range(vocab_size) if i not in specials]
    if len(free) < len(alphabet):
        raise UsageError(
            f"vocab_size {vocab_size} is too small for a byte-level placeholder tokenizer (needs "
            f"{len(alphabet) + len(specials)} ids)."
        )
    vocab = {name: i for i, (_, name) in specials.items()}
    vocab.update({ch: i for ch, i in zip(alphabet, free)})
    vocab.update({f"\u0120w{i}": i for i in free[len(alphabet) :]})  # "\u0120" is byte-level for a space
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(name, special=True) for _, name in specials.values()])

    def names(keys: Sequence[str]) -> list[tuple[str, int]]:
        out = []
        for key in keys:
            value = settings[key]
            i = int(value[0] if isinstance(value, list) else value)
            out.append((specials[i][1], i))
        return out

    before, after = names(template[0]), names(template[1])
    if before or after:
        single = " ".join([*(n for n, _ in before), "$A", *(n for n, _ in after)])
        tok.post_processor = processors.TemplateProcessing(
            single=single, special_tokens=sorted(set(before + after))
        )
    return tok


def write_placeholder(
    directory: Path,
    vocab_size: int,
    settings: Mapping[str, Any],
    template: tuple[Sequence[str], Sequence[str]] = ((), ()),
) -> list[str]:
    """Write tokenizer.json + tokenizer_config.json (loadable by AutoTokenizer); return the file names."""
    tok = build_placeholder(vocab_size, settings, template)
    tok.save(str(directory / "tokenizer.json"))
    specials = special_tokens(settings)
    by_key = {key: name for _, (key, name) in sorted(specials.items())}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": int(settings.get("max_positions") or 1 << 30),
        "vlexport_placeholder": True,
        "pad_token": by_key.get("pad_token_id"),
        "bos_token": by_key.get("bos_token_id"),
        "eos_token": specials[int(settings["eos_token_id"][0])][1] if settings.get("eos_token_id") else None,
    }
    (directory / "tokenizer_config.json").write_text(
        json.dumps({k: v for k, v in config.items() if v is not None}, indent=2) + "\n"
    )
    return ["tokenizer.json", "tokenizer_config.json"]


# The JSON files a tokenizer directory may hold (AutoTokenizer reads whichever are present).
TOKENIZER_JSON = ("tokenizer_config.json", "tokenizer.json", "special_tokens_map.json", "added_tokens.json")


def missing_package(e: ImportError, needed_for: str) -> UsageError:
    """An ImportError as what it is: a package this Python lacks (never "the artifact is damaged")."""
    name = getattr(e, "name", None) or str(e)
    return UsageError(
        f"{needed_for} needs the Python package {name!r}, which is not installed in this Python "
        f"({brief(e)}). Install it (a Triton repository lists what its models need in "
        "requirements.txt: pip install -r REPO/requirements.txt)."
    )


# transformers' clean_up_tokenization, applied where tokenizer_config.json asks and the model is not BPE
_CLEANUP = (
    (" .", "."),
    (" ?", "?"),
    (" !", "!"),
    (" ,", ","),
    (" ' ", "'"),
    (" n't", "n't"),
    (" 'm", "'m"),
    (" 's", "'s"),
    (" 've", "'ve"),
    (" 're", "'re"),
)


class JsonTokenizer:
    """An artifact's ``tokenizer.json`` run by the ``tokenizers`` library alone (no transformers).

    What transformers' fast tokenizer does with the same files: encode with the file's post-processor
    (special tokens), without its stored padding / truncation; decode skipping special tokens, with
    ``clean_up_tokenization_spaces`` as tokenizer_config.json says (never for BPE, as transformers 5).
    """

    def __init__(self, directory: Path, pad_token_id: int | None = None):
        again = "The artifact's tokenizer is damaged: export the artifact again."
        try:
            from tokenizers import Tokenizer
        except ImportError as e:
            raise missing_package(e, "Reading the artifact's tokenizer") from None
        path = Path(directory) / "tokenizer.json"
        try:
            self.tok = Tokenizer.from_file(str(path))
        except Exception as e:  # noqa: BLE001  tokenizers raises bare Exception for a file it cannot read
            raise CheckError(
                f"{path} is not a tokenizer the tokenizers library can load ({brief(e)}). {again}"
            ) from None
        self.tok.no_padding()
        self.tok.no_truncation()
        config: dict[str, Any] = {}
        for name in (
            "special_tokens_map.json",
            "tokenizer_config.json",
        ):  # the second one wins, as in transformers
            if (Path(directory) / name).is_file() and isinstance(
                doc := read_json(Path(directory) / name, advice=again), dict
            ):
                config.update(doc)
        bpe = type(self.tok.model).__name__ == "BPE"
        self.cleanup = bool(config.get("clean_up_tokenization_spaces", False)) and not bpe
        pad = config.get("pad_token")
        pad = pad.get("content") if isinstance(pad, dict) else pad
        self.pad_token_id = (
            pad_token_id
            if pad_token_id is not None
            else (self.tok.token_to_id(pad) if isinstance(pad, str) else None)
        )

    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text).ids)

    def decode(self, ids: Sequence[int]) -> str:
        text = self.tok.decode([int(i) for i in ids], skip_special_tokens=True)
        if self.cleanup:
            for old, new in _CLEANUP:
                text = text.replace(old, new)
        return text.strip()

    def batch(self, texts: Sequence[str]) -> tuple[Any, Any]:
        """Right-padded ids and mask (encoder inputs: ITM/ITC text)."""
        return pad_batch([self.encode(t) for t in texts], self.pad_token_id or 0)


def pad_batch(rows: Sequence[Sequence[int]], pad: int) -> tuple[Any, Any]:
    """``[texts, longest]`` int64 ids right-padded with ``pad``, and the mask of the real tokens."""
    import numpy as np

    width = max(map(len, rows))
    ids = np.full((len(rows), width), pad, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
        mask[i, : len(r)] = 1
    return ids, mask


class ArtifactTokenizer:
    """Text <-> ids with the artifact's tokenizer files (copied or placeholder): ``tokenizer.json`` by the
    ``tokenizers`` library (JsonTokenizer, what served models run too); only an artifact without one (a slow
    tokenizer's vocab files) goes through transformers' AutoTokenizer."""

    def __init__(self, directory: Path, manifest: Manifest):
        self.kind = manifest.tokenizer.get("kind", "none")
        if self.kind == "none":
            raise UsageError(
                f"{directory} has no tokenizer files (the export source had none). Export from a local "
                "checkpoint directory that has its tokenizer (save_pretrained of the processor too)."
            )
        again = "The artifact's tokenizer is damaged: export the artifact again."
        for name in TOKENIZER_JSON:
            # Parsed here first, so that a damaged file is named (the libraries report a bare parse error).
            path = Path(directory) / name
            if path.exists() and not isinstance(doc := read_json(path, advice=again), dict):
                raise CheckError(f"{path} holds {kind_of(doc)}, not a tokenizer object. {again}")
        if (Path(directory) / "tokenizer.json").exists():
            self.tok: Any = JsonTokenizer(directory)
            self.pad_token_id = self.tok.pad_token_id
            return
        try:
            from transformers import AutoTokenizer
        except ImportError as e:
            raise missing_package(e, f"The tokenizer of {directory} (no tokenizer.json)") from None
        try:
            self.tok = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
        except Exception as e:  # noqa: BLE001  transformers raises its own exception types
            raise CheckError(f"Cannot load the tokenizer of {directory} ({brief(e)}). {again}") from None
        self.pad_token_id = self.tok.pad_token_id

    def encode(self, text: str) -> list[int]:
        if isinstance(self.tok, JsonTokenizer):
            return self.tok.encode(text)
        return list(self.tok(text)["input_ids"])

    def decode(self, ids: Sequence[int]) -> str:
        if isinstance(self.tok, JsonTokenizer):
            return self.tok.decode(ids)
        return self.tok.decode(list(ids), skip_special_tokens=True).strip()

    def batch(self, texts: Sequence[str]) -> tuple[Any, Any]:
        """Right-padded ids and mask (encoder inputs: ITM/ITC text)."""
        return pad_batch(
            [self.encode(t) for t in texts], self.pad_token_id if self.pad_token_id is not None else 0
        )
