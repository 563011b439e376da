"""Text from a trained model: free samples from prompts, and completions of word prefixes."""

import dataclasses

import torch
from torch.nn import functional as F
from tqdm.auto import tqdm

from pipeline.data import BOUNDARY, Vocabulary
from pipeline.errors import PipelineError
from pipeline.model import GPT
from pipeline.schema import SampleParams

PROGRESS_TOKENS = 2_000  # a generation this long takes seconds or more: show a progress bar (on a terminal)


class KVCache:
    """Keys and values of every layer for the positions seen so far, for sampling.

    With learned positions it holds at most `block_size` positions; past that, `generate`
    recomputes the cropped window as the uncached path does. With rotary positions attention is a
    window sliding over the whole sample: the cache keeps the last `block_size - 1` positions, all
    the next token may see besides itself, and stays valid as the sample grows.
    """

    def __init__(self, n_layer: int, keep: int):
        self.keep = keep
        self.keys: list[torch.Tensor | None] = [None] * n_layer
        self.values: list[torch.Tensor | None] = [None] * n_layer
        self.length = 0  # positions seen so far

    def append(self, layer: int, k, v):
        """Add `k`, `v` (B, n_head, T, head_size) after the positions held; return all of them."""
        if self.keys[layer] is not None:
            k, v = torch.cat((self.keys[layer], k), dim=2), torch.cat((self.values[layer], v), dim=2)
        self.keys[layer], self.values[layer] = k[:, :, -self.keep :], v[:, :, -self.keep :]
        return k, v


def tokens_before(model: GPT, idx, length: int):
    """The tokens before the last `length` of `idx` that the model's lookups read (`GPT.lookback`:
    a bigram's first half, an n-gram's first n - 1), or None if there are none."""
    start = max(0, idx.size(1) - length - model.lookback)
    return idx[:, start:-length] if model.lookback and idx.size(1) > length else None


def recompute(model: GPT, idx):
    """Logits of `idx` without a cache: its last block_size tokens with learned positions; with
    rotary ones, the tokens the last position depends on, at their own positions."""
    if not model.rotary:
        field = min(idx.size(1), model.config.block_size)
        return model(idx[:, -field:], before=tokens_before(model, idx, field))
    field = min(idx.size(1), model.receptive_field())
    return model(idx[:, -field:], start=idx.size(1) - field, before=tokens_before(model, idx, field))


def fill_cache(model: GPT, idx) -> tuple[KVCache, torch.Tensor]:
    """A cache of the prompt `idx` and its logits. With rotary positions only its last
    receptive field, at its own positions: the rest changes no later token, and a whole long
    prompt at once would make a prompt x prompt attention mask."""
    keep = model.config.block_size - 1 if model.rotary else model.config.block_size
    cache = KVCache(model.config.n_layer, keep)
    field = min(idx.size(1), model.receptive_field()) if model.rotary else idx.size(1)
    cache.length = idx.size(1) - field
    logits, _ = model(idx[:, -field:], cache=cache, before=tokens_before(model, idx, field))
    return cache, logits


@torch.no_grad()
def next_token_probs(model: GPT, idx, temperature: float = 1.0, top_k: int | None = None):
    """Probabilities of the token after each sequence in `idx` (B, T) -> (B, vocab_size), from the
    tokens the next one depends on, as generation reads them."""
    logits, _ = recompute(model, idx)
    return probabilities(logits[:, -1, :], temperature, top_k)


@torch.no_grad()
def generate(
    model: GPT,
    idx,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k=None,
    generator=None,
    use_cache: bool = True,
    progress: bool = False,
):
    """Extend each sequence in `idx` (B, T) by sampling `max_new_tokens` tokens.

    `temperature` 0 means greedy decoding. The key/value cache gives the same tokens as
    `use_cache=False` (which recomputes the whole context for every token), only faster.
    `progress`: a progress bar over the tokens, on a terminal only.
    """
    cache = None
    steps = tqdm(range(max_new_tokens), "sampling", unit="token", leave=False, disable=None if progress else True)
    for _ in steps:
        if not use_cache or (not model.rotary and idx.size(1) > model.config.block_size):
            logits, _ = recompute(model, idx)
        elif cache is None:
            cache, logits = fill_cache(model, idx)
        else:
            logits, _ = model(idx[:, -1:], cache=cache, before=tokens_before(model, idx, 1))
        if temperature == 0:
            next_idx = logits[:, -1, :].argmax(dim=-1, keepdim=True)
        else:
            probs = probabilities(logits[:, -1, :], temperature, top_k)
            next_idx = torch.multinomial(probs, num_samples=1, generator=generator)
        idx = torch.cat((idx, next_idx), dim=1)
    return idx


def probabilities(logits, temperature: float = 1.0, top_k: int | None = None):
    """Softmax of `logits` (B, vocab_size) at `temperature`, keeping only the `top_k` likeliest."""
    logits = logits.float() / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return F.softmax(logits, dim=-1)


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
    out = generate(
        model,
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
    probs = next_token_probs(model, _context(vocab, context, 1, device))[0]
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
