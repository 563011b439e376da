import json

import numpy as np
import pytest
import torch

from pipeline.config import ExamplePaths, TextData, WordsData
from pipeline.data import BOUNDARY, Vocabulary, load_dataset, prepare, random_batch, split_text, split_words
from pipeline.errors import PipelineError

from .conftest import tiny_params


def test_encode_decode_round_trip():
    vocab = Vocabulary.from_text("hello world\n")
    text = "world hello\nold"
    assert vocab.decode(vocab.encode(text)) == text


def test_vocabulary_is_sorted_and_unique():
    assert Vocabulary.from_text("banana").chars == ("a", "b", "n")


def test_unknown_characters_are_named():
    with pytest.raises(PipelineError, match=r"'x', 'z'"):
        Vocabulary.from_text("abc").encode("zax", "prompt")


def test_word_split_holds_out_whole_words_and_keeps_every_word():
    words = [f"W{i:03d}" for i in range(100)]
    params = WordsData(kind="words", val_fraction=0.2, seed=3, repeats=2)
    train, val, train_text, val_text = split_words(words, params)
    assert len(val) == 20 and len(train) == 80
    assert set(train).isdisjoint(val) and set(train) | set(val) == set(words)
    assert sorted(train_text.split()) == sorted(train * 2)
    assert sorted(val_text.split()) == sorted(val)
    assert train_text.startswith(BOUNDARY) and train_text.endswith(BOUNDARY)


def test_word_split_depends_on_the_seed_only():
    words = [f"W{i}" for i in range(50)]
    split = lambda seed: split_words(words, WordsData(kind="words", val_fraction=0.1, seed=seed, repeats=1))
    assert split(1) == split(1)
    assert split(1)[1] != split(2)[1]


def test_text_split_is_one_contiguous_cut():
    text = "abcdefghij" * 10
    train, val = split_text(text, TextData(kind="text", val_fraction=0.1))
    assert train + val == text and len(val) == 10


def test_prepare_toy_writes_tokens_and_meta(project):
    paths = ExamplePaths(project, "toy")
    meta = prepare(tiny_params("toy").data, paths)
    assert meta["vocab_size"] == 11 and meta["vocab"][0] == BOUNDARY
    assert len(meta["words"]["train"]) + len(meta["words"]["val"]) == 167
    assert json.loads(paths.meta.read_text()) == meta
    assert paths.train_tokens.stat().st_size == 2 * meta["train_tokens"]
    assert len(meta["source"]["sha256"]) == 64


def test_prepare_shakespeare_has_65_characters_and_a_90_10_split(project):
    paths = ExamplePaths(project, "shakespeare")
    meta = prepare(tiny_params("shakespeare").data, paths)
    assert meta["vocab_size"] == 65
    total = meta["train_tokens"] + meta["val_tokens"]
    assert total == len(paths.input.read_text()) and meta["val_tokens"] == pytest.approx(total * 0.1, abs=1)
    dataset = load_dataset(paths)
    assert dataset.vocab.decode(dataset.val[:20].tolist()) == paths.input.read_text()[meta["train_tokens"] :][:20]


def test_missing_and_empty_inputs_are_named(project):
    paths = ExamplePaths(project, "toy")
    paths.input.write_text("  \n")
    with pytest.raises(PipelineError, match="is empty"):
        prepare(tiny_params("toy").data, paths)
    paths.input.unlink()
    with pytest.raises(PipelineError, match="does not exist"):
        prepare(tiny_params("toy").data, paths)


def test_a_token_file_that_disagrees_with_meta_is_refused(toy):
    _, paths, _ = toy
    np.zeros(3, dtype="<u2").tofile(paths.val_tokens)
    with pytest.raises(PipelineError, match="val.bin holds 3 tokens"):
        load_dataset(paths)


def test_batches_are_targets_shifted_by_one():
    tokens = torch.arange(100)
    x, y = random_batch(tokens, 8, 10, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (8, 10)
    assert torch.equal(y, x + 1)


def test_word_list_windows_start_at_a_boundary(toy):
    _, _, dataset = toy
    starts = dataset.window_starts("train", 8)
    boundary = dataset.vocab.encode(BOUNDARY)[0]
    x, _ = random_batch(dataset.train, 64, 8, torch.Generator().manual_seed(0), starts)
    assert (x[:, 0] == boundary).all()


def test_a_split_shorter_than_a_block_is_refused():
    with pytest.raises(PipelineError, match="too short"):
        random_batch(torch.arange(5), 2, 8, torch.Generator())
