"""A sweep's trials: each one run of the pipeline's training loop, tracked in MLflow.

The coordinator creates the study and queues exactly the missing trials before any worker starts;
workers only ever claim queued trials, so any number of them, on any number of machines, run
exactly the requested total.
"""

import dataclasses
import multiprocessing
import os
import tempfile
import time
from pathlib import Path

import optuna
import pydantic
import torch
from optuna.trial import TrialState

from pipeline.checkpoint import save_checkpoint
from pipeline.data import Dataset, check_data_fits, load_dataset
from pipeline.device import pick_device
from pipeline.errors import PipelineError
from pipeline.evaluation import valid_mass
from pipeline.logged_models import log_model
from pipeline.memory import check_training_fits
from pipeline.model import build_model
from pipeline.paths import ExamplePaths
from pipeline.processes import gone_here, this_host
from pipeline.schema import ExampleParams
from pipeline.tracked_training import NewRun, tracked_training
from pipeline.tracking import Tracker, flatten, run_tags
from pipeline.training import TrainCallbacks
from pipeline.tuning.space import TuneParams, apply_values, baseline_values, check_space, suggest
from pipeline.tuning.storage import (
    check_study_settings,
    claim_lock,
    claim_trial,
    heartbeat,
    open_storage,
    open_study,
    quiet_optuna,
    safe_url,
    storage_url,
    study_name,
)

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


@dataclasses.dataclass(frozen=True)
class Sweep:
    """Everything a worker needs to join a sweep: plain data, so it crosses to worker processes."""

    params: ExampleParams
    tune: TuneParams
    paths: ExamplePaths
    store_root: Path  # where the embedded Optuna and MLflow stores live: the workspace, in a DVC experiment
    storage_url: str
    study_name: str
    parent_run_id: str


def trial_tags(sweep: Sweep, trial: optuna.Trial, device: torch.device) -> dict:
    return run_tags(sweep.paths.example, device) | {
        "mlflow.parentRunId": sweep.parent_run_id,
        "optuna.study": sweep.study_name,
        "optuna.trial_number": str(trial.number),
        "optuna.storage": safe_url(sweep.storage_url),
        "baseline": str(bool(trial.user_attrs.get("baseline"))),
    }


def keep_if_best(sweep: Sweep, trial: optuna.Trial, tracker: Tracker, run_id: str, result, value, vocab) -> None:
    """Keep the trial's model, as an MLflow Model of its run, when it beats every finished trial, so
    that the best model can be registered."""
    done = [t.value for t in trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    if done and value >= min(done):
        return
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "ckpt.pt"
        save_checkpoint(path, result.model, result.optimizer, vocab, result.steps, result.best_val_loss, run_id)
        sample, word_list = sweep.params.sample, sweep.params.data.kind == "words"
        logged = log_model(tracker, run_id, path, sample=sample, prompts=sample.prompts, word_list=word_list)
    trial.set_user_attr("model_id", logged.model_id)


def check_trial_fits(sweep: Sweep, trial: optuna.Trial, params: ExampleParams, dataset: Dataset, device, values):
    """A suggested model the device cannot hold fails its trial alone, before its MLflow run starts."""
    example = sweep.paths.example
    keys = (f"{example}.train.batch_size", f"the high ends of {example}.tune.space")
    shown = (f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
    what = f"trial {trial.number} ({', '.join(shown)})"
    check_training_fits(
        params.model, dataset.vocab.size, params.train.batch_size, params.train.optimizer, device, what, keys
    )


def run_trial(sweep: Sweep, trial: optuna.Trial, dataset: Dataset, tracker: Tracker, device) -> float:
    """The objective: train with the trial's values, report every evaluation, return the objective's
    final value (the validation loss, or the invalid mass of a word list)."""
    values = suggest(trial, sweep.tune.space, sweep.params.model.n_embd)
    try:
        params = apply_values(sweep.params, sweep.tune, values)
    except pydantic.ValidationError as e:  # a combination of three or more keys check_space did not try
        raise PipelineError(f"{values} is not a valid configuration: {e}") from None
    check_trial_fits(sweep, trial, params, dataset, device, values)
    model = build_model(params.model, dataset.vocab.size, params.train.seed)
    measure = objective_measure(sweep, model, dataset, device)
    scores = []  # the objective at each evaluation

    def report(record):
        scores.append(measure(record))
        trial.report(scores[-1], record.step)
        if record.step < params.train.max_steps and trial.should_prune():  # a finished trial completes
            raise optuna.TrialPruned(f"{objective_label(sweep)} {scores[-1]:.4f} at step {record.step}")

    def finished(run_id: str, result) -> None:
        tracker.log_metrics(run_id, {f"final_{sweep.tune.objective}": scores[-1]}, result.steps)
        tracker.set_tags(run_id, {"optuna.trial_state": "COMPLETE"})
        trial.set_user_attr("val_loss", result.evals[-1].val_loss)  # what the registry compares models by
        keep_if_best(sweep, trial, tracker, run_id, result, scores[-1], dataset.vocab)

    run = NewRun(
        sweep.paths.example + "-tune", f"trial-{trial.number}", trial_tags(sweep, trial, device), sweep.paths.meta
    )
    try:
        tracked_training(
            tracker,
            run,
            model,
            dataset,
            params,
            device,
            callbacks=TrainCallbacks(on_eval=report),
            on_start=lambda run_id: trial.set_user_attr("mlflow_run_id", run_id),
            on_finish=finished,
            clean_exits=(optuna.TrialPruned,),
            progress=False,
        )
    except BaseException as e:
        if run_id := trial.user_attrs.get("mlflow_run_id"):
            state = "PRUNED" if isinstance(e, optuna.TrialPruned) else "FAIL"
            tracker.set_tags(run_id, {"optuna.trial_state": state, "error": str(e)[:500]})
        raise
    return scores[-1]


def objective_label(sweep: Sweep) -> str:
    return sweep.tune.objective.replace("_", " ")


def objective_measure(sweep: Sweep, model, dataset: Dataset, device):
    """The objective's value at an evaluation: its validation loss, or the word list's invalid mass
    (at temperature 1, fixed so that the evaluate section does not decide what a trial computes)."""
    if sweep.tune.objective == "val_loss":
        return lambda record: record.val_loss

    def invalid_mass(record) -> float:
        model.eval()
        mass = valid_mass(model, dataset.vocab, dataset.words, 1.0, device)
        model.train()
        return 1.0 - mass

    return invalid_mass


def run_one(study: optuna.Study, trial: optuna.Trial, objective, label: str = "val loss") -> TrialState:
    """Run the objective and record its outcome; a diverged trial fails and the sweep goes on."""
    started = time.perf_counter()
    try:
        value, state = objective(trial), TrialState.COMPLETE
    except optuna.TrialPruned as e:
        value, state = None, TrialState.PRUNED
        trial.set_user_attr("pruned_at", str(e))
    except PipelineError as e:  # divergence, or a configuration the data cannot serve
        value, state = None, TrialState.FAIL
        trial.set_user_attr("error", str(e))
    except BaseException:
        study.tell(trial, state=TrialState.FAIL)
        raise
    study.tell(trial, value, state=state)
    outcome = f"{label} {value:.4f}" if value is not None else trial.user_attrs.get("pruned_at", "")
    if state == TrialState.FAIL:
        outcome = trial.user_attrs.get("error", "")
    print(f"trial {trial.number}: {state.name.lower()} in {time.perf_counter() - started:.1f} s {outcome}", flush=True)
    return state


def end_stale_run(tracker: Tracker, trial: optuna.trial.FrozenTrial, why: str = "worker stopped sending heartbeats"):
    """A dead worker's trial was just marked failed: end its MLflow run the same way."""
    if run_id := trial.user_attrs.get("mlflow_run_id"):
        tracker.set_tags(run_id, {"optuna.trial_state": "FAIL", "error": why})
        tracker.end_run(run_id, "FAILED")


def claimed_by_this_process(trial: optuna.Trial) -> None:
    """Name the trial's worker, so that a killed one is known dead at once (see fail_dead_trials)."""
    trial.set_user_attr("worker_pid", os.getpid())
    trial.set_user_attr("worker_host", this_host())  # last: a trial naming its host names its pid too


def worker_is_dead(trial: optuna.trial.FrozenTrial) -> bool:
    """Whether the trial's worker ran on this host and its process is gone; a trial of another host
    is left to the heartbeat grace period."""
    return gone_here(trial.user_attrs.get("worker_host"), trial.user_attrs.get("worker_pid"))


def fail_dead_trials(study: optuna.Study, tracker: Tracker) -> None:
    """Trials whose worker was killed on this host fail now, not a heartbeat grace period later, and
    so do their runs."""
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if worker_is_dead(trial):
            study.tell(trial.number, state=TrialState.FAIL)
            end_stale_run(tracker, trial, "its worker process was killed")


def worker_device(name: str, worker: int) -> torch.device:
    """CUDA devices round-robin over workers (several workers may share one); else as configured."""
    device = pick_device(name)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", worker % torch.cuda.device_count())
    return device


def run_worker(sweep: Sweep, worker: int = 0, workers: int = 1, on_trial=None) -> int:
    """Claim and run queued trials until none are left; returns how many this worker ran."""
    device = worker_device(sweep.params.train.device, worker)
    if device.type == "cpu" and workers > 1:  # share the cores fairly instead of oversubscribing them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
    dataset, tracker = load_dataset(sweep.paths), Tracker.for_project(sweep.store_root)
    storage = open_storage(sweep.storage_url, sweep.tune.heartbeat_seconds, lambda _, t: end_stale_run(tracker, t))
    study = open_study(storage, sweep.tune, sweep.study_name, worker)
    ran = 0
    lock = claim_lock(sweep.storage_url, sweep.study_name)
    while (trial := claim_trial(study, lock)) is not None:
        claimed_by_this_process(trial)
        with heartbeat(storage, trial, sweep.tune.heartbeat_seconds):
            state = run_one(
                study, trial, lambda t: run_trial(sweep, t, dataset, tracker, device), objective_label(sweep)
            )
        ran += 1
        if on_trial:
            on_trial(state)
    return ran


def _worker_process(sweep: Sweep, worker: int, workers: int) -> None:
    quiet_optuna()
    run_worker(sweep, worker, workers)


def queue_missing_trials(study: optuna.Study, params: ExampleParams, tune: TuneParams) -> int:
    """Queue trials up to `total`, the params.yaml configuration first; returns how many were queued."""
    missing = max(0, tune.trials - len(study.get_trials(deepcopy=False)))
    for number in range(missing):
        if number == 0 and not study.get_trials(deepcopy=False):
            study.enqueue_trial(baseline_values(params, tune.space), user_attrs={"baseline": True})
        else:
            study.enqueue_trial({})
    return missing


def parent_run(study: optuna.Study, params: ExampleParams, tune: TuneParams, paths, tracker: Tracker, url: str):
    """The sweep's MLflow run: the one the study names when this store has it, else a new one."""
    run_id = study.user_attrs.get("mlflow_parent_run_id")
    if run_id and tracker.run_status(run_id) is not None:
        return run_id
    tags = run_tags(paths.example, pick_device(params.train.device)) | {
        "optuna.study": study.study_name,
        "optuna.storage": safe_url(url),
    }
    settings = dataclasses.asdict(tune) | {"storage": safe_url(url)}
    run_id = tracker.start_run(paths.example + "-tune", study.study_name, tags, flatten(settings, "tune."))
    study.set_user_attr("mlflow_parent_run_id", run_id)
    return run_id


def run_workers(sweep: Sweep, workers: int, progress: bool) -> None:
    """N worker processes (or this one alone), with a progress bar over the sweep's trials."""
    from tqdm.auto import tqdm

    study = open_study(open_storage(sweep.storage_url, sweep.tune.heartbeat_seconds), sweep.tune, sweep.study_name)
    total = len(study.get_trials(deepcopy=False))
    done = len(study.get_trials(deepcopy=False, states=FINISHED))
    bar = tqdm(total=total, initial=done, desc="trials", unit="trial", disable=None if progress else True)
    if workers == 1:
        run_worker(sweep, on_trial=lambda _: bar.update())
        bar.close()
        return
    context = multiprocessing.get_context("spawn")  # fork would copy the parent's threads and open connections
    processes = [context.Process(target=_worker_process, args=(sweep, i, workers)) for i in range(workers)]
    for process in processes:
        process.start()
    try:
        while any(p.is_alive() for p in processes):
            time.sleep(1)
            bar.n = len(study.get_trials(deepcopy=False, states=FINISHED))
            bar.refresh()
    finally:
        for process in processes:
            process.join()
        bar.close()
    if failed := [p.exitcode for p in processes if p.exitcode != 0]:
        raise PipelineError(f"{len(failed)} of {workers} sweep workers failed (exit codes {failed}); see above")


def prepare_sweep(
    params: ExampleParams, tune: TuneParams, paths: ExamplePaths, tracker: Tracker
) -> tuple[Sweep, optuna.Study, int]:
    """Check everything, create the study and its parent run, queue the missing trials."""
    check_data_fits(load_dataset(paths), params.model.block_size, paths.example)
    check_space(params, tune)
    url = storage_url(tune, tracker.root)
    name = study_name(params, tune, paths.example)
    study = open_study(open_storage(url, tune.heartbeat_seconds), tune, name)
    with claim_lock(url, name):  # another sweep of the same study may be starting too
        fail_dead_trials(study, tracker)
        tracker.end_dead_runs(f"{paths.example}-tune")  # a killed sweep's parent run
        check_study_settings(study, params, tune)
        parent_run_id = parent_run(study, params, tune, paths, tracker, url)
        queued = queue_missing_trials(study, params, tune)
    return Sweep(params, tune, paths, tracker.root, url, name, parent_run_id), study, queued
