"""A character-level GPT in the style of nanoGPT.

Token embeddings, `n_layer` pre-norm transformer blocks with causal multi-head self-attention and
an MLP, a final norm and a language-model head. The classic nanoGPT block (learned positions,
LayerNorm, GELU, tied head) and the faster modern one (rotary positions, RMSNorm, QK-norm, ReLU²
or SwiGLU, untied head, zero-initialised projections, soft-capped logits, bigram and hashed n-gram
embeddings) are the same code, chosen by `ModelConfig`. Generation (the key/value cache, sampling a
token at a time) is in sampling.py.
"""

import dataclasses
import math
from typing import TYPE_CHECKING, Annotated, Literal

import torch
import torch.nn as nn
from pydantic import ConfigDict, Field, PositiveInt
from pydantic.dataclasses import dataclass
from torch.nn import functional as F

if TYPE_CHECKING:
    from pipeline.sampling import KVCache  # generation lives there; the model only reads the cache

STRICT = ConfigDict(extra="forbid")
# Bounds of the shape keys, far past any model that fits on one machine, so that a typo such as
# n_layer=10^12 is refused by the schema at once; pipeline/memory.py refuses what this machine cannot hold.
MAX_LAYERS = 10_000
MAX_WIDTH = 2**16  # n_embd: one block of this width holds 12 x 2^32 parameters, 200 GB
MAX_HEADS = 2**12
MAX_BLOCK_SIZE = 2**20  # positions of a training window
MAX_TABLE_ROWS = 2**31  # rows of one hashed n-gram table
HASH_MULTIPLIER = 2654435761  # Knuth's multiplicative hash: spreads the low bits' n-grams over the table
HASH_MODULUS = 2**31 - 1  # keeps a rolling n-gram key, times the multiplier, inside int64


@dataclass(config=STRICT)
class ModelConfig:
    """The architecture, as `params.yaml` gives it; the vocabulary comes from the data.

    The defaults are nanoGPT's CPU recipe's width in 2 blocks (not its 4: on a CPU without bf16
    they reach a lower loss in the same seconds), twice its context, with the block that trained
    fastest on the CPU (docs/performance.md); overrides/nanogpt.txt sets nanoGPT's own.
    """

    # 128 at half the windows a step (the same tokens): 0.010 to 0.019 lower loss after
    # Shakespeare's 1000 steps than 64, on both CPU recipes over two seeds; 256 lost
    block_size: Annotated[int, Field(gt=0, le=MAX_BLOCK_SIZE)] = 128
    n_layer: Annotated[int, Field(gt=0, le=MAX_LAYERS)] = 2
    # 2 heads of 64 with schema's learning rate 3.5e-3: the project's sweep's pick, 0.003 (bf16) and
    # 0.006 (float32) lower than 4 heads at 4.5e-3 over three seeds (docs/performance.md)
    n_head: Annotated[int, Field(gt=0, le=MAX_HEADS)] = 2
    n_embd: Annotated[int, Field(gt=0, le=MAX_WIDTH)] = 128
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    bias: bool = False
    positions: Literal["learned", "rotary"] = "rotary"  # rotary: samples may run past block_size
    norm: Literal["layernorm", "rmsnorm"] = "rmsnorm"
    qk_norm: bool = True  # RMS-normalise each head's queries and keys
    mlp: Literal["gelu", "relu2", "swiglu"] = "gelu"
    tie_embeddings: bool = False  # the output head shares the token embedding's weight
    zero_init: bool = False  # residual projections and the untied head start at zero
    logit_softcap: Annotated[float, Field(ge=0.0, allow_inf_nan=False)] = 0.0  # cap·tanh(logits/cap); 0: off
    # each position adds an embedding of its pair (previous token, own token): vocab_size² + 1 rows,
    # lookups only. Shakespeare: 0.02 lower loss after 1000 steps, 0.05 mid-run (docs/performance.md)
    bigram_embedding: bool = True
    # hashed n-gram embeddings: the rows of a table for each order from 3 up ([32768, 65536] for 3- and
    # 4-grams); each position adds the row its last n tokens hash to. Lookups only, updated sparsely
    ngram_rows: tuple[Annotated[int, Field(gt=0, le=MAX_TABLE_ROWS)], ...] = (16384, 32768, 65536)

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.positions == "rotary" and (self.n_embd // self.n_head) % 2:
            raise ValueError(f"rotary positions need an even head size, not {self.n_embd // self.n_head}")


# nanoGPT's block: what a checkpoint saved before the block options existed was trained with
CLASSIC_BLOCK = dict(
    positions="learned",
    norm="layernorm",
    qk_norm=False,
    mlp="gelu",
    tie_embeddings=True,
    zero_init=False,
    logit_softcap=0.0,
    bigram_embedding=False,
    ngram_rows=(),
)


@dataclass(config=STRICT)
class GPTConfig(ModelConfig):
    vocab_size: PositiveInt = dataclasses.field(kw_only=True)


def rms_norm(x):
    return F.rms_norm(x, (x.size(-1),))


def rotate(x, rope):
    """Rotary position embedding of `x` (B, n_head, T, head_size); `rope` = (cos, sin), (T, head_size/2)."""
    cos, sin = (t.to(x.dtype) for t in rope)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


def rotary_angles(positions: torch.Tensor, head_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of each position's angles, (T, head_size/2), computed in float64: positions of
    a long sample reach 1e5, where float32 angles would drift."""
    inv_freq = 10_000.0 ** -(torch.arange(0, head_size, 2, dtype=torch.float64) / head_size)
    angles = positions.cpu().double()[:, None] * inv_freq[None, :]
    return angles.cos().float().to(positions.device), angles.sin().float().to(positions.device)


def sliding_mask(q_positions: torch.Tensor, k_positions: torch.Tensor, window: int) -> torch.Tensor:
    """Which keys each query sees: its own and earlier positions, at most `window` of them."""
    distance = q_positions[:, None] - k_positions[None, :]
    return (distance >= 0) & (distance < window)


def attention(q, k, v, mask, dropout: float, causal: bool):
    """Fused attention; on the CPU in float32 even under bf16 autocast: there, at these sizes, its
    bf16 backward kernel is about 5x slower than the float32 one (docs/performance.md)."""
    if q.device.type != "cpu" or q.dtype != torch.bfloat16:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal)
    with torch.autocast("cpu", enabled=False):
        y = F.scaled_dot_product_attention(
            q.float(), k.float(), v.float(), attn_mask=mask, dropout_p=dropout, is_causal=causal
        )
    return y.to(q.dtype)


def make_norm(config: "GPTConfig") -> nn.Module:
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.n_embd)
    return nn.LayerNorm(config.n_embd, bias=config.bias)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: "GPTConfig"):
        super().__init__()
        self.n_head, self.qk_norm = config.n_head, config.qk_norm
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.dropout = config.dropout

    def heads(self, x, rope=None):
        """Queries, keys and values (B, n_head, T, head_size) of `x`, normalised and rotated as configured."""
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if self.qk_norm:
            q, k = rms_norm(q), rms_norm(k)
        if rope is not None:
            q, k = rotate(q, rope), rotate(k, rope)
        return q, k, v

    def forward(self, x, rope=None, mask=None, cache: "KVCache | None" = None, layer: int = 0):
        """`mask`: which keys each query sees, when not simply causal (a window sliding past block_size)."""
        B, T, C = x.size()
        q, k, v = self.heads(x, rope)
        if cache is not None:
            k, v = cache.append(layer, k, v)
        # a single new query may see every cached key, so only a multi-token call needs a mask
        causal = mask is None and T > 1
        dropout = self.dropout if self.training else 0.0
        y = attention(q, k, v, mask, dropout, causal)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


def mlp_hidden(config: ModelConfig) -> int:
    """The MLP's inner width. SwiGLU's two input projections at 8/3 of the width keep the parameters
    of a 4x MLP."""
    return 64 * math.ceil(8 * config.n_embd / 3 / 64) if config.mlp == "swiglu" else 4 * config.n_embd


class MLP(nn.Module):
    def __init__(self, config: "GPTConfig"):
        super().__init__()
        self.kind = config.mlp
        hidden = mlp_hidden(config)
        self.c_fc = nn.Linear(config.n_embd, hidden * (2 if config.mlp == "swiglu" else 1), bias=config.bias)
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        h = self.c_fc(x)
        if self.kind == "gelu":
            h = F.gelu(h)
        elif self.kind == "relu2":
            h = F.relu(h).square()
        else:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        return self.dropout(self.c_proj(h))


class Block(nn.Module):
    def __init__(self, config: "GPTConfig"):
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x, rope=None, mask=None, cache: "KVCache | None" = None, layer: int = 0):
        x = x + self.attn(self.ln_1(x), rope, mask, cache, layer)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.rotary = config.positions == "rotary"
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=make_norm(config),
            )
        )
        if not self.rotary:
            self.transformer.wpe = nn.Embedding(config.block_size, config.n_embd)
        if config.bigram_embedding:  # row a·V + b for the pair (a, b); the last row for an unseen previous token
            self.transformer.bte = nn.Embedding(config.vocab_size**2 + 1, config.n_embd)
        if config.ngram_rows:  # one table for each order n = 3, 4, ...
            self.transformer.nte = nn.ModuleList(nn.Embedding(rows, config.n_embd) for rows in config.ngram_rows)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.transformer.wte.weight = self.lm_head.weight
        if self.rotary:  # the angles of the training window, made once
            rope = rotary_angles(torch.arange(config.block_size), config.n_embd // config.n_head)
            self.register_buffer("rope_cos", rope[0], persistent=False)
            self.register_buffer("rope_sin", rope[1], persistent=False)
        self.apply(self._init_weights)
        # GPT-2: scale the residual projections by 1/sqrt(number of residual additions)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
                if config.zero_init:  # each block starts as the identity
                    torch.nn.init.zeros_(p)
        if config.zero_init and not config.tie_embeddings:
            torch.nn.init.zeros_(self.lm_head.weight)
        for table in self.transformer.nte if config.ngram_rows else []:
            # a hashed row adds nothing until batches have read it (docs/performance.md, 2026-12-05)
            torch.nn.init.zeros_(table.weight)

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding and not self.rotary else n

    def receptive_field(self) -> int:
        """How many trailing tokens the last position's output depends on, with rotary positions:
        each layer sees `block_size` positions back, its own included."""
        return self.config.n_layer * (self.config.block_size - 1) + 1

    def position_inputs(self, start: int, T: int, device):
        """(rope, mask) for positions start..start+T-1: the rotary angles, and the sliding window
        once a sequence runs past block_size (None while plain causal attention does)."""
        if not self.rotary:
            return None, None
        window = self.config.block_size
        if start + T <= window:
            return (self.rope_cos[start : start + T], self.rope_sin[start : start + T]), None
        positions = torch.arange(start, start + T, device=device)
        rope = rotary_angles(positions, self.config.n_embd // self.config.n_head)
        # a single query (after a cache) sees every key the cache returns: no mask then
        return rope, sliding_mask(positions, positions, window) if T > 1 else None

    @property
    def lookback(self) -> int:
        """How many tokens before a window its lookups read: a bigram's 1, an n-gram's n - 1."""
        if self.config.ngram_rows:
            return len(self.config.ngram_rows) + 1
        return int(self.config.bigram_embedding)

    def lookup_tables(self) -> list[nn.Embedding]:
        """The bigram and n-gram tables: each step reads a few of their rows, and updates only those."""
        tables = [self.transformer.bte] if self.config.bigram_embedding else []
        return tables + list(self.transformer.nte) if self.config.ngram_rows else tables

    def bigrams(self, idx, before=None):
        """The bigram-embedding row of each position of `idx`: its pair with the token before it.
        `before` (B, j) ends with the token before idx's first; None: not seen (a window's first position)."""
        V = self.config.vocab_size
        first = idx[:, :1] + before[:, -1:] * V if before is not None else torch.full_like(idx[:, :1], V * V)
        return torch.cat((first, idx[:, :-1] * V + idx[:, 1:]), dim=1)

    def ngrams(self, idx, before=None):
        """Each n-gram table's row for each position of `idx` (n = 3, 4, ...): the hash of the n
        tokens that end there. `before` (B, j): the tokens before idx's first; any further back
        count as one more symbol, V, "not seen", as at the start of a training window."""
        V, T, lookback = self.config.vocab_size, idx.size(1), self.lookback
        context = idx if before is None else torch.cat((before[:, -lookback:], idx), dim=1)
        context = F.pad(context, (lookback - (context.size(1) - T), 0), value=V)
        key, scale, rows = context[:, lookback:], 1, []
        for back in range(1, lookback + 1):  # key: the n-gram's tokens as digits in base V + 1, newest first
            scale = scale * (V + 1) % HASH_MODULUS
            key = (key + context[:, lookback - back : lookback - back + T] * scale) % HASH_MODULUS
            if back >= 2:
                rows.append((key * HASH_MULTIPLIER >> 16) % self.config.ngram_rows[back - 2])
        return rows

    def forward(self, idx, targets=None, cache: "KVCache | None" = None, start: int = 0, before=None):
        """Logits (and the loss against `targets`); with a `cache`, `idx` follows its positions.

        `start`: the position of idx's first token (rotary positions only), as when a long sample
        is recomputed from its last tokens; an empty cache starts there too (`KVCache.length`).
        `before` (B, j): the tokens before idx's first, for its bigram and n-gram rows (`lookback` of
        them are read), when idx does not start the text.
        """
        start = cache.length if cache is not None else start
        T = idx.size(1)
        if not self.rotary and self.config.block_size < start + T:
            raise ValueError(f"sequence of length {start + T} exceeds block_size {self.config.block_size}")
        if cache is not None and cache.keys[0] is not None and T > 1:
            raise ValueError("a filled cache takes one token at a time")
        x = self.transformer.wte(idx)
        if self.config.bigram_embedding:
            x = x + self.transformer.bte(self.bigrams(idx, before))
        if self.config.ngram_rows:
            for table, rows in zip(self.transformer.nte, self.ngrams(idx, before)):
                x = x + table(rows)
        if not self.rotary:
            x = x + self.transformer.wpe(torch.arange(start, start + T, dtype=torch.long, device=idx.device))
        rope, mask = self.position_inputs(start, T, idx.device)
        x = self.transformer.drop(x)
        for layer, block in enumerate(self.transformer.h):
            x = block(x, rope, mask, cache, layer)
        if cache is not None:
            cache.length += T
        logits = self.lm_head(self.transformer.ln_f(x))
        if cap := self.config.logit_softcap:
            logits = cap * torch.tanh(logits / cap)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1))
        return logits, loss

    def optimizer_groups(self, weight_decay: float) -> list[dict]:
        """Decay matrices (weights, embeddings); leave biases and norm gains alone."""
        params = [p for p in self.parameters() if p.requires_grad]
        return [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]

    def dense_parameters(self) -> list[nn.Parameter]:
        """Every parameter but the lookup tables': what gradient clipping bounds. A table's gradient
        touches a few rows, and on the CPU it is sparse, which clipping's norm does not take."""
        tables = {id(table.weight) for table in self.lookup_tables()}
        return [p for p in self.parameters() if id(p) not in tables]

    def hidden_matrices(self) -> list[nn.Parameter]:
        """The blocks' 2-D weights: what Muon orthogonalises; embeddings, head and gains are not."""
        return [p for p in self.transformer.h.parameters() if p.dim() == 2 and p.requires_grad]

    def stacked_matrices(self) -> dict[nn.Parameter, int]:
        """Hidden matrices that stack several, by how many: each block's q, k and v projections."""
        return {block.attn.c_attn.weight: 3 for block in self.transformer.h}


def build_model(config: ModelConfig, vocab_size: int, seed: int) -> GPT:
    """A freshly initialised model that depends on `seed` alone, not on the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return GPT(GPTConfig(**dataclasses.asdict(config), vocab_size=vocab_size))
