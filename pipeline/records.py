"""What a training run records: each step, each evaluation, and the state to resume it from.

Plain dataclasses, apart from the loop that makes them, so that the modules that save and log them
(checkpoint.py, tracking.py) and the stages that only read a trained model import nothing of training.
"""

import dataclasses

import torch


@dataclasses.dataclass
class StepRecord:
    step: int
    train_loss: float
    lr: float
    tokens_per_sec: float


@dataclasses.dataclass
class EvalRecord:
    step: int
    train_loss: float
    val_loss: float


@dataclasses.dataclass
class TrainState:
    """How far a run got: with the model's weights, all that is needed to continue it exactly.

    It refers to the live optimizer tensors: save it before the next step changes them.
    """

    step: int
    optimizer: dict
    sampler: torch.Tensor  # state of the generator that draws the training batches
    rng: dict  # the global torch, numpy and Python RNG states; dropout draws from torch's
    history: list[StepRecord]
    evals: list[EvalRecord]
    seconds: float
