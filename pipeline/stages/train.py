"""The train stage: reads the prepared data and `<ex>.data`, `<ex>.model`, `<ex>.train`; writes
models/<ex>/ckpt.pt, run.json, history.csv, evals.csv, loss.png and train.json, and keeps
checkpoints/latest.pt and best.pt to resume from; logs the run (params, per-step metrics,
evaluations, checkpoint and files) to MLflow."""

import dataclasses
import hashlib
import json

import pandas as pd

from pipeline.checkpoint import ResumePoint, TrainingCheckpoints, load_resume_point, save_checkpoint
from pipeline.data import Dataset, check_data_fits, load_dataset
from pipeline.datasets import log_dataset
from pipeline.device import pick_device, resolved_precision
from pipeline.errors import Diverged, Stopped
from pipeline.files import check_free, check_writable, write_json, write_text
from pipeline.interrupts import stop_on_signals
from pipeline.locks import writes_example
from pipeline.logged_models import log_model
from pipeline.memory import check_training_fits, checkpoint_bytes
from pipeline.model import GPT, build_model
from pipeline.paths import ExamplePaths
from pipeline.plots import save_loss_curve
from pipeline.run_info import save_run_info
from pipeline.schema import ExampleParams
from pipeline.system_metrics import system_metrics
from pipeline.tracking import Tracker, TrainingLogger, flatten, run_tags
from pipeline.training import TrainCallbacks, TrainResult, train


def _frame(records) -> pd.DataFrame:
    return pd.DataFrame([dataclasses.asdict(r) for r in records])


def start_training_run(params: ExampleParams, paths: ExamplePaths, tracker: Tracker, model: GPT, device) -> str:
    tags = run_tags(paths.example, device)
    run_name = "-".join(filter(None, [paths.example, tags.get("dvc_experiment")]))
    trained_with = {key: dataclasses.asdict(getattr(params, key)) for key in ("data", "model", "train")}
    run_params = flatten(trained_with) | {"num_params": model.num_params(), "vocab_size": model.config.vocab_size}
    run_params |= resolved_precision(device, params.train.precision)
    run_id = tracker.start_run(paths.example, run_name, tags, run_params)
    log_dataset(tracker, run_id, paths.meta)
    save_run_info(paths.run_info, tracker, run_id)
    return run_id


def training_fingerprint(params: ExampleParams, dataset: Dataset) -> str:
    """Everything a run's result depends on: a run is resumed only if all of it is unchanged."""
    trained_with = {key: dataclasses.asdict(getattr(params, key)) for key in ("data", "model", "train")}
    trained_with["tokens"] = dataset.meta.get("sha256") or dataset.meta.get("source")
    trained_with["vocab"] = list(dataset.vocab.chars)
    return hashlib.sha256(json.dumps(trained_with, sort_keys=True).encode()).hexdigest()


def end_dead_runs(tracker: Tracker, example: str) -> None:
    """Runs whose process was killed before it could say so are KILLED; a live one's are left alone."""
    for run_id in tracker.end_dead_runs(example):
        print(f"{example}: its MLflow run {run_id}, left RUNNING by a killed process, is now marked KILLED")


def find_resume_point(paths: ExamplePaths, fingerprint: str) -> ResumePoint | None:
    """The latest checkpoint if it is of an unfinished run with the same parameters and data."""
    point = load_resume_point(paths.latest_checkpoint)
    if point is None:
        return None
    if point.finished:
        why = "its run finished"
    elif point.fingerprint != fingerprint:
        why = "it was made with other data, model or train parameters"
    else:
        return point
    print(f"{paths.example}: starting a new run, not resuming {paths.latest_checkpoint} ({why})")
    return None


def resumed_run(point: ResumePoint, params, paths, tracker, model, device) -> tuple[str, int]:
    """The MLflow run to continue and its last logged step; a new run if this store lacks the old one."""
    step, latest = point.state.step, paths.latest_checkpoint
    if tracker.run_status(point.run_id) is not None:
        save_run_info(paths.run_info, tracker, point.run_id)
        print(f"{paths.example}: resuming at step {step} of {params.train.max_steps} from {latest}")
        return point.run_id, tracker.last_step(point.run_id, "train_loss")
    run_id = start_training_run(params, paths, tracker, model, device)
    print(
        f"{paths.example}: resuming at step {step} from {latest}; its MLflow run {point.run_id} is not in "
        f"{tracker.uri}, so the whole history goes to a new run"
    )
    return run_id, 0


def save_training_outputs(result: TrainResult, paths: ExamplePaths, vocab, run_id: str) -> dict:
    """Checkpoint, per-step history, evaluations, loss curve and a summary; returns the summary."""
    model, steps = result.model, result.steps
    save_checkpoint(paths.checkpoint, model, result.optimizer, vocab, steps, result.best_val_loss, run_id)
    history, evals = _frame(result.history), _frame(result.evals)
    write_text(paths.history, history.to_csv(index=False, float_format="%.6g"))
    write_text(paths.evals, evals.to_csv(index=False, float_format="%.6g"))
    save_loss_curve(paths.loss_plot, history, evals, f"{paths.example}: {result.model.num_params():,} parameters")
    summary = {
        "steps": result.steps,
        "final_val_loss": result.evals[-1].val_loss,
        "best_val_loss": result.best_val_loss,
        "train_seconds": result.seconds,
        "tokens_per_sec": result.tokens_per_sec,
    }
    write_json(paths.train_metrics, summary)
    return summary


# ckpt.pt, latest.pt, best.pt, the run's copy of ckpt.pt, the logged model's weights, their temporary files
CHECKPOINT_COPIES = 6


def prepare_model_folders(paths: ExamplePaths, checkpoint_size: int) -> None:
    """Fail now, not after an hour of training, if the outputs cannot be written: a folder that takes
    no files, too little room on the disk for the checkpoints. (A checkpoint past the file-size limit
    fails at its first save, which keeps the one before: tests/test_files.py.)"""
    for folder in (paths.model_dir, paths.checkpoints):
        check_writable(folder)
    check_free(paths.model_dir, CHECKPOINT_COPIES * checkpoint_size, f"the checkpoints of {paths.model_dir}")
    for leftover in paths.checkpoints.glob(".*.tmp"):  # a process killed halfway through a write left it
        leftover.unlink()


def checkpointed_training(
    model, dataset, params: ExampleParams, paths, *, device, logger, checkpoints, resume, stop, progress
) -> TrainResult:
    """`train()` with MLflow logging and the latest and best checkpoints; a stop or a divergence says where it is."""
    if resume is not None:  # whatever of the saved history the MLflow run does not have yet
        checkpoints.step = resume.state.step
        for record in resume.state.history:
            logger.on_step(record)
        for record in resume.state.evals:
            logger.on_eval(record)
        logger.flush()

    def on_checkpoint(state, best: bool) -> None:
        logger.flush()  # first: MLflow may get ahead of the checkpoint, never behind it
        checkpoints.save(state, best)

    try:
        callbacks = TrainCallbacks(logger.on_step, logger.on_eval, on_checkpoint, stop)
        return train(
            model,
            dataset,
            params=params.train,
            device=device,
            callbacks=callbacks,
            progress=progress,
            resume=resume.state if resume else None,
        )
    except Stopped as e:
        raise Stopped(
            f"{paths.example}: {e} at step {checkpoints.step}, saved in {paths.latest_checkpoint}; "
            "run the same command again to resume",
            e.signum,
        ) from None
    except Diverged as e:
        logger.flush()  # the curve up to where it blew up
        kept = f"; the last good checkpoint, step {checkpoints.step}, stays in {paths.latest_checkpoint}"
        raise Diverged(f"{paths.example}: {e}{kept if checkpoints.step else ''}", e.step) from None


def check_model_fits(params: ExampleParams, vocab_size: int, device, example: str) -> None:
    """Refuse now, before the model is built or an MLflow run starts, what the device cannot hold."""
    keys = (f"{example}.train.batch_size or {example}.model.block_size", f"{example}.model.n_layer or n_embd")
    check_training_fits(
        params.model, vocab_size, params.train.batch_size, params.train.optimizer, device, f"training {example}", keys
    )


@writes_example  # one writer per example: a second one stops at once
def train_example(
    params: ExampleParams,
    paths: ExamplePaths,
    tracker: Tracker | None = None,
    *,
    progress: bool = True,
    fresh: bool = False,
) -> TrainResult:
    """Train the model (or resume an interrupted run) and log the run to MLflow.

    The interrupted run of the same parameters is continued unless `fresh` (README: Interruptions).
    """
    tracker = tracker or Tracker.for_project()
    dataset = load_dataset(paths)
    check_data_fits(dataset, params.model.block_size, paths.example)
    device = pick_device(params.train.device)
    check_model_fits(params, dataset.vocab.size, device, paths.example)
    prepare_model_folders(paths, checkpoint_bytes(params.model, dataset.vocab.size, params.train.optimizer))
    model = build_model(params.model, dataset.vocab.size, params.train.seed)
    fingerprint = training_fingerprint(params, dataset)
    end_dead_runs(tracker, paths.example)
    resume = None if fresh else find_resume_point(paths, fingerprint)
    with stop_on_signals() as stop:
        if resume is None:
            run_id, logged_through = start_training_run(params, paths, tracker, model, device), 0
        else:
            model.load_state_dict(resume.model_state)
            run_id, logged_through = resumed_run(resume, params, paths, tracker, model, device)
        print(f"{paths.example}: {model.num_params():,} parameters on {device}; MLflow run {run_id} in {tracker.uri}")
        checkpoints = TrainingCheckpoints(
            paths.latest_checkpoint, paths.best_checkpoint, model, dataset.vocab, fingerprint, run_id
        )
        with tracker.active(run_id), system_metrics(tracker, run_id, params.train.system_metrics):
            logger = TrainingLogger(tracker, run_id, logged_through)
            result = checkpointed_training(
                model,
                dataset,
                params,
                paths,
                device=device,
                logger=logger,
                checkpoints=checkpoints,
                resume=resume,
                stop=stop,
                progress=progress,
            )
            if (reason := stop()) is not None:  # a signal during the last evaluation
                raise reason
            logger.flush()
            summary = save_training_outputs(result, paths, dataset.vocab, run_id)
            tracker.log_metrics(run_id, summary, result.steps)
            tracker.log_artifacts(run_id, [paths.history, paths.evals, paths.loss_plot, paths.train_metrics])
            tracker.log_artifacts(run_id, [paths.checkpoint], "checkpoint")
            logged = log_model(
                tracker,
                run_id,
                paths.checkpoint,
                sample=params.sample,
                prompts=params.sample.prompts,
                word_list=params.data.kind == "words",
            )
            save_run_info(paths.run_info, tracker, run_id, logged.model_id)
    checkpoints.mark_finished()  # after FINISHED: a kill in between only makes the next run redo the outputs
    print(f"{paths.example}: {result.steps} steps in {result.seconds:.1f} s, val loss {summary['final_val_loss']:.4f}")
    return result
