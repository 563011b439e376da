"""The train stage: reads the prepared data and `<ex>.data`, `<ex>.model`, `<ex>.train`; writes
models/<ex>/ckpt.pt, run.json, history.csv, evals.csv, loss.png and train.json, and keeps
checkpoints/latest.pt and best.pt to resume from; logs the run (params, per-step metrics,
evaluations, checkpoint and files) to MLflow."""

import contextlib
import dataclasses
import hashlib
import json

import pandas as pd

from pipeline import tracked_training as tracked
from pipeline.checkpoint import ResumePoint, TrainingCheckpoints, load_resume_point, save_checkpoint
from pipeline.data import Dataset, check_data_fits, load_dataset
from pipeline.device import pick_device
from pipeline.errors import Diverged, Stopped
from pipeline.files import check_free, check_writable, write_json, write_text
from pipeline.interrupts import stop_on_signals
from pipeline.locks import writes_example
from pipeline.logged_models import log_model
from pipeline.memory import check_training_fits, checkpoint_bytes
from pipeline.model import build_model
from pipeline.paths import ExamplePaths
from pipeline.plots import save_loss_curve
from pipeline.run_info import save_run_info
from pipeline.schema import ExampleParams
from pipeline.tracked_training import NewRun
from pipeline.tracking import Tracker, run_tags
from pipeline.training import TrainCallbacks, TrainResult


def _frame(records) -> pd.DataFrame:
    return pd.DataFrame([dataclasses.asdict(r) for r in records])


def new_run(params: ExampleParams, paths: ExamplePaths, device) -> NewRun:
    tags = run_tags(paths.example, device)
    return NewRun(paths.example, "-".join(filter(None, [paths.example, tags.get("dvc_experiment")])), tags, paths.meta)


def training_fingerprint(params: ExampleParams, dataset: Dataset) -> str:
    """Everything a run's result depends on: a run is resumed only if all of it is unchanged."""
    trained_with = tracked.trained_with(params)
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


def resumed_run(point: ResumePoint, params, paths, tracker, device) -> tuple[NewRun | str, int]:
    """The MLflow run to continue and its last logged step; a new run if this store lacks the old one."""
    step, latest = point.state.step, paths.latest_checkpoint
    if tracker.run_status(point.run_id) is not None:
        print(f"{paths.example}: resuming at step {step} of {params.train.max_steps} from {latest}")
        return point.run_id, tracker.last_step(point.run_id, "train_loss")
    print(
        f"{paths.example}: resuming at step {step} from {latest}; its MLflow run {point.run_id} is not in "
        f"{tracker.uri}, so the whole history goes to a new run"
    )
    return new_run(params, paths, device), 0


def save_training_outputs(result: TrainResult, paths: ExamplePaths, vocab, run_id: str) -> None:
    """Checkpoint, per-step history, evaluations, loss curve and a summary."""
    model, steps = result.model, result.steps
    save_checkpoint(paths.checkpoint, model, result.optimizer, vocab, steps, result.best_val_loss, run_id)
    history, evals = _frame(result.history), _frame(result.evals)
    write_text(paths.history, history.to_csv(index=False, float_format="%.6g"))
    write_text(paths.evals, evals.to_csv(index=False, float_format="%.6g"))
    save_loss_curve(paths.loss_plot, history, evals, f"{paths.example}: {result.model.num_params():,} parameters")
    write_json(paths.train_metrics, tracked.summary(result))


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


@contextlib.contextmanager
def explained(paths: ExamplePaths, checkpoints: TrainingCheckpoints):
    """A stop or a divergence, said with the checkpoint it left."""
    try:
        yield
    except Stopped as e:
        raise Stopped(
            f"{paths.example}: {e} at step {checkpoints.step}, saved in {paths.latest_checkpoint}; "
            "run the same command again to resume",
            e.signum,
        ) from None
    except Diverged as e:
        kept = f"; the last good checkpoint, step {checkpoints.step}, stays in {paths.latest_checkpoint}"
        raise Diverged(f"{paths.example}: {e}{kept if checkpoints.step else ''}", e.step) from None


def check_model_fits(params: ExampleParams, vocab_size: int, device, example: str) -> None:
    """Refuse now, before the model is built or an MLflow run starts, what the device cannot hold."""
    tables = [key for key in ("bigram_embedding", "ngram_rows") if getattr(params.model, key)]
    model_keys = ["n_layer", "n_embd", *tables]
    model_key = f"{example}.model.{', '.join(model_keys[:-1])} or {model_keys[-1]}"
    keys = (f"{example}.train.batch_size or {example}.model.block_size", model_key)
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
    checkpoints = TrainingCheckpoints(paths.latest_checkpoint, paths.best_checkpoint, model, dataset.vocab, fingerprint)
    with stop_on_signals() as stop:
        if resume is None:
            run, logged_through = new_run(params, paths, device), 0
        else:
            model.load_state_dict(resume.model_state)
            run, logged_through = resumed_run(resume, params, paths, tracker, device)
            checkpoints.step = resume.state.step

        def started(run_id: str) -> None:
            checkpoints.run_id = run_id
            save_run_info(paths.run_info, tracker, run_id)
            print(
                f"{paths.example}: {model.num_params():,} parameters on {device}; MLflow run {run_id} in {tracker.uri}"
            )

        def finished(run_id: str, result: TrainResult) -> None:
            if (reason := stop()) is not None:  # a signal during the last evaluation
                raise reason
            save_training_outputs(result, paths, dataset.vocab, run_id)
            tracker.log_artifacts(run_id, [paths.history, paths.evals, paths.loss_plot, paths.train_metrics])
            tracker.log_artifacts(run_id, [paths.checkpoint], "checkpoint")
            sample, word_list = params.sample, params.data.kind == "words"
            logged = log_model(
                tracker, run_id, paths.checkpoint, sample=sample, prompts=sample.prompts, word_list=word_list
            )
            save_run_info(paths.run_info, tracker, run_id, logged.model_id)

        with explained(paths, checkpoints):
            result = tracked.tracked_training(
                tracker,
                run,
                model,
                dataset,
                params,
                device,
                callbacks=TrainCallbacks(on_checkpoint=checkpoints.save, stop=stop),
                on_start=started,
                on_finish=finished,
                resume=resume.state if resume else None,
                logged_through=logged_through,
                record_system=params.train.system_metrics,
                progress=progress,
            )
    checkpoints.mark_finished()  # after FINISHED: a kill in between only makes the next run redo the outputs
    print(f"{paths.example}: {result.steps} steps in {result.seconds:.1f} s, val loss {result.evals[-1].val_loss:.4f}")
    return result
