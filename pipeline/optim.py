"""The optimizer and its learning-rate schedule.

AdamW for every parameter (nanoGPT), or Muon for the blocks' matrices with AdamW for the
embeddings, the head and the gains. Each parameter group carries `lr_scale`, its learning rate
relative to `train.learning_rate`, so one schedule drives both.
"""

import math

import torch

from pipeline.model import GPT
from pipeline.schema import TrainParams


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


def adamw(groups: list[dict], params: TrainParams, device: torch.device) -> torch.optim.AdamW:
    for group in groups:
        group.setdefault("lr_scale", 1.0)
    betas = (params.beta1, params.beta2)
    return torch.optim.AdamW(groups, lr=params.learning_rate, betas=betas, fused=device.type == "cuda")


def make_optimizer(model: GPT, params: TrainParams, device: torch.device) -> torch.optim.Optimizer | Optimizers:
    if params.optimizer == "adamw":
        return adamw(model.optimizer_groups(params.weight_decay), params, device)
    hidden = {id(p) for p in model.hidden_matrices()}
    rest = [
        {"params": [p for p in group["params"] if id(p) not in hidden], "weight_decay": group["weight_decay"]}
        for group in model.optimizer_groups(params.weight_decay)
    ]
    muon = torch.optim.Muon(
        [{"params": model.hidden_matrices(), "lr_scale": params.muon_lr / params.learning_rate}],
        lr=params.muon_lr,
        weight_decay=params.weight_decay,
        momentum=params.muon_momentum,
        adjust_lr_fn="match_rms_adamw",  # Muon's update at AdamW's size per element
    )
    return Optimizers(adamw=adamw(rest, params, device), muon=muon)


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
