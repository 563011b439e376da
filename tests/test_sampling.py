import pytest
import torch

from pipeline.commands import build_model
from pipeline.data import Vocabulary
from pipeline.errors import PipelineError
from pipeline.sampling import check_prompts, complete_word, make_generator, sample_report, sample_words

from .conftest import tiny_params


def test_a_prompt_with_unknown_characters_names_them():
    vocab = Vocabulary.from_text(" ACELNORST")
    with pytest.raises(PipelineError, match=r"'cor' has 'c', 'o', 'r'"):
        check_prompts(vocab, ["COR", "cor"])


def test_sampled_words_start_with_the_prefix_and_stop_at_the_boundary(toy):
    params, _, dataset = toy
    model = build_model(params, dataset.vocab.size)
    words = sample_words(model, dataset.vocab, "CO", 20, 5, 1.0, None, make_generator(0, "cpu"), "cpu")
    assert len(words) == 20
    assert all(w.startswith("CO") and " " not in w and len(w) <= 7 for w in words)


def test_word_completion_reports_greedy_answer_and_probabilities(toy):
    params, _, dataset = toy
    model = build_model(params, dataset.vocab.size)
    completion = complete_word(model, dataset.vocab, "COR", params.sample, make_generator(0, "cpu"), "cpu")
    assert completion.answer.startswith("COR") and len(completion.samples) == params.sample.num_samples
    probs = [p for _, p in completion.next_chars]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6


def test_text_samples_are_seeded(project):
    params = tiny_params("shakespeare")
    vocab = Vocabulary.from_text((project / "data/shakespeare/input.txt").read_text())
    torch.manual_seed(0)
    model = build_model(params, vocab.size)
    first, second = (sample_report(model, vocab, params.sample, False, "cpu") for _ in range(2))
    assert first == second
    assert first.count("prompt 'ROMEO:'") == params.sample.num_samples
