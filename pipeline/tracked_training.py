"""One tracked training, shared by the train stage and the sweep's trials.

`tracked_training` starts the MLflow run (or continues one), logs its parameters, data and tags,
wires the per-step logger into the training loop, trains, logs the final metrics and ends the run
FINISHED, FAILED or KILLED by how it stopped. What the callers add stays theirs: the train stage
resumes and writes its outputs, a sweep trial reports to its pruner and keeps its best model.
"""

import contextlib
import dataclasses
from collections.abc import Callable
from pathlib import Path

from pipeline.datasets import log_dataset
from pipeline.device import resolved_precision
from pipeline.model import GPT
from pipeline.records import TrainState
from pipeline.schema import ExampleParams
from pipeline.system_metrics import system_metrics
from pipeline.tracking import Tracker, TrainingLogger, flatten
from pipeline.training import TrainCallbacks, TrainResult, train

TRAINED_WITH = ("data", "model", "train")  # the params sections a trained model depends on


@dataclasses.dataclass
class NewRun:
    """A run to start: its experiment, name and tags, and the prepared data's meta.json to log."""

    experiment: str
    name: str
    tags: dict[str, str]
    data: Path


def trained_with(params: ExampleParams) -> dict:
    """The sections a model depends on, as nested plain values (its fingerprint and its run's params)."""
    return {key: dataclasses.asdict(getattr(params, key)) for key in TRAINED_WITH}


def run_params(params: ExampleParams, model: GPT, device) -> dict:
    """What every training run logs as its parameters, with the precision it resolved to here."""
    sizes = {"num_params": model.num_params(), "vocab_size": model.config.vocab_size}
    return flatten(trained_with(params)) | sizes | resolved_precision(device, params.train.precision)


def start_run(tracker: Tracker, new: NewRun, params: ExampleParams, model: GPT, device) -> str:
    run_id = tracker.start_run(new.experiment, new.name, new.tags, run_params(params, model, device))
    log_dataset(tracker, run_id, new.data)
    return run_id


def summary(result: TrainResult) -> dict[str, float]:
    """The final metrics of a training, logged to its run (and the train stage's train.json)."""
    return {
        "steps": result.steps,
        "final_val_loss": result.evals[-1].val_loss,
        "best_val_loss": result.best_val_loss,
        "train_seconds": result.seconds,
        "tokens_per_sec": result.tokens_per_sec,
    }


def logged_callbacks(logger: TrainingLogger, callbacks: TrainCallbacks) -> TrainCallbacks:
    """The caller's callbacks, each after the logger's; a checkpoint comes after a flush, so that
    MLflow may get ahead of the checkpoint, never behind it."""

    def then(first, second):
        return first if second is None else lambda *args: (first(*args), second(*args))[-1]

    return TrainCallbacks(
        on_step=then(logger.on_step, callbacks.on_step),
        on_eval=then(logger.on_eval, callbacks.on_eval),
        on_checkpoint=then(lambda state, best: logger.flush(), callbacks.on_checkpoint),
        stop=callbacks.stop,
    )


def tracked_training(
    tracker: Tracker,
    run: NewRun | str,
    model: GPT,
    dataset,
    params: ExampleParams,
    device,
    *,
    callbacks: TrainCallbacks | None = None,
    on_start: Callable[[str], None] | None = None,
    on_finish: Callable[[str, TrainResult], None] | None = None,
    resume: TrainState | None = None,
    logged_through: int = 0,
    clean_exits: tuple[type[BaseException], ...] = (),
    record_system: bool = False,
    progress: bool = True,
) -> TrainResult:
    """Train `model` in an MLflow run: a `NewRun` to start, or the id of one to continue.

    `on_start(run_id)` comes once the run exists, before the first step; `on_finish(run_id, result)`
    after the final metrics, while the run is still RUNNING (outputs, artifacts, models). `resume`
    continues a saved run, logging what MLflow lacks of its history past `logged_through`.
    `clean_exits` end the run FINISHED (a pruned trial). `record_system`: the machine's CPU and
    memory use as the run's system metrics.
    """
    run_id = start_run(tracker, run, params, model, device) if isinstance(run, NewRun) else run
    if on_start:
        on_start(run_id)
    with tracker.active(run_id, clean_exits), system_metrics(tracker, run_id, record_system):
        logger = TrainingLogger(tracker, run_id, logged_through)
        for record in resume.history if resume else ():
            logger.on_step(record)
        for record in resume.evals if resume else ():
            logger.on_eval(record)
        try:
            result = train(
                model,
                dataset,
                params=params.train,
                device=device,
                callbacks=logged_callbacks(logger, callbacks or TrainCallbacks()),
                progress=progress,
                resume=resume,
            )
        except BaseException:
            with contextlib.suppress(Exception):  # the curve up to where it stopped, if the store takes it
                logger.flush()
            raise
        logger.flush()
        tracker.log_metrics(run_id, summary(result), result.steps)
        if on_finish:
            on_finish(run_id, result)
    return result
