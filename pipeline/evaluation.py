"""Deterministic metrics of a trained model: whole-split loss and, for word lists, word metrics."""

import math
from collections import Counter, defaultdict

import torch
from torch.nn import functional as F

from pipeline.data import BOUNDARY, Dataset, Vocabulary
from pipeline.device import autocast
from pipeline.model import GPT
from pipeline.sampling import make_generator, next_token_probs, sample_words
from pipeline.schema import EvaluateParams, WordEvalParams


def block_windows(tokens: torch.Tensor, block_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every next-token prediction of `tokens` once, in consecutive block-sized windows."""
    n_targets = len(tokens) - 1
    n_full = n_targets // block_size * block_size
    windows = [(tokens[:n_full].view(-1, block_size), tokens[1 : n_full + 1].view(-1, block_size))]
    if n_full < n_targets:
        windows.append((tokens[n_full:n_targets][None], tokens[n_full + 1 :][None]))
    return windows


def word_windows(tokens: torch.Tensor, boundary: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every next-token prediction of a word stream once, each word seen from its start.

    Window k runs from the boundary before word k to the one after it, so a word's letters
    and its ending are predicted with the whole word so far in view.
    """
    edges = torch.nonzero(tokens == boundary).flatten().tolist()
    by_length = defaultdict(list)
    for start, end in zip(edges, edges[1:]):
        by_length[end - start].append(tokens[start : end + 1])
    return [(torch.stack(w)[:, :-1], torch.stack(w)[:, 1:]) for w in by_length.values()]


@torch.no_grad()
def split_loss(model: GPT, windows: list, batch_size: int, device, precision: str = "auto") -> float:
    """Mean next-token loss over all the windows' targets, deterministically."""
    model.eval()
    total, count = 0.0, 0
    for inputs, targets in windows:
        for i in range(0, len(inputs), batch_size):
            x, y = inputs[i : i + batch_size].to(device), targets[i : i + batch_size].to(device)
            with autocast(device, precision):
                logits, _ = model(x)
            total += F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="sum").item()
            count += y.numel()
    return total / count


def eval_windows(dataset: Dataset, split: str, block_size: int) -> list:
    tokens = getattr(dataset, split)
    if dataset.meta["kind"] == "words":
        return word_windows(tokens, dataset.boundary)
    return block_windows(tokens, block_size)


def spaced_windows(windows: list, max_targets: int | None) -> list:
    """Every k-th window of each group, k chosen so that about `max_targets` targets remain; all of
    them when they are fewer or `max_targets` is None. Evenly spaced, so the whole split is sampled."""
    total = sum(targets.numel() for _, targets in windows)
    if max_targets is None or total <= max_targets:
        return windows
    stride = math.ceil(total / max_targets)
    return [(inputs[::stride], targets[::stride]) for inputs, targets in windows]


def loss_metrics(loss: float) -> dict[str, float]:
    return {"loss": loss, "perplexity": math.exp(loss), "bpc": loss / math.log(2)}


def split_metrics(
    model: GPT, dataset: Dataset, split: str, params: EvaluateParams, device, precision: str = "auto"
) -> dict[str, float]:
    """Loss, perplexity and bits per character over one split: the whole validation split, and the
    train split's `params.train_tokens` targets in evenly spaced windows."""
    windows = eval_windows(dataset, split, model.config.block_size)
    if split == "train":
        windows = spaced_windows(windows, params.train_tokens)
    return loss_metrics(split_loss(model, windows, params.batch_size, device, precision))


def words_by_length(words: list[str]) -> list[list[str]]:
    """The words in groups of one length, so that each group is one batch of equal-length rows."""
    by_length = defaultdict(list)
    for word in words:
        by_length[len(word)].append(word)
    return list(by_length.values())


@torch.no_grad()
def last_letter_accuracy(model: GPT, vocab: Vocabulary, words: list[str], device) -> float:
    """Share of words whose last letter is the model's likeliest character after the rest."""
    correct = 0
    for same_length in words_by_length(words):
        contexts = torch.tensor([vocab.encode(BOUNDARY + w[:-1]) for w in same_length], device=device)
        predicted = next_token_probs(model, contexts).argmax(dim=-1).tolist()
        correct += sum(vocab.chars[p] == w[-1] for p, w in zip(predicted, same_length))
    return correct / len(words)


@torch.no_grad()
def valid_mass(model: GPT, vocab: Vocabulary, words: list[str], temperature: float, device) -> float:
    """The probability that a word sampled at `temperature` is one of `words`: exactly what
    valid_share estimates from its samples, the sum of each word's probability with its boundary."""
    total = 0.0
    for same_length in words_by_length(words):
        tokens = torch.tensor([vocab.encode(BOUNDARY + w + BOUNDARY) for w in same_length], device=device)
        logits, _ = model(tokens[:, :-1])
        log_probs = torch.log_softmax(logits.float() / temperature, dim=-1)
        word_log_probs = log_probs.gather(-1, tokens[:, 1:, None]).sum(dim=(1, 2))
        total += word_log_probs.exp().sum().item()
    return total


def last_letter_ceiling(words: list[str]) -> float:
    """The best last-letter accuracy possible: `COR` ends both CORE and CORN, so one must miss."""
    endings = defaultdict(Counter)
    for word in words:
        endings[word[:-1]][word[-1]] += 1
    return sum(c.most_common(1)[0][1] for c in endings.values()) / len(words)


@torch.no_grad()
def word_metrics(model: GPT, dataset: Dataset, params: WordEvalParams, device) -> dict[str, float]:
    words = dataset.words
    known = set(words)
    sampled = sample_words(
        model,
        dataset.vocab,
        "",
        params.samples,
        dataset.meta["max_word_length"] + 1,
        params.temperature,
        None,
        make_generator(params.seed, device),
        device,
    )
    return {
        "valid_share": sum(w in known for w in sampled) / len(sampled),
        "valid_mass": valid_mass(model, dataset.vocab, words, params.temperature, device),
        "coverage": len(known.intersection(sampled)) / len(known),
        "last_letter_accuracy": last_letter_accuracy(model, dataset.vocab, words, device),
        "last_letter_ceiling": last_letter_ceiling(words),
    }
