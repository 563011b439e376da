"""Text from a trained model: free samples from prompts, and completions of word prefixes."""

import dataclasses

import torch

from pipeline.data import BOUNDARY, Vocabulary
from pipeline.errors import PipelineError
from pipeline.model import GPT
from pipeline.schema import SampleParams

PROGRESS_TOKENS = 2_000  # a generation this long takes seconds or more: show a progress bar (on a terminal)


def shown_prompt(prompt: str, longest: int = 60) -> str:
    """A prompt as a message shows it: whole, or its start and its length."""
    return repr(prompt) if len(prompt) <= longest else f"{prompt[:longest]!r}... ({len(prompt):,} characters)"


def check_prompts(vocab: Vocabulary, prompts: list[str], word_list: bool = False) -> None:
    """Fail before any sampling if any prompt has a character the model has never seen.

    For a word list a prompt is the start of one word, so it cannot hold the word boundary.
    """
    bad = {prompt: vocab.unknown(prompt) for prompt in prompts if vocab.unknown(prompt)}
    if bad:
        details = "; ".join(f"{shown_prompt(p)} has {', '.join(map(repr, chars))}" for p, chars in bad.items())
        raise PipelineError(f"prompt characters outside the vocabulary {''.join(vocab.chars)!r}: {details}")
    if word_list and (split := [p for p in prompts if BOUNDARY in p]):
        shown = ", ".join(map(shown_prompt, split))
        raise PipelineError(f"a word-list prompt is the start of one word, without {BOUNDARY!r}: [{shown}]")


def _context(vocab: Vocabulary, text: str, copies: int, device) -> torch.Tensor:
    return torch.tensor([vocab.encode(text, "prompt")] * copies, dtype=torch.long, device=device)


def make_generator(seed: int, device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def read_prompt(prompt: str, word_list: bool) -> str:
    """What the model reads for `prompt`: a word list's word from the boundary before it, as it was
    trained to; running text as it is. The sample stage, inspect and the served model all read so."""
    return BOUNDARY + prompt if word_list else prompt


def completion(generated: str, word_list: bool) -> str:
    """The new text a model wrote after its context: for a word list, up to the word's end."""
    return generated.split(BOUNDARY, 1)[0] if word_list else generated


def continuations(
    model: GPT, vocab: Vocabulary, prompt: str, count: int, sampling: tuple, generator, device, word_list: bool
) -> list[str]:
    """`count` completions of `prompt`; `sampling` = (max_new_tokens, temperature, top_k)."""
    context = read_prompt(prompt, word_list)
    max_new_tokens, temperature, top_k = sampling
    out = model.generate(
        _context(vocab, context, count, device),
        max_new_tokens,
        temperature,
        top_k,
        generator,
        progress=max_new_tokens >= PROGRESS_TOKENS,
    )
    return [completion(vocab.decode(row[len(context) :].tolist()), word_list) for row in out]


def sampling_of(params: SampleParams) -> tuple:
    return params.max_new_tokens, params.temperature, params.top_k


def sample_texts(model: GPT, vocab: Vocabulary, prompt: str, params: SampleParams, generator, device) -> list[str]:
    texts = continuations(model, vocab, prompt, params.num_samples, sampling_of(params), generator, device, False)
    return [prompt + text for text in texts]


def sample_words(
    model: GPT,
    vocab: Vocabulary,
    prefix: str,
    count: int,
    max_new_tokens: int,
    temperature: float,
    top_k,
    generator,
    device,
) -> list[str]:
    """Words that start with `prefix`, each ended at the first boundary the model emits."""
    sampling = (max_new_tokens, temperature, top_k)
    return [prefix + text for text in continuations(model, vocab, prefix, count, sampling, generator, device, True)]


def next_char_table(model: GPT, vocab: Vocabulary, context: str, k: int, device) -> list[tuple[str, float]]:
    """The `k` likeliest next characters after `context`, with their probabilities."""
    probs = model.next_token_probs(_context(vocab, context, 1, device))[0]
    top = torch.topk(probs, min(k, vocab.size))
    return [(vocab.chars[i], p) for i, p in zip(top.indices.tolist(), top.values.tolist())]


@dataclasses.dataclass
class WordCompletion:
    prefix: str
    answer: str  # the greedy completion
    next_chars: list[tuple[str, float]]
    samples: list[str]


def complete_word(model: GPT, vocab: Vocabulary, prefix: str, params: SampleParams, generator, device):
    greedy = sample_words(model, vocab, prefix, 1, params.max_new_tokens, 0.0, None, None, device)[0]
    samples = sample_words(
        model,
        vocab,
        prefix,
        params.num_samples,
        params.max_new_tokens,
        params.temperature,
        params.top_k,
        generator,
        device,
    )
    next_chars = next_char_table(model, vocab, read_prompt(prefix, True), 3, device)
    return WordCompletion(prefix, greedy, next_chars, samples)


def show_char(ch: str) -> str:
    return {" ": "␠", "\n": "⏎"}.get(ch, ch)


def format_completion(c: WordCompletion) -> str:
    nexts = " | ".join(f"{show_char(ch)} {p:6.1%}" for ch, p in c.next_chars)
    return f"{c.prefix} -> {c.answer}\n  next: {nexts}\n  samples: {' '.join(c.samples)}\n"


def format_texts(prompt: str, texts: list[str]) -> str:
    rule = "-" * 60
    return "".join(f"{rule}\nprompt {prompt!r}, sample {i + 1}\n{rule}\n{t}\n" for i, t in enumerate(texts))


@torch.no_grad()
def sample_report(model: GPT, vocab: Vocabulary, params: SampleParams, word_list: bool, device) -> str:
    """The sample stage's text: word completions for a word list, free text otherwise."""
    model.eval()
    generator = make_generator(params.seed, device)
    if word_list:
        return "".join(
            format_completion(complete_word(model, vocab, p, params, generator, device)) for p in params.prompts
        )
    return "".join(format_texts(p, sample_texts(model, vocab, p, params, generator, device)) for p in params.prompts)
