import dataclasses
import math

import pytest
import torch

from pipeline.data import BOUNDARY
from pipeline.evaluation import (
    block_windows,
    eval_windows,
    last_letter_accuracy,
    last_letter_ceiling,
    loss_metrics,
    spaced_windows,
    split_loss,
    split_metrics,
    valid_mass,
    word_metrics,
    word_windows,
)
from pipeline.model import build_model
from pipeline.sampling import next_token_probs


def targets_of(windows):
    return sorted(torch.cat([t.flatten() for _, t in windows]).tolist())


@pytest.mark.parametrize("length", [2, 9, 10, 11, 33])
def test_block_windows_predict_every_token_once(length):
    tokens = torch.arange(length)
    windows = block_windows(tokens, 4)
    assert targets_of(windows) == list(range(1, length))
    for x, y in windows:
        assert torch.equal(y, x + 1)


def test_word_windows_see_each_word_from_its_start():
    boundary = 0
    tokens = torch.tensor([0, 5, 6, 0, 7, 0, 8, 9, 4, 0])
    windows = word_windows(tokens, boundary)
    assert sorted(tokens[1:].tolist()) == targets_of(windows)
    assert all((x[:, 0] == boundary).all() for x, _ in windows)


def test_split_loss_is_deterministic_and_matches_the_model_loss(toy):
    params, _, dataset = toy
    torch.manual_seed(0)
    model = build_model(params.model, dataset.vocab.size, params.train.seed).eval()
    block = params.model.block_size
    tokens = dataset.train[: 10 * block + 1]
    windows = block_windows(tokens, block)
    _, expected = model(tokens[:-1].view(10, block), tokens[1:].view(10, block))
    cpu = torch.device("cpu")
    assert split_loss(model, windows, 3, cpu) == pytest.approx(expected.item(), rel=1e-5)
    assert split_loss(model, eval_windows(dataset, "val", block), 4, cpu) == split_loss(
        model, eval_windows(dataset, "val", block), 4, cpu
    )


def test_spaced_windows_sample_the_whole_split_evenly():
    windows = block_windows(torch.arange(1001), 10)  # 100 windows of 10 targets
    sampled = spaced_windows(windows, 250)
    starts = sampled[0][0][:, 0].tolist()
    assert starts == list(range(0, 1000, 40))  # every 4th window, from the first to near the last
    assert sum(t.numel() for _, t in sampled) == 250
    assert spaced_windows(windows, 1000) is windows and spaced_windows(windows, None) is windows


def test_the_train_split_scores_train_tokens_targets_and_the_validation_split_all(toy):
    params, _, dataset = toy
    model = build_model(params.model, dataset.vocab.size, params.train.seed)
    cpu, few = torch.device("cpu"), dataclasses.replace(params.evaluate, train_tokens=500)
    whole = dataclasses.replace(params.evaluate, train_tokens=None)
    sampled = split_metrics(model, dataset, "train", few, cpu)
    assert sampled["loss"] != split_metrics(model, dataset, "train", whole, cpu)["loss"]
    windows = spaced_windows(eval_windows(dataset, "train", params.model.block_size), 500)
    assert sampled["loss"] == split_loss(model, windows, few.batch_size, cpu)
    assert split_metrics(model, dataset, "val", few, cpu) == split_metrics(model, dataset, "val", whole, cpu)


def test_loss_metrics_relate_perplexity_and_bits():
    m = loss_metrics(math.log(4))
    assert m["perplexity"] == pytest.approx(4) and m["bpc"] == pytest.approx(2)


def test_last_letter_ceiling_counts_ambiguous_endings_once():
    assert last_letter_ceiling(["CORE", "CORN", "CAT"]) == pytest.approx(2 / 3)
    assert last_letter_ceiling(["A", "I"]) == pytest.approx(1 / 2)


def test_word_metrics_are_shares(toy):
    params, _, dataset = toy
    model = build_model(params.model, dataset.vocab.size, params.train.seed)
    metrics = word_metrics(model, dataset, params.evaluate.words, torch.device("cpu"))
    assert set(metrics) == {"valid_share", "valid_mass", "coverage", "last_letter_accuracy", "last_letter_ceiling"}
    assert all(0 <= v <= 1 for v in metrics.values())
    accuracy = last_letter_accuracy(model, dataset.vocab, dataset.words, torch.device("cpu"))
    assert metrics["last_letter_accuracy"] == accuracy


def test_valid_mass_is_the_exact_probability_of_sampling_a_word(toy):
    """Each word's probability, one next-character distribution at a time, summed over the words."""
    params, _, dataset = toy
    model = build_model(params.model, dataset.vocab.size, params.train.seed).eval()
    cpu = torch.device("cpu")
    vocab, words = dataset.vocab, dataset.words[:5]
    expected = 0.0
    for word in words:
        context = BOUNDARY
        probability = 1.0
        for char in word + BOUNDARY:
            probs = next_token_probs(model, torch.tensor([vocab.encode(context)]), temperature=0.7)[0]
            probability *= probs[vocab.encode(char)[0]].item()
            context += char
        expected += probability
    assert valid_mass(model, vocab, words, 0.7, cpu) == pytest.approx(expected, rel=1e-5)
    assert 0 < valid_mass(model, vocab, dataset.words, 1.0, cpu) < 1


@pytest.mark.parametrize(
    "override, line",
    [
        ("toy.evaluate.batch_size=16777216", "evaluating toy needs about "),
        ("toy.evaluate.words.samples=1000000000000", "sampling words of toy needs about "),
    ],
)
def test_an_evaluation_that_cannot_fit_is_refused_before_it_writes(trained_project, override, line):
    from pipeline.config import load_params
    from pipeline.errors import PipelineError
    from pipeline.paths import ExamplePaths
    from pipeline.stages.evaluate import evaluate_example

    root, tracker = trained_project
    params, paths = load_params(root / "params.yaml", [override])["toy"], ExamplePaths(root, "toy")
    before = paths.metrics.read_bytes()
    with pytest.raises(PipelineError) as refused:
        evaluate_example(params, paths, tracker)
    key = override.split("=")[0]
    assert str(refused.value).startswith(line) and str(refused.value).endswith(f"free: lower {key}")
    assert paths.metrics.read_bytes() == before
