"""Saving and loading a trained model with everything needed to use or continue it."""

import dataclasses
from pathlib import Path

import torch
from pydantic import ValidationError

from pipeline.data import Vocabulary
from pipeline.errors import PipelineError
from pipeline.files import load_torch, save_torch
from pipeline.model import GPT, GPTConfig


@dataclasses.dataclass
class Checkpoint:
    model: GPT
    vocab: Vocabulary
    step: int
    best_val_loss: float
    optimizer_state: dict


def save_checkpoint(path: Path, model: GPT, optimizer, vocab: Vocabulary, step: int, best_val_loss: float) -> None:
    save_torch(
        path,
        {
            "model": model.state_dict(),
            "model_config": dataclasses.asdict(model.config),
            "vocab": list(vocab.chars),
            "step": step,
            "best_val_loss": best_val_loss,
            "optimizer": optimizer.state_dict(),
        },
    )


def load_checkpoint(path: Path, device: torch.device | str = "cpu") -> Checkpoint:
    state = load_torch(path, device)
    missing = {"model", "model_config", "vocab", "step", "best_val_loss", "optimizer"} - set(state)
    if missing:
        raise PipelineError(f"{path} is not a checkpoint of this project: it lacks {', '.join(sorted(missing))}")
    try:
        model = GPT(GPTConfig(**state["model_config"]))
        model.load_state_dict(state["model"])
    except (ValidationError, RuntimeError, TypeError) as e:
        raise PipelineError(f"{path} does not match its model config: {e}") from None
    vocab = Vocabulary(tuple(state["vocab"]))
    if vocab.size != model.config.vocab_size:
        raise PipelineError(f"{path}: vocabulary of {vocab.size} characters, model of {model.config.vocab_size}")
    return Checkpoint(model.to(device).eval(), vocab, state["step"], state["best_val_loss"], state["optimizer"])
