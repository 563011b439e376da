import json

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from pipeline.data import (
    BOUNDARY,
    Vocabulary,
    load_dataset,
    pass_batch,
    prepare,
    random_batch,
    split_text,
    split_words,
    whole_passes,
)
from pipeline.errors import PipelineError
from pipeline.paths import ExamplePaths
from pipeline.schema import TextData, WordsData
from pipeline.stages.train import train_example

from .helpers import tiny_params


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


def first_words(x: torch.Tensor, vocab: Vocabulary) -> list[str]:
    return sorted(vocab.decode(row.tolist()).split(BOUNDARY)[1] for row in x)


def test_a_batch_of_one_pass_holds_every_training_word_once_even_after_wrapping_around(toy):
    _, _, dataset = toy
    words, block_size = dataset.meta["words"]["train"], 5
    starts = whole_passes(dataset, block_size)
    passes = len(starts) // len(words)
    assert len(starts) % len(words) == 0 and passes >= 1
    for step in (1, 2, passes + 1, 3 * passes + 2):  # the last two wrapped around
        x, y = pass_batch(dataset.train, starts, len(words), block_size, step)
        assert (x[:, 0] == dataset.boundary).all() and torch.equal(x[:, 1:], y[:, :-1])
        assert first_words(x, dataset.vocab) == sorted(words)
    first, second = (pass_batch(dataset.train, starts, len(words), block_size, step)[0] for step in (1, 2))
    assert not torch.equal(first, second)  # each pass is shuffled anew


def test_a_split_shorter_than_a_block_is_refused():
    with pytest.raises(PipelineError, match="too short"):
        random_batch(torch.arange(5), 2, 8, torch.Generator())


def test_words_outside_the_alphabet_are_all_named_and_nothing_is_written(project):
    paths = ExamplePaths(project, "toy")
    paths.input.write_text("CAT DOG\nCOR cor\nTOT0 NET\n")
    with pytest.raises(PipelineError) as error:
        prepare(tiny_params("toy").data, paths)
    message = str(error.value)
    assert f"{paths.input}: 2 words with characters outside data.alphabet 'ABCDEFGHIJKLMNOPQRSTUVWXYZ'" in message
    assert "line 2 'cor' has 'c', 'o', 'r'" in message and "line 3 'TOT0' has '0'" in message
    assert not paths.prepared.exists()


def test_the_alphabet_is_a_parameter(project):
    paths = ExamplePaths(project, "toy")
    paths.input.write_text("cat dog cow\n")
    meta = prepare(tiny_params("toy", "toy.data.alphabet=abcdefghijklmnopqrstuvwxyz").data, paths)
    assert meta["vocab"] == [BOUNDARY, *"acdgotw"]


def test_a_word_list_needs_two_different_words(project):
    paths = ExamplePaths(project, "toy")
    paths.input.write_text("CAT CAT\n")
    with pytest.raises(PipelineError, match="has 1 distinct word"):
        prepare(tiny_params("toy").data, paths)


def test_a_vocabulary_too_large_for_uint16_tokens_is_refused(project):
    paths = ExamplePaths(project, "shakespeare")
    chars = [chr(c) for c in range(0x10000, 0x10000 + 70_000)]  # beyond the surrogates: all valid UTF-8
    paths.input.write_text("".join(chars), encoding="utf-8")
    with pytest.raises(PipelineError, match="has 70,000 distinct characters, more than the 65,536 that uint16 tokens"):
        prepare(tiny_params("shakespeare").data, paths)
    assert not paths.prepared.exists()


def test_a_split_with_nothing_to_predict_is_refused(project):
    paths = ExamplePaths(project, "shakespeare")
    paths.input.write_text("To be, or not to be")
    with pytest.raises(PipelineError, match="the validation split has 1 token"):
        prepare(tiny_params("shakespeare", "shakespeare.data.val_fraction=0.05").data, paths)


def test_input_that_is_not_utf8_is_named(project):
    paths = ExamplePaths(project, "shakespeare")
    paths.input.write_bytes("Caf\u00e9".encode("latin-1"))
    with pytest.raises(PipelineError, match=f"input file {paths.input} is not UTF-8 text"):
        prepare(tiny_params("shakespeare").data, paths)


def test_token_files_from_another_prepare_are_caught(toy):
    _, paths, dataset = toy
    tokens = np.fromfile(paths.train_tokens, dtype="<u2")
    tokens[[0, 1]] = tokens[[1, 0]] if tokens[0] != tokens[1] else tokens[[2, 0]]
    tokens.tofile(paths.train_tokens)  # same length, other content: what a prepare killed halfway leaves
    with pytest.raises(PipelineError, match="train.bin is not the file meta.json describes"):
        load_dataset(paths)


def test_a_token_beyond_the_vocabulary_and_a_meta_without_keys_are_named(toy):
    _, paths, dataset = toy
    meta = json.loads(paths.meta.read_text())
    del meta["sha256"]  # an older meta.json, without the token files' hashes
    paths.meta.write_text(json.dumps(meta))
    tokens = np.fromfile(paths.val_tokens, dtype="<u2")
    tokens[0] = 200
    tokens.tofile(paths.val_tokens)
    with pytest.raises(PipelineError, match="val.bin has token 200, beyond the 11 characters"):
        load_dataset(paths)
    paths.meta.write_text('{"kind": "words"}')
    with pytest.raises(PipelineError, match="meta.json lacks train_tokens, val_tokens, vocab: prepare again"):
        load_dataset(paths)


def test_a_split_shorter_than_a_block_stops_training_before_a_run_starts(project, tracker):
    paths = ExamplePaths(project, "shakespeare")
    paths.input.write_text("To be, or not to be, that is the question. " * 4)
    params = tiny_params("shakespeare")
    prepare(params.data, paths)
    with pytest.raises(PipelineError, match="the validation split has 18 tokens; model.block_size \\+ 1 = 33 needed"):
        train_example(params, paths, tracker, progress=False)
    assert not paths.model_dir.exists() and tracker.client.search_experiments(filter_string="name='shakespeare'") == []


@given(st.text(min_size=1), st.data())
def test_encode_then_decode_gives_back_any_text_over_the_vocabulary(alphabet, data):
    vocab = Vocabulary.from_text(alphabet)
    text = data.draw(st.text(alphabet=sorted(set(alphabet))))
    ids = vocab.encode(text)
    assert vocab.decode(ids) == text and all(0 <= i < vocab.size for i in ids)
    assert vocab.size == len(set(alphabet)) and list(vocab.chars) == sorted(set(alphabet))


@given(st.text(min_size=1, max_size=20), st.text(min_size=1))
def test_encoding_text_with_unknown_characters_names_each_one(alphabet, text):
    vocab = Vocabulary.from_text(alphabet)
    unknown = set(text) - set(alphabet)
    if not unknown:
        assert vocab.decode(vocab.encode(text)) == text
        return
    with pytest.raises(PipelineError) as error:
        vocab.encode(text, "prompt")
    assert all(repr(ch) in str(error.value) for ch in unknown)
