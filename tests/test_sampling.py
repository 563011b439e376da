import dataclasses
import json
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.checkpoint import load_checkpoint
from pipeline.config import load_params
from pipeline.data import Vocabulary
from pipeline.errors import PipelineError
from pipeline.model import build_model
from pipeline.paths import ExamplePaths
from pipeline.sampling import (
    check_prompts,
    complete_word,
    format_texts,
    generate,
    make_generator,
    sample_report,
    sample_texts,
    sample_words,
)
from pipeline.stages.sample import sample_example

from .helpers import tiny_params

LONG_PROMPT = ("ROMEO:\nI will not. " * 6_000)[:100_000]  # a rotary model's whole prompt made a 10^10 mask


def test_a_prompt_with_unknown_characters_names_them():
    vocab = Vocabulary.from_text(" ACELNORST")
    with pytest.raises(PipelineError, match=r"'cor' has 'c', 'o', 'r'"):
        check_prompts(vocab, ["COR", "cor"])


def test_sampled_words_start_with_the_prefix_and_stop_at_the_boundary(toy):
    params, _, dataset = toy
    model = build_model(params.model, dataset.vocab.size, params.train.seed)
    words = sample_words(model, dataset.vocab, "CO", 20, 5, 1.0, None, make_generator(0, "cpu"), "cpu")
    assert len(words) == 20
    assert all(w.startswith("CO") and " " not in w and len(w) <= 7 for w in words)


def test_word_completion_reports_greedy_answer_and_probabilities(toy):
    params, _, dataset = toy
    model = build_model(params.model, dataset.vocab.size, params.train.seed)
    completion = complete_word(model, dataset.vocab, "COR", params.sample, make_generator(0, "cpu"), "cpu")
    assert completion.answer.startswith("COR") and len(completion.samples) == params.sample.num_samples
    probs = [p for _, p in completion.next_chars]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6


def test_text_samples_are_seeded(project):
    params = tiny_params("shakespeare")
    vocab = Vocabulary.from_text((project / "data/shakespeare/input.txt").read_text())
    torch.manual_seed(0)
    model = build_model(params.model, vocab.size, params.train.seed)
    first, second = (sample_report(model, vocab, params.sample, False, "cpu") for _ in range(2))
    assert first == second
    assert first.count("prompt 'ROMEO:'") == params.sample.num_samples


VOCAB = Vocabulary.from_text(" ACELNORST")
TINY_MODEL = build_model(tiny_params("toy").model, VOCAB.size, 1337).eval()  # block_size 8: longer prompts are cropped


@settings(max_examples=40, deadline=None)
@given(st.lists(st.text(min_size=1, max_size=30), min_size=1, max_size=4))
def test_any_prompts_are_accepted_or_refused_by_name_before_sampling(prompts):
    bad = [p for p in prompts if set(p) - set(VOCAB.chars)]
    if not bad:
        check_prompts(VOCAB, prompts)
        return
    with pytest.raises(PipelineError) as error:
        check_prompts(VOCAB, prompts)
    assert all(repr(p) in str(error.value) for p in bad)


@settings(max_examples=25, deadline=None)
@given(st.text(alphabet="ACELNORST ", min_size=1, max_size=30), st.integers(1, 6), st.integers(0, 2**31))
def test_a_sample_starts_with_its_prompt_whatever_its_length(prompt, new_tokens, seed):
    params = dataclasses.replace(tiny_params("toy").sample, num_samples=2, max_new_tokens=new_tokens)
    texts = sample_texts(TINY_MODEL, VOCAB, prompt, params, make_generator(seed, "cpu"), "cpu")
    assert all(t.startswith(prompt) and len(t) == len(prompt) + new_tokens for t in texts)


@settings(max_examples=25, deadline=None)
@given(st.text(alphabet="ACELNORST", min_size=1, max_size=12))
def test_a_word_prefix_is_completed_to_one_word(prefix):
    words = sample_words(TINY_MODEL, VOCAB, prefix, 3, 5, 1.0, None, make_generator(0, "cpu"), "cpu")
    assert all(w.startswith(prefix) and " " not in w and len(w) <= len(prefix) + 5 for w in words)


def test_a_word_list_prompt_with_a_space_is_refused():
    with pytest.raises(PipelineError, match="start of one word, without ' ': \\['CO R'\\]"):
        check_prompts(VOCAB, ["COR", "CO R"], word_list=True)
    check_prompts(VOCAB, ["CO R"], word_list=False)


def test_the_sample_stage_samples_a_prompt_of_100000_characters_as_the_uncached_path(trained_project):
    root, tracker = trained_project
    overrides = [f"shakespeare.sample.prompts={json.dumps([LONG_PROMPT])}", "shakespeare.sample.max_new_tokens=12"]
    params, paths = load_params(root / "params.yaml", overrides)["shakespeare"], ExamplePaths(root, "shakespeare")
    started = time.monotonic()
    report = sample_example(params, paths, tracker)
    assert time.monotonic() - started < 20 and paths.samples.read_text() == report
    checkpoint, sample = load_checkpoint(paths.checkpoint), params.sample
    model, vocab = checkpoint.model, checkpoint.vocab
    assert model.config.positions == "rotary" and len(LONG_PROMPT) > 100 * model.receptive_field()
    context = torch.tensor([vocab.encode(LONG_PROMPT)] * sample.num_samples)
    generator = make_generator(sample.seed, "cpu")
    plain = generate(model, context, 12, sample.temperature, sample.top_k, generator, use_cache=False)
    assert report == format_texts(LONG_PROMPT, [vocab.decode(row.tolist()) for row in plain])


def test_samples_that_cannot_fit_are_refused_before_any_sampling(trained_project):
    root, tracker = trained_project
    params = load_params(root / "params.yaml", ["toy.sample.num_samples=1000000000000"])["toy"]
    paths = ExamplePaths(root, "toy")
    with pytest.raises(PipelineError, match=r"^sampling toy needs about .* free: lower toy.sample.num_samples$"):
        sample_example(params, paths, tracker)
