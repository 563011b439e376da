"""Character vocabularies, the train/validation split, token files and training batches.

Prepared data is three files: `train.bin` and `val.bin` (raw little-endian uint16 tokens) and
`meta.json` (vocabulary, sizes, hashes of the source and of both token files, and for a word
list the words of each split). `meta.json` is written last and names the token files' hashes, so
a prepare killed halfway is caught when the data is loaded.
"""

import dataclasses
import functools
import hashlib
import random
from pathlib import Path

import numpy as np
import torch

from pipeline.errors import PipelineError
from pipeline.files import read_json, write_bytes, write_json
from pipeline.paths import ExamplePaths
from pipeline.schema import TextData, WordsData

BOUNDARY = " "  # separates the words of a word list; a word starts and ends with it
TOKEN_DTYPE = np.dtype("<u2")
MAX_VOCAB = np.iinfo(TOKEN_DTYPE).max + 1


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
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise PipelineError(f"input file {path} is not UTF-8 text (byte {e.start}: {e.reason})") from None
    except OSError as e:
        raise PipelineError(f"cannot read input file {path}: {e.strerror or e}") from None
    if not text.strip():
        raise PipelineError(f"input file {path} is empty")
    return text


def read_words(path: Path, text: str, alphabet: str) -> list[str]:
    """The words of a word list, each checked to use only `alphabet`; every bad word is named."""
    allowed, bad = set(alphabet), []
    for number, line in enumerate(text.splitlines(), 1):
        bad += [(number, word) for word in line.split() if not set(word) <= allowed]
    if bad:
        shown = "; ".join(f"line {n} {w!r} has {', '.join(map(repr, sorted(set(w) - allowed)))}" for n, w in bad[:10])
        more = f" and {len(bad) - 10} more" if len(bad) > 10 else ""
        raise PipelineError(
            f"{path}: {len(bad)} word{'s' * (len(bad) > 1)} with characters outside data.alphabet "
            f"{alphabet!r}: {shown}{more}"
        )
    words = text.split()
    if len(set(words)) < 2:
        raise PipelineError(f"{path} has {len(set(words))} distinct word(s): 2 or more are needed to hold some out")
    return words


def check_splits(path: Path, train_tokens: int, val_tokens: int) -> None:
    for name, count in (("train", train_tokens), ("validation", val_tokens)):
        if count < 2:
            raise PipelineError(
                f"{path}: the {name} split has {count} token(s), too few to predict anything; "
                "add text or change data.val_fraction"
            )


def check_vocab_fits(path: Path, vocab: Vocabulary) -> None:
    if vocab.size > MAX_VOCAB:
        raise PipelineError(
            f"{path} has {vocab.size:,} distinct characters, more than the {MAX_VOCAB:,} that "
            f"{TOKEN_DTYPE.name} tokens can number"
        )


def prepare(params: WordsData | TextData, paths: ExamplePaths) -> dict:
    """Build the vocabulary, split, encode and write the token files and `meta.json`."""
    raw = read_input(paths.input)
    meta = {"example": paths.example, "kind": params.kind}
    if isinstance(params, WordsData):
        words = read_words(paths.input, raw, params.alphabet)
        train_words, val_words, train_text, val_text = split_words(words, params)
        vocab = Vocabulary.from_text("".join(words) + BOUNDARY)
        meta["words"] = {"train": train_words, "val": val_words}
        meta["max_word_length"] = max(map(len, words))
    else:
        train_text, val_text = split_text(raw, params)
        vocab = Vocabulary.from_text(raw)
    check_vocab_fits(paths.input, vocab)
    check_splits(paths.input, len(train_text), len(val_text))
    train, val = (np.array(vocab.encode(t), dtype=TOKEN_DTYPE).tobytes() for t in (train_text, val_text))
    meta |= {
        "vocab": list(vocab.chars),
        "vocab_size": vocab.size,
        "dtype": TOKEN_DTYPE.str,
        "train_tokens": len(train_text),
        "val_tokens": len(val_text),
        "source": {"path": f"data/{paths.example}/input.txt", "sha256": hashlib.sha256(raw.encode()).hexdigest()},
        "sha256": {"train": hashlib.sha256(train).hexdigest(), "val": hashlib.sha256(val).hexdigest()},
    }
    write_bytes(paths.train_tokens, train)
    write_bytes(paths.val_tokens, val)
    write_json(paths.meta, meta)  # last: a prepare killed before this leaves the old meta, which names the old files
    return meta


def _read_tokens(path: Path, expected: int, sha256: str | None, vocab_size: int) -> torch.Tensor:
    if not path.exists():
        raise PipelineError(f"{path} does not exist: run the prepare stage first")
    raw = path.read_bytes()
    if len(raw) != expected * TOKEN_DTYPE.itemsize:
        raise PipelineError(
            f"{path} holds {len(raw) / TOKEN_DTYPE.itemsize:g} tokens but meta.json says {expected}: prepare again"
        )
    if sha256 is not None and hashlib.sha256(raw).hexdigest() != sha256:
        raise PipelineError(f"{path} is not the file meta.json describes (another prepare wrote it): prepare again")
    tokens = np.frombuffer(raw, dtype=TOKEN_DTYPE)
    if len(tokens) and tokens.max() >= vocab_size:
        raise PipelineError(f"{path} has token {tokens.max()}, beyond the {vocab_size} characters of meta.json")
    return torch.from_numpy(tokens.astype(np.int64))


def load_dataset(paths: ExamplePaths) -> Dataset:
    meta = read_json(paths.meta)
    missing = {"kind", "vocab", "train_tokens", "val_tokens"} - set(meta if isinstance(meta, dict) else {})
    if missing:
        raise PipelineError(f"{paths.meta} lacks {', '.join(sorted(missing))}: prepare again")
    vocab = Vocabulary(tuple(meta["vocab"]))
    hashes = meta.get("sha256", {})
    return Dataset(
        vocab=vocab,
        train=_read_tokens(paths.train_tokens, meta["train_tokens"], hashes.get("train"), vocab.size),
        val=_read_tokens(paths.val_tokens, meta["val_tokens"], hashes.get("val"), vocab.size),
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


def pass_batch(tokens: torch.Tensor, starts: torch.Tensor, batch_size: int, block_size: int, step: int):
    """Batch `step` (from 1) of a word stream read in order: windows at the next `batch_size` starts.

    `starts` are the windows' starts in stream order; reading wraps around, so any step has a batch
    (and a resumed run gets the same batches without any sampler state).
    """
    index = (torch.arange(batch_size) + (step - 1) * batch_size) % len(starts)
    windows = tokens[starts[index][:, None] + torch.arange(block_size + 1)]
    return windows[:, :-1], windows[:, 1:]


def whole_passes(dataset: Dataset, block_size: int) -> torch.Tensor:
    """The training windows' starts of the stream's whole passes, so wrapping around keeps a batch
    of one pass's size aligned with the passes (the last word of the stream may have no window)."""
    starts = dataset.window_starts("train", block_size)
    per_pass = len(dataset.meta["words"]["train"])
    return starts[: max(per_pass, len(starts) // per_pass * per_pass)]


def check_data_fits(dataset: Dataset, block_size: int, example: str) -> None:
    """Refuse a model that cannot be trained on this data, before a run is started for it."""
    for name, split in (("train", dataset.train), ("validation", dataset.val)):
        if len(split) <= block_size:
            raise PipelineError(
                f"{example}: the {name} split has {len(split)} tokens; model.block_size + 1 = {block_size + 1} needed"
            )
    if (longest := dataset.meta.get("max_word_length", 0)) >= block_size:
        raise PipelineError(f"{example}: model.block_size ({block_size}) must exceed the longest word ({longest})")
