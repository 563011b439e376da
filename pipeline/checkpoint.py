"""Saving and loading a trained model with everything needed to use or continue it.

`ckpt.pt` (the train stage's output) and `best.pt` hold the model, its config and vocabulary,
the step, the best validation loss and the optimizer state. `latest.pt` holds the same and a
`resume` section: the sampler and RNG states, history, evaluations, the MLflow run and a
fingerprint of the parameters and data, so that an interrupted run continues exactly.
"""

import dataclasses
import io
from pathlib import Path

import torch
from pydantic import ValidationError

from pipeline.data import Vocabulary
from pipeline.errors import PipelineError
from pipeline.files import load_torch, save_torch, write_bytes
from pipeline.model import CLASSIC_BLOCK, GPT, GPTConfig
from pipeline.records import EvalRecord, StepRecord, TrainState

CHECKPOINT_KEYS = {"model", "model_config", "vocab", "step", "best_val_loss", "optimizer"}
RESUME_KEYS = {"fingerprint", "run_id", "finished", "sampler", "rng", "history", "evals", "seconds"}


@dataclasses.dataclass
class Checkpoint:
    model: GPT
    vocab: Vocabulary
    step: int
    best_val_loss: float
    optimizer_state: dict
    run_id: str | None = None  # the MLflow run that trained it (None in checkpoints from before this was saved)


def checkpoint_state(model: GPT, optimizer_state: dict, vocab: Vocabulary, step: int, best_val_loss: float) -> dict:
    return {
        "model": model.state_dict(),
        "model_config": dataclasses.asdict(model.config),
        "vocab": list(vocab.chars),
        "step": step,
        "best_val_loss": best_val_loss,
        "optimizer": optimizer_state,
    }


def save_checkpoint(
    path: Path, model: GPT, optimizer, vocab: Vocabulary, step: int, best_val_loss: float, run_id: str | None = None
) -> None:
    state = checkpoint_state(model, optimizer.state_dict(), vocab, step, best_val_loss)
    save_torch(path, state | ({"run_id": run_id} if run_id else {}))


def _read(path: Path, device, required: set[str]) -> dict:
    state = load_torch(path, device)
    if not isinstance(state, dict):
        raise PipelineError(f"{path} is not a checkpoint of this project: it holds a {type(state).__name__}")
    if missing := required - set(state):
        raise PipelineError(f"{path} is not a checkpoint of this project: it lacks {', '.join(sorted(missing))}")
    return state


def load_checkpoint(path: Path, device: torch.device | str = "cpu") -> Checkpoint:
    state = _read(path, device, CHECKPOINT_KEYS)
    try:
        model = GPT(GPTConfig(**(CLASSIC_BLOCK | state["model_config"])))
        model.load_state_dict(state["model"])
        vocab = Vocabulary(tuple(state["vocab"]))
    except (ValidationError, RuntimeError, TypeError, PipelineError) as e:
        raise PipelineError(f"{path} does not match its model config: {e}") from None
    if vocab.size != model.config.vocab_size:
        raise PipelineError(f"{path}: vocabulary of {vocab.size} characters, model of {model.config.vocab_size}")
    return Checkpoint(
        model.to(device).eval(), vocab, state["step"], state["best_val_loss"], state["optimizer"], state.get("run_id")
    )


@dataclasses.dataclass
class ResumePoint:
    """The latest checkpoint of a training run: where to continue it from."""

    state: TrainState
    model_state: dict
    fingerprint: str
    run_id: str
    finished: bool


def load_resume_point(path: Path, device: torch.device | str = "cpu") -> ResumePoint | None:
    """The run saved in `path` (a `latest.pt`), or None when there is none."""
    if not Path(path).exists():
        return None
    how_to_fix = "delete it, or train with --fresh"
    try:
        state = _read(path, device, CHECKPOINT_KEYS | {"resume"})
        resume = state["resume"]
        if missing := RESUME_KEYS - set(resume):
            raise PipelineError(f"{path} lacks resume keys {', '.join(sorted(missing))}")
        train_state = TrainState(
            step=state["step"],
            optimizer=state["optimizer"],
            sampler=resume["sampler"],
            rng=resume["rng"],
            history=[StepRecord(**r) for r in resume["history"]],
            evals=[EvalRecord(**r) for r in resume["evals"]],
            seconds=resume["seconds"],
        )
    except (PipelineError, TypeError, AttributeError) as e:
        raise PipelineError(f"cannot resume from {path}: {e}; {how_to_fix}") from None
    return ResumePoint(train_state, state["model"], resume["fingerprint"], resume["run_id"], resume["finished"])


class TrainingCheckpoints:
    """The train stage's `latest.pt` (after every evaluation and on a stop) and `best.pt` (lowest val loss)."""

    def __init__(self, latest: Path, best: Path, model: GPT, vocab: Vocabulary, fingerprint: str, run_id: str = ""):
        """`run_id`: the MLflow run the checkpoints name; set it once the run exists."""
        self.latest, self.best, self.model, self.vocab = Path(latest), Path(best), model, vocab
        self.fingerprint, self.run_id = fingerprint, run_id
        self.step: int | None = None  # of the last checkpoint saved

    def save(self, state: TrainState, best: bool) -> None:
        best_val_loss = min((e.val_loss for e in state.evals), default=float("inf"))
        content = checkpoint_state(self.model, state.optimizer, self.vocab, state.step, best_val_loss)
        content["resume"] = {
            "fingerprint": self.fingerprint,
            "run_id": self.run_id,
            "finished": False,
            "sampler": state.sampler,
            "rng": state.rng,
            "history": [dataclasses.asdict(r) for r in state.history],
            "evals": [dataclasses.asdict(r) for r in state.evals],
            "seconds": state.seconds,
        }
        buffer = io.BytesIO()
        torch.save(content, buffer)
        try:
            write_bytes(self.latest, buffer.getvalue())
            if best:
                write_bytes(self.best, buffer.getvalue())
        except PipelineError as e:
            kept = f"; {self.latest} still holds step {self.step}" if self.step is not None else ""
            raise PipelineError(f"{e}{kept}") from None
        self.step = state.step

    def mark_finished(self) -> None:
        """A finished run is not resumed: the next training starts a new run."""
        content = load_torch(self.latest)
        content["resume"]["finished"] = True
        save_torch(self.latest, content)
