"""A character-level GPT in the style of nanoGPT.

Token and position embeddings, `n_layer` pre-norm transformer blocks with causal multi-head
self-attention and a GELU MLP, a final LayerNorm and a language-model head whose weight is tied
to the token embedding.
"""

import dataclasses
import math
from typing import Annotated

import torch
import torch.nn as nn
from pydantic import ConfigDict, Field, PositiveInt
from pydantic.dataclasses import dataclass
from torch.nn import functional as F

STRICT = ConfigDict(extra="forbid")


@dataclass(config=STRICT)
class ModelConfig:
    """The architecture, as `params.yaml` gives it; the vocabulary comes from the data.

    The defaults are the scale of nanoGPT's CPU recipe.
    """

    block_size: PositiveInt = 64
    n_layer: PositiveInt = 4
    n_head: PositiveInt = 4
    n_embd: PositiveInt = 128
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    bias: bool = False

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")


@dataclass(config=STRICT)
class GPTConfig(ModelConfig):
    vocab_size: PositiveInt = dataclasses.field(kw_only=True)


class KVCache:
    """Keys and values of every layer for the positions seen so far, for sampling.

    Position embeddings are absolute, so the cache holds at most `block_size` positions; past
    that, `GPT.generate` recomputes the cropped window as the uncached path does.
    """

    def __init__(self, n_layer: int, block_size: int):
        self.n_layer, self.block_size = n_layer, block_size
        self.keys = self.values = None  # (n_layer, B, n_head, block_size, head_size), made on first use
        self.length = 0  # positions filled

    def append(self, layer: int, k, v):
        """Store `k`, `v` (B, n_head, T, head_size) after the filled positions; return all so far."""
        if self.keys is None:  # the dtype autocast gives k and v, on their device
            shape = (self.n_layer, *k.shape[:2], self.block_size, k.size(3))
            self.keys, self.values = (torch.empty(shape, dtype=k.dtype, device=k.device) for _ in range(2))
        end = self.length + k.size(2)
        self.keys[layer, :, :, self.length : end] = k
        self.values[layer, :, :, self.length : end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.dropout = config.dropout

    def forward(self, x, cache: KVCache | None = None, layer: int = 0):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        # a cache is filled from empty in one call, then one token at a time: a single new query
        # may see every cached key, so only a multi-token call needs the causal mask
        causal = cache is None or T > 1
        if cache is not None:
            k, v = cache.append(layer, k, v)
        dropout = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=causal)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, cache: KVCache | None = None, layer: int = 0):
        x = x + self.attn(self.ln_1(x), cache, layer)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying
        self.apply(self._init_weights)
        # GPT-2: scale the residual projections by 1/sqrt(number of residual additions)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def forward(self, idx, targets=None, cache: KVCache | None = None):
        """Logits (and the loss against `targets`); with a `cache`, `idx` follows its positions."""
        start = cache.length if cache is not None else 0
        T = idx.size(1)
        if self.config.block_size < start + T:
            raise ValueError(f"sequence of length {start + T} exceeds block_size {self.config.block_size}")
        if cache is not None and start and T > 1:
            raise ValueError("a filled cache takes one token at a time")
        pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for layer, block in enumerate(self.transformer.h):
            x = block(x, cache, layer)
        if cache is not None:
            cache.length += T
        logits = self.lm_head(self.transformer.ln_f(x))
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1))
        return logits, loss

    def optimizer_groups(self, weight_decay: float) -> list[dict]:
        """Decay matrices (weights, embeddings); leave biases and LayerNorm gains alone."""
        params = [p for p in self.parameters() if p.requires_grad]
        return [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]

    @torch.no_grad()
    def next_token_probs(self, idx, temperature: float = 1.0, top_k: int | None = None):
        """Probabilities of the token after each sequence in `idx` (B, T) -> (B, vocab_size)."""
        logits, _ = self(idx[:, -self.config.block_size :])
        return probabilities(logits[:, -1, :], temperature, top_k)

    @torch.no_grad()
    def generate(
        self,
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
        from tqdm.auto import tqdm

        cache = None
        steps = tqdm(range(max_new_tokens), "sampling", unit="token", leave=False, disable=None if progress else True)
        for _ in steps:
            if not use_cache or idx.size(1) > self.config.block_size:
                logits, _ = self(idx[:, -self.config.block_size :])
            elif cache is None:  # fill the cache with the prompt
                cache = KVCache(self.config.n_layer, self.config.block_size)
                logits, _ = self(idx, cache=cache)
            else:
                logits, _ = self(idx[:, -1:], cache=cache)
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


def build_model(config: ModelConfig, vocab_size: int, seed: int) -> GPT:
    """A freshly initialised model that depends on `seed` alone, not on the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return GPT(GPTConfig(**dataclasses.asdict(config), vocab_size=vocab_size))
