"""How much memory a stage needs, estimated from the params alone, before anything is allocated.

A size the schema accepts may still be far more than the machine has: a batch of 10^8 windows
would start its MLflow run, then be killed by the kernel. Each stage compares its estimate with
what the device has free (`psutil` for host memory, `torch.cuda.mem_get_info` on CUDA) and refuses
at once, with both figures and the key to change.

The figures are float32 bytes (the master weights are float32 under bf16 autocast too, and bf16
activations only make the estimate generous). Training holds the parameters, their gradients,
the optimizer state (AdamW: two buffers per parameter; Muon: one momentum buffer per block matrix,
GPT.hidden_matrices) and the activations autograd keeps for the backward pass. Inference holds
the parameters, the key/value cache and one forward pass's largest tensors.
"""

import dataclasses

import psutil
import torch

from pipeline.errors import PipelineError
from pipeline.files import human
from pipeline.model import ModelConfig, mlp_hidden

FLOAT = 4  # bytes of a float32
TOKEN = 8  # bytes of an int64 token id
# What a stage allocates besides the model's tensors, measured on the CPU (README: the memory
# estimate): training logs an MLflow model (which runs its input example), draws the loss curve and
# samples system metrics, some 450-600 MiB over the imports; sampling and evaluation 40-100 MiB.
TRAINING_OVERHEAD = 512 * 2**20
INFERENCE_OVERHEAD = 128 * 2**20


@dataclasses.dataclass(frozen=True)
class Shapes:
    """The widths of a model, computed from its config as GPT builds them."""

    config: ModelConfig
    vocab_size: int

    def norm_params(self) -> int:
        layernorm_bias = self.config.norm == "layernorm" and self.config.bias
        return self.config.n_embd * (2 if layernorm_bias else 1)

    @property
    def mlp_hidden(self) -> int:
        return mlp_hidden(self.config)

    @property
    def mlp_in_width(self) -> int:
        """c_fc's outputs: SwiGLU's gate and value side by side."""
        return self.mlp_hidden * (2 if self.config.mlp == "swiglu" else 1)

    def block_matrices(self) -> int:
        """The 2-D weights of one block: qkv, attention out, MLP in and out (what Muon updates)."""
        C = self.config.n_embd
        return 3 * C * C + C * C + C * self.mlp_in_width + self.mlp_hidden * C

    def block_params(self) -> int:
        C, biases = self.config.n_embd, self.config.bias
        bias = (3 * C + C + self.mlp_in_width + C) if biases else 0
        return self.block_matrices() + bias + 2 * self.norm_params()

    def params(self) -> int:
        """Every parameter, counted once (a tied head shares the token embedding)."""
        C, V, c = self.config.n_embd, self.vocab_size, self.config
        embeddings = V * C + (c.block_size * C if c.positions == "learned" else 0)
        embeddings += (V * V + 1) * C if c.bigram_embedding else 0
        embeddings += sum(c.ngram_rows) * C
        head = 0 if c.tie_embeddings else C * V
        return embeddings + c.n_layer * self.block_params() + self.norm_params() + head


@dataclasses.dataclass(frozen=True)
class Estimate:
    """Bytes by what holds them; `total` is what is compared with the free memory."""

    parts: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def describe(self) -> str:
        return ", ".join(f"{name} {human(size)}" for name, size in self.parts.items() if size)


def optimizer_buffers(shapes: Shapes, optimizer: str) -> int:
    """Floats of optimizer state: AdamW keeps two per parameter; Muon one per block-matrix entry."""
    if optimizer == "adamw":
        return 2 * shapes.params()
    hidden = shapes.config.n_layer * shapes.block_matrices()
    return hidden + 2 * (shapes.params() - hidden)


def training_activations(shapes: Shapes, batch: int, tokens: int) -> int:
    """Floats autograd keeps for one batch: per layer about 18 widths of the residual stream (norms,
    q/k/v, their normalised and rotated copies, the attention output, the residuals), 3 of the MLP's
    input width, and the attention weights should a kernel form them; then the logits' copies."""
    c, rows = shapes.config, batch * tokens
    per_layer = rows * (18 * c.n_embd + 3 * shapes.mlp_in_width) + 2 * batch * c.n_head * tokens * tokens
    head = rows * (2 * c.n_embd + 4 * shapes.vocab_size)
    return c.n_layer * per_layer + head


def training_estimate(config: ModelConfig, vocab_size: int, batch: int, optimizer: str) -> Estimate:
    shapes = Shapes(config, vocab_size)
    params = shapes.params()
    return Estimate(
        {
            "parameters": FLOAT * params,
            "gradients": FLOAT * params,
            "optimizer state": FLOAT * optimizer_buffers(shapes, optimizer),
            "activations": FLOAT * training_activations(shapes, batch, config.block_size),
            "the stage's own": TRAINING_OVERHEAD,
        }
    )


def forward_peak(shapes: Shapes, batch: int, tokens: int) -> int:
    """Floats of one forward pass without gradients: a few tensors of its widest layers alive at once,
    and the sliding-window mask (bools) of a pass longer than block_size."""
    c = shapes.config
    widest = max(4 * c.n_embd, shapes.mlp_in_width, shapes.vocab_size)
    mask = tokens * tokens // FLOAT if tokens > c.block_size else 0
    return batch * tokens * (3 * widest + 4 * c.n_embd) + batch * c.n_head * tokens * tokens + mask


def inference_estimate(config: ModelConfig, vocab_size: int, batch: int, tokens: int, cached: int) -> Estimate:
    """One pass over `tokens` positions of `batch` rows, with a key/value cache of `cached` positions
    a row (0: none), and the rows' token ids."""
    shapes = Shapes(config, vocab_size)
    return Estimate(
        {
            "parameters": FLOAT * shapes.params(),
            "key/value cache": FLOAT * 2 * config.n_layer * batch * cached * config.n_embd,
            "activations": FLOAT * forward_peak(shapes, batch, tokens),
            "the stage's own": INFERENCE_OVERHEAD,
        }
    )


def sampling_estimate(config: ModelConfig, vocab_size: int, batch: int, prompt: int, new_tokens: int) -> Estimate:
    """`pipeline.sampling.generate` of `batch` rows: the prompt's last receptive field at once (rotary), or at most
    block_size positions (learned), then one token at a time."""
    n_layer, block = config.n_layer, config.block_size
    window = min(prompt, n_layer * (block - 1) + 1 if config.positions == "rotary" else block)
    estimate = inference_estimate(config, vocab_size, batch, window, block)
    return Estimate(estimate.parts | {"tokens": TOKEN * batch * (prompt + new_tokens)})


def free_memory(device: torch.device) -> int:
    """Bytes the device can still allocate: free CUDA memory, or the host's available memory
    (CPU, and MPS, which shares it)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return psutil.virtual_memory().available


def check_fits(estimate: Estimate, device: torch.device, what: str, key: str) -> None:
    """Refuse, before allocating, what needs more memory than `device` has free; `key` is the one to lower."""
    free = free_memory(device)
    if estimate.total > free:
        raise PipelineError(
            f"{what} needs about {human(estimate.total)} ({estimate.describe()}), but {device} has "
            f"{human(free)} free: lower {key}"
        )


def checkpoint_bytes(config: ModelConfig, vocab_size: int, optimizer: str) -> int:
    """The size of a checkpoint: the weights and the optimizer state, and room for the rest."""
    shapes = Shapes(config, vocab_size)
    return FLOAT * (shapes.params() + optimizer_buffers(shapes, optimizer)) + 2**20


def check_training_fits(
    config: ModelConfig, vocab_size: int, batch: int, optimizer: str, device, what: str, keys: tuple[str, str]
) -> None:
    """Refuse a training that cannot fit. `keys`: the batch's key and the model's, named by whichever
    part of the estimate is the larger."""
    estimate = training_estimate(config, vocab_size, batch, optimizer)
    batch_key, model_key = keys
    check_fits(estimate, device, what, batch_key if estimate.parts["activations"] * 2 > estimate.total else model_key)
