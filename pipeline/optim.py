"""The optimizers and the learning-rate schedule.

AdamW for every parameter (nanoGPT), or Muon for the blocks' matrices with AdamW for the
embeddings, the head and the gains. Each parameter group carries `lr_scale`, its learning rate
relative to `train.learning_rate`, so one schedule drives both.

`Muon` is the project's own, and not `torch.optim.Muon`, for two reasons measured in
docs/performance.md: torch's runs its Newton–Schulz iterations in bf16 always, which a CPU without
bf16 instructions emulates about 50x slower than float32, and one matrix at a time, dozens of small
kernels a step on a GPU. Here the iterations run in the dtype the device multiplies natively, on
every matrix of one shape at once, in one batched product; on CUDA that update is compiled.
Attention's q, k and v projections, one weight, are orthogonalised as three matrices, as in
modded-nanogpt: 0.020 lower validation loss after Shakespeare's 1000 steps (docs/performance.md).
"""

import math
from collections import defaultdict

import torch

from pipeline.device import newton_schulz_dtype, uses_compile
from pipeline.model import GPT
from pipeline.schema import TrainParams

# Keller Jordan's quintic: the steepest slope at zero that still keeps every singular value near 1
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5
NS_EPS = 1e-7


class Optimizers:
    """Several optimizers stepped as one; their state dicts are kept by name."""

    def __init__(self, **optimizers: torch.optim.Optimizer):
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict]:
        return [group for optimizer in self.optimizers.values() for group in optimizer.param_groups]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers.values():
            optimizer.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for optimizer in self.optimizers.values():
            optimizer.step()

    def state_dict(self) -> dict:
        return {name: optimizer.state_dict() for name, optimizer in self.optimizers.items()}

    def load_state_dict(self, state: dict) -> None:
        if set(state) != set(self.optimizers):
            raise ValueError(f"optimizer state for {sorted(state)}, not {sorted(self.optimizers)}")
        for name, optimizer in self.optimizers.items():
            optimizer.load_state_dict(state[name])


def orthogonalize(stack: torch.Tensor, coefficients=NS_COEFFICIENTS, steps: int = NS_STEPS, eps: float = NS_EPS):
    """Newton–Schulz's approximation of U·Vᵀ for each matrix U·S·Vᵀ of `stack` (N, m, n), m ≤ n,
    computed in the stack's dtype: three batched products an iteration, whatever N is."""
    a, b, c = coefficients
    x = stack / stack.norm(dim=(1, 2), keepdim=True).clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x


def lr_ratio(shape: torch.Size, adjust_lr_fn: str | None) -> float:
    """`torch.optim.Muon`'s scaling of the learning rate for a matrix of `shape`."""
    rows, cols = shape
    if adjust_lr_fn == "match_rms_adamw":  # Moonshot's: the update's RMS at AdamW's
        return 0.2 * math.sqrt(max(rows, cols))
    return math.sqrt(max(1.0, rows / cols))


def oriented(matrix: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`matrix`, transposed if `like` has more rows than columns: a stack holds every matrix wide,
    and the same transposition brings its update back to the parameter's shape."""
    return matrix.mT if like.size(0) > like.size(1) else matrix


def muon_stack_step(params, grads, buffers, lr, momentum, group: dict, dtype: torch.dtype) -> None:
    """One Muon step of matrices that share a shape up to transposition.

    `lr` and `momentum` are floats in eager mode, or 0-d tensors for a compiled step, which then
    takes each new value without recompiling.
    """
    for buffer, grad in zip(buffers, grads):
        buffer.lerp_(grad, 1 - momentum)
    updates = [grad.lerp(buffer, momentum) if group["nesterov"] else buffer for grad, buffer in zip(grads, buffers)]
    stack = torch.stack([oriented(u, u) for u in updates]).to(dtype)
    orthogonal = orthogonalize(stack, group["ns_coefficients"], group["ns_steps"], group["eps"])
    for param, update in zip(params, orthogonal):
        if group["weight_decay"]:
            param.mul_(1 - lr * group["weight_decay"])
        step_size = lr * lr_ratio(param.shape, group["adjust_lr_fn"])
        param.sub_(oriented(update, param).to(param.dtype) * step_size)


class Muon(torch.optim.Optimizer):
    """Muon (momentum, then Newton–Schulz orthogonalisation) for 2-D matrices.

    The update of `torch.optim.Muon`, with its hyperparameters and its state (a `momentum_buffer`
    per matrix), so each reads the other's state dict. `dtype`: the Newton–Schulz iterations'.
    `compile`: compile the step of each stack (on CUDA, where its many small kernels cost most).
    `row_blocks`: matrices that stack several along their rows, by how many (attention's q, k and
    v projections: 3); each block is orthogonalised, and its step sized, as a matrix of its own.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
        eps: float = NS_EPS,
        ns_steps: int = NS_STEPS,
        adjust_lr_fn: str | None = None,
        *,
        dtype: torch.dtype = torch.float32,
        compile: bool = False,
        row_blocks: dict[torch.Tensor, int] | None = None,
    ):
        defaults = dict(
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
            nesterov=nesterov,
            ns_coefficients=ns_coefficients,
            eps=eps,
            ns_steps=ns_steps,
            adjust_lr_fn=adjust_lr_fn,
        )
        super().__init__(params, defaults)
        if any(p.dim() != 2 for group in self.param_groups for p in group["params"]):
            raise ValueError("Muon takes 2-D matrices only")
        self.dtype = dtype
        self.row_blocks = row_blocks or {}
        self.compiled = compile
        self.stack_step = torch.compile(muon_stack_step, dynamic=False) if compile else muon_stack_step
        self.scalars: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def scalar_tensors(self, device: torch.device, lr: float, momentum: float):
        """The 0-d tensors that carry `lr` and `momentum` to the step, refilled in place."""
        if device not in self.scalars:
            self.scalars[device] = (torch.zeros((), device=device), torch.zeros((), device=device))
        lr_tensor, momentum_tensor = self.scalars[device]
        lr_tensor.fill_(lr)
        momentum_tensor.fill_(momentum)
        return lr_tensor, momentum_tensor

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            stacks = defaultdict(list)  # (matrix, its gradient, its momentum), by shape up to transposition
            for p in group["params"]:
                if p.grad is not None:
                    for matrix in self.matrices(p):
                        stacks[(tuple(sorted(matrix[0].shape)), p.device)].append(matrix)
            for (_, device), matrices in stacks.items():
                lr, momentum = group["lr"], group["momentum"]
                if self.compiled:  # each new rate a tensor's value, not a constant to recompile for
                    lr, momentum = self.scalar_tensors(device, lr, momentum)
                params, grads, buffers = (list(views) for views in zip(*matrices))
                self.stack_step(params, grads, buffers, lr, momentum, group, self.dtype)
        return loss

    def matrices(self, param: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(weights, gradient, momentum) of each matrix `param` holds: views, updated in place."""
        blocks = self.row_blocks.get(param, 1)
        tensors = (param, param.grad, self.momentum_buffer(param))
        return list(zip(*(t.view(blocks, -1, t.size(1)).unbind(0) for t in tensors)))

    def momentum_buffer(self, param: torch.Tensor) -> torch.Tensor:
        state = self.state[param]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(param)
        return state["momentum_buffer"]


def adamw(groups: list[dict], params: TrainParams, device: torch.device) -> torch.optim.AdamW:
    for group in groups:
        group.setdefault("lr_scale", 1.0)
    betas = (params.beta1, params.beta2)
    return torch.optim.AdamW(groups, lr=params.learning_rate, betas=betas, fused=device.type == "cuda")


def lookups(model: GPT, params: TrainParams, device: torch.device) -> torch.optim.Optimizer:
    """Adam, without weight decay, for the bigram and n-gram tables, each kind at its own rate. A step
    reads a few thousand of their rows: on the CPU their gradients are sparse and SparseAdam updates
    those rows alone, where a dense AdamW step over a 4.2 M-number trigram table made Shakespeare's
    step 35 % slower (docs/performance.md); on a GPU (or compiled) they stay dense, for one fused update."""
    sparse = device.type == "cpu" and not uses_compile(device, params.compile)
    for table in model.lookup_tables():
        table.sparse = sparse
    kinds = [
        ([model.transformer.bte] if model.config.bigram_embedding else [], params.bigram_lr_scale),
        (list(model.transformer.nte) if model.config.ngram_rows else [], params.ngram_lr_scale),
    ]
    groups = [
        {"params": [table.weight for table in tables], "lr_scale": scale, "lr": params.learning_rate * scale}
        for tables, scale in kinds
        if tables
    ]
    betas = (params.beta1, params.beta2)
    if sparse:
        return torch.optim.SparseAdam(groups, betas=betas)
    return torch.optim.Adam(groups, betas=betas, fused=device.type == "cuda")


def make_optimizer(model: GPT, params: TrainParams, device: torch.device) -> torch.optim.Optimizer | Optimizers:
    """AdamW, or Muon and AdamW, for the dense parameters, and `lookups` for the tables if there are any."""
    tables = {id(table.weight) for table in model.lookup_tables()}
    hidden = {id(p) for p in model.hidden_matrices()} if params.optimizer == "muon" else set()
    rest = [
        {"params": [p for p in group["params"] if id(p) not in hidden | tables], "weight_decay": group["weight_decay"]}
        for group in model.optimizer_groups(params.weight_decay)
    ]
    optimizers = {"lookups": lookups(model, params, device)} if tables else {}
    if params.optimizer == "adamw":
        return Optimizers(adamw=adamw(rest, params, device), **optimizers) if tables else adamw(rest, params, device)
    muon = Muon(
        [{"params": model.hidden_matrices(), "lr_scale": params.muon_lr / params.learning_rate}],
        lr=params.muon_lr,
        weight_decay=params.weight_decay,
        momentum=params.muon_momentum,
        adjust_lr_fn="match_rms_adamw",  # Muon's update at AdamW's size per element
        dtype=newton_schulz_dtype(device, params.precision),
        compile=device.type == "cuda" and uses_compile(device, params.compile),
        row_blocks=model.stacked_matrices(),
    )
    return Optimizers(adamw=adamw(rest, params, device), muon=muon, **optimizers)


def learning_rate_at(step: int, params: TrainParams) -> float:
    """Linear warm-up to `learning_rate`, then down to `min_lr` at `max_steps`: a cosine over the
    whole run, or (warmup-stable-decay) flat until the last `cooldown_fraction` and linear after."""
    if step < params.warmup_steps:
        return params.learning_rate * (step + 1) / params.warmup_steps
    peak, low = params.learning_rate, params.min_lr
    if params.schedule == "wsd":
        cooldown = max(1, round(params.cooldown_fraction * params.max_steps))
        progress = min(1.0, max(0.0, (step - (params.max_steps - cooldown)) / cooldown))
        return peak - progress * (peak - low)
    decay_steps = max(1, params.max_steps - params.warmup_steps)
    progress = min(1.0, (step - params.warmup_steps) / decay_steps)
    return low + 0.5 * (1 + math.cos(math.pi * progress)) * (peak - low)


def set_learning_rate(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"]
