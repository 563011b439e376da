"""Character vocabularies, the train/validation split, token files and training batches.

Prepared data is three files: `train.bin` and `val.bin` (raw little-endian uint16 tokens) and
`meta.json` (vocabulary, sizes, source hash, and for a word list the words of each split).
"""

import dataclasses
import functools
import hashlib
import random
from pathlib import Path

import numpy as np
import torch

from pipeline.config import ExamplePaths, TextData, WordsData
from pipeline.errors import PipelineError
from pipeline.files import read_json, write_bytes, write_json

BOUNDARY = " "  # separates the words of a word list; a word starts and ends with it
TOKEN_DTYPE = np.dtype("<u2")


@dataclasses.dataclass(frozen=True)
class Vocabulary:
    chars: tuple[str, ...]

    def __post_init__(self):
        if len(set(self.chars)) != len(self.chars):
            raise PipelineError(f"vocabulary has repeated characters: {''.join(self.chars)!r}")

    @classmethod
    def from_text(cls, text: str) -> "Vocabulary":
        return cls(tuple(sorted(set(text))))

    @property
    def size(self) -> int:
        return len(self.chars)

    @functools.cached_property
    def _index(self) -> dict[str, int]:
        return {ch: i for i, ch in enumerate(self.chars)}

    def unknown(self, text: str) -> list[str]:
        return sorted(set(text) - set(self.chars))

    def encode(self, text: str, what: str = "text") -> list[int]:
        if missing := self.unknown(text):
            raise PipelineError(
                f"{what} {text!r} has characters outside the vocabulary: "
                f"{', '.join(map(repr, missing))} (the vocabulary is {''.join(self.chars)!r})"
            )
        index = self._index
        return [index[ch] for ch in text]

    def decode(self, ids) -> str:
        return "".join(self.chars[i] for i in ids)


@dataclasses.dataclass
class Dataset:
    vocab: Vocabulary
    train: torch.Tensor  # int64 tokens, held in memory
    val: torch.Tensor
    meta: dict

    def window_starts(self, split: str, block_size: int) -> torch.Tensor | None:
        """Where training windows may start: at word boundaries for a word list, anywhere for text.

        Starting at a boundary means every prediction sees the whole word so far.
        """
        if self.meta["kind"] != "words":
            return None
        tokens = getattr(self, split)
        return torch.nonzero(tokens[: len(tokens) - block_size] == self.boundary).flatten()

    @property
    def boundary(self) -> int:
        """The token that separates words."""
        return self.vocab.encode(BOUNDARY)[0]

    @property
    def words(self) -> list[str]:
        """Every word of a word-list example, both splits."""
        words = self.meta.get("words", {})
        return words.get("train", []) + words.get("val", [])


def word_stream(words: list[str]) -> str:
    return BOUNDARY + BOUNDARY.join(words) + BOUNDARY


def split_words(words: list[str], params: WordsData) -> tuple[list[str], list[str], str, str]:
    """Hold out whole words; the training stream is `repeats` shuffled passes over the rest."""
    rng = random.Random(params.seed)
    shuffled = sorted(set(words))
    rng.shuffle(shuffled)
    n_val = max(1, round(len(shuffled) * params.val_fraction))
    val_words, train_words = sorted(shuffled[:n_val]), sorted(shuffled[n_val:])
    passes = []
    for _ in range(params.repeats):
        passes.extend(rng.sample(train_words, len(train_words)))
    return train_words, val_words, word_stream(passes), word_stream(val_words)


def split_text(text: str, params: TextData) -> tuple[str, str]:
    cut = int(len(text) * (1 - params.val_fraction))
    return text[:cut], text[cut:]


def read_input(path: Path) -> str:
    if not path.exists():
        raise PipelineError(f"input file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise PipelineError(f"input file {path} is empty")
    return text


def prepare(params: WordsData | TextData, paths: ExamplePaths) -> dict:
    """Build the vocabulary, split, encode and write the token files and `meta.json`."""
    raw = read_input(paths.input)
    meta = {"example": paths.example, "kind": params.kind}
    if isinstance(params, WordsData):
        words = raw.split()
        train_words, val_words, train_text, val_text = split_words(words, params)
        vocab = Vocabulary.from_text("".join(words) + BOUNDARY)
        meta["words"] = {"train": train_words, "val": val_words}
        meta["max_word_length"] = max(map(len, words))
    else:
        train_text, val_text = split_text(raw, params)
        vocab = Vocabulary.from_text(raw)
    train, val = (np.array(vocab.encode(t), dtype=TOKEN_DTYPE) for t in (train_text, val_text))
    meta |= {
        "vocab": list(vocab.chars),
        "vocab_size": vocab.size,
        "dtype": TOKEN_DTYPE.str,
        "train_tokens": len(train),
        "val_tokens": len(val),
        "source": {"path": f"data/{paths.example}/input.txt", "sha256": hashlib.sha256(raw.encode()).hexdigest()},
    }
    write_bytes(paths.train_tokens, train.tobytes())
    write_bytes(paths.val_tokens, val.tobytes())
    write_json(paths.meta, meta)
    return meta


def _read_tokens(path: Path, expected: int) -> torch.Tensor:
    if not path.exists():
        raise PipelineError(f"{path} does not exist: run the prepare stage first")
    tokens = np.fromfile(path, dtype=TOKEN_DTYPE)
    if len(tokens) != expected:
        raise PipelineError(f"{path} holds {len(tokens)} tokens but meta.json says {expected}: prepare again")
    return torch.from_numpy(tokens.astype(np.int64))


def load_dataset(paths: ExamplePaths) -> Dataset:
    meta = read_json(paths.meta)
    return Dataset(
        vocab=Vocabulary(tuple(meta["vocab"])),
        train=_read_tokens(paths.train_tokens, meta["train_tokens"]),
        val=_read_tokens(paths.val_tokens, meta["val_tokens"]),
        meta=meta,
    )


def random_batch(tokens: torch.Tensor, batch_size: int, block_size: int, generator: torch.Generator, starts=None):
    """Inputs and next-token targets at random offsets (among `starts` if given), in one gather."""
    if len(tokens) <= block_size:
        raise PipelineError(f"a split of {len(tokens)} tokens is too short for block_size {block_size}")
    if starts is None:
        starts = torch.randint(len(tokens) - block_size, (batch_size,), generator=generator)
    else:
        starts = starts[torch.randint(len(starts), (batch_size,), generator=generator)]
    windows = tokens[starts[:, None] + torch.arange(block_size + 1)]
    return windows[:, :-1], windows[:, 1:]
