"""What a trained model makes of a prompt: next-character probabilities and attention weights.

Training runs the fused attention kernel, which never forms the weights. Here a forward hook on
every block's attention recomputes them explicitly (softmax of masked q·kᵀ/√d) and passes the
explicit output on, so the probabilities shown come from the very weights drawn. The tests check
that both paths give the same outputs.
"""

import dataclasses
import math

import torch

from pipeline.data import Vocabulary
from pipeline.errors import PipelineError
from pipeline.model import GPT, CausalSelfAttention
from pipeline.sampling import check_prompts, read_prompt, show_char, shown_prompt


@dataclasses.dataclass
class Inspection:
    prompt: str
    context: str  # what the model reads: for a word list, the word boundary, then the prompt
    probs: torch.Tensor  # (T, vocab): the next character's distribution after each position
    attention: torch.Tensor  # (n_layer, n_head, T, T): row i is how position i weighs positions 0..i
    vocab: Vocabulary

    def prefixes(self, longest: int = 10) -> list[str]:
        """The text read up to each position, cut to its last `longest` characters."""
        return [self.context[max(0, i + 1 - longest) : i + 1] for i in range(len(self.context))]

    def top(self, k: int) -> list[list[tuple[str, float]]]:
        """The `k` likeliest next characters after each position, likeliest first."""
        values, indices = torch.topk(self.probs, min(k, self.vocab.size), dim=-1)
        return [
            [(self.vocab.chars[i], p) for i, p in zip(row_indices, row_values)]
            for row_indices, row_values in zip(indices.tolist(), values.tolist())
        ]


def explicit_attention(attn: CausalSelfAttention, x: torch.Tensor, rope=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The attention module's output for `x` (B, T, C), and its weights (B, n_head, T, T)."""
    B, T, C = x.size()
    q, k, v = attn.heads(x, rope)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(k.size(-1))
    causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
    weights = scores.masked_fill(~causal, float("-inf")).softmax(dim=-1)
    y = (weights @ v).transpose(1, 2).contiguous().view(B, T, C)
    return attn.c_proj(y), weights


@torch.no_grad()
def forward_with_attention(model: GPT, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (B, T, vocab) and attention weights (B, n_layer, n_head, T, T), in eval mode."""
    weights = []

    def explicit(module, args, _fused_output):
        y, w = explicit_attention(module, args[0], args[1])
        weights.append(w)
        return y  # replaces the fused output: the layers above see the explicit path

    model.eval()
    hooks = [block.attn.register_forward_hook(explicit) for block in model.transformer.h]
    try:
        logits, _ = model(idx)
    finally:
        for hook in hooks:
            hook.remove()
    return logits, torch.stack(weights, dim=1)


def check_inspect_prompts(vocab: Vocabulary, prompts: list[str], block_size: int, word_list: bool) -> None:
    """Fail before any work if a prompt has unknown characters or does not fit the model's context."""
    check_prompts(vocab, prompts)
    too_long = [p for p in prompts if len(read_prompt(p, word_list)) > block_size]
    if too_long:
        extra = " after the word boundary" if word_list else ""
        raise PipelineError(
            f"prompts longer than the model's context of {block_size} characters{extra}: "
            + ", ".join(map(shown_prompt, too_long))
        )


def inspect_prompt(model: GPT, vocab: Vocabulary, prompt: str, word_list: bool, device) -> Inspection:
    context = read_prompt(prompt, word_list)
    idx = torch.tensor([vocab.encode(context, "prompt")], dtype=torch.long, device=device)
    logits, attention = forward_with_attention(model, idx)
    probs = logits[0].float().softmax(dim=-1).cpu()
    return Inspection(prompt, context, probs, attention[0].float().cpu(), vocab)


def format_table(inspection: Inspection, k: int) -> str:
    """One line per position: `C -> 'O':98.6% 'R':1.0% ...`, as the seed notebook printed it."""
    header = f"prompt {inspection.prompt!r}"
    if inspection.context != inspection.prompt:
        header += f", read as {inspection.context!r}"
    rows = [
        f"{show_char(ch)} -> " + " ".join(f"{show_char(c)!r}:{p:.1%}" for c, p in top)
        for ch, top in zip(inspection.context, inspection.top(k))
    ]
    return "\n".join([header, *rows]) + "\n"
