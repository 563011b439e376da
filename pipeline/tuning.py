"""Optuna sweeps: each trial is one run of the pipeline's training loop, tracked in MLflow.

A sweep is an Optuna study in a database (SQLite under the project unless `tune.storage` names
another, such as a PostgreSQL server that workers on several machines share) and an MLflow parent
run with one child run per trial. The coordinator creates the study and queues exactly the
missing trials before any worker starts; workers only ever claim queued trials, so any number of
them, on any number of machines, run exactly the requested total.
"""

import contextlib
import dataclasses
import hashlib
import json
import multiprocessing
import os
import tempfile
import threading
import time
import warnings
from pathlib import Path

import filelock
import optuna
import pydantic
import sqlalchemy
import torch
import yaml
from optuna.trial import TrialState

from pipeline.checkpoint import save_checkpoint
from pipeline.commands import build_model, check_data_fits
from pipeline.config import SPACE_LIMITS, ExampleParams, ExamplePaths, FloatRange, IntRange, SearchSpace, TuneParams
from pipeline.data import Dataset, load_dataset
from pipeline.errors import PipelineError
from pipeline.files import write_json, write_text
from pipeline.interrupts import stop_on_signals
from pipeline.plots import save_study_plots
from pipeline.tracking import Tracker, TrainingLogger, flatten, register_model, run_tags
from pipeline.training import pick_device, train

MODEL_KEYS = {"n_layer", "n_head", "dropout"}
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
# settings that do not change what a trial computes, so changing them continues the same study
VOLATILE_KEYS = {"study", "storage", "trials", "workers", "heartbeat_seconds", "register_as"}
SQLITE_BUSY_SECONDS = 60.0  # how long a worker waits for a SQLite study another process is writing


@dataclasses.dataclass(frozen=True)
class Sweep:
    """Everything a worker needs to join a sweep: plain data, so it crosses to worker processes."""

    params: ExampleParams
    paths: ExamplePaths
    store_root: Path  # where the embedded Optuna and MLflow stores live: the workspace, in a DVC experiment
    storage_url: str
    study_name: str
    parent_run_id: str

    @property
    def tune(self) -> TuneParams:
        return self.params.tune


# ---------------------------------------------------------------- storage and study


def quiet_optuna() -> None:
    """One line per trial is ours to print; Optuna's info lines and experimental-API warnings are noise."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def storage_url(tune: TuneParams, root: Path) -> str:
    return tune.storage or f"sqlite:///{root / 'optuna.db'}"


def safe_url(url: str) -> str:
    try:
        return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except sqlalchemy.exc.ArgumentError:
        return url


def open_storage(url: str, heartbeat_seconds: int, on_stale_trial=None) -> optuna.storages.BaseStorage:
    """The study database, reached within seconds or one error naming it.

    The study and the worker's claims must share this one object: it caches trials.
    """
    try:
        backend = sqlalchemy.engine.make_url(url).get_backend_name()
    except sqlalchemy.exc.ArgumentError:
        raise PipelineError(f"tune.storage '{url}' is not a database URL (e.g. postgresql://user@host/db)") from None
    from pipeline.stores import check_sqlite_writable, problem

    check_sqlite_writable(url, "the Optuna storage")  # else the first write fails deep inside Optuna
    # SQLite: wait for a busy database instead of failing; servers: give up on a silent host fast
    connect_args = {"sqlite": {"timeout": SQLITE_BUSY_SECONDS}, "postgresql": {"connect_timeout": 5}}.get(backend, {})
    try:
        storage = optuna.storages.RDBStorage(
            url,
            engine_kwargs={"connect_args": connect_args},
            heartbeat_interval=heartbeat_seconds,
            grace_period=2 * heartbeat_seconds,
            heartbeat_stale_trial_callback=on_stale_trial,
        )
    except Exception as e:  # driver errors differ by database; all mean the same here
        reason = problem(e)
        if backend == "sqlite" and "database is locked" in reason:
            reason += f": another process has held it for over {SQLITE_BUSY_SECONDS:g} s; wait for it, or stop it"
        raise PipelineError(f"cannot open the Optuna storage {safe_url(url)}: {reason}") from None
    return optuna.storages.get_storage(storage)


def settings_fingerprint(params: ExampleParams) -> str:
    """A hash of everything that decides what a trial computes."""
    settings = {key: dataclasses.asdict(getattr(params, key)) for key in ("data", "model", "train", "tune")}
    settings["tune"] = {k: v for k, v in settings["tune"].items() if k not in VOLATILE_KEYS}
    for key in ("max_steps", "eval_interval"):  # the sweep's budget replaces these
        del settings["train"][key]
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]


def study_name(params: ExampleParams, example: str) -> str:
    return params.tune.study or f"{example}-{settings_fingerprint(params)}"


def make_sampler(params: TuneParams, worker: int) -> optuna.samplers.BaseSampler:
    seed = params.sampler.seed + worker  # the same seed in every worker would draw the same trials
    if params.sampler.kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=params.sampler.startup_trials)


def make_pruner(params: TuneParams) -> optuna.pruners.BasePruner:
    pruner = params.pruner
    min_resource = pruner.min_steps or "auto"
    if pruner.kind == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=pruner.startup_trials, n_warmup_steps=pruner.warmup_steps)
    if pruner.kind == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource, pruner.reduction_factor)
    if pruner.kind == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource, params.max_steps, pruner.reduction_factor)
    return optuna.pruners.NopPruner()


def open_study(storage, tune: TuneParams, name: str, worker: int = 0) -> optuna.Study:
    sampler, pruner = make_sampler(tune, worker), make_pruner(tune)
    return optuna.create_study(
        storage=storage, study_name=name, sampler=sampler, pruner=pruner, direction="minimize", load_if_exists=True
    )


def check_study_settings(study: optuna.Study, params: ExampleParams) -> None:
    """Refuse to continue a study that was made with other settings."""
    fingerprint = settings_fingerprint(params)
    made_with = study.user_attrs.get("settings_fingerprint")
    if made_with is None:
        study.set_user_attr("settings_fingerprint", fingerprint)
    elif made_with != fingerprint:
        raise PipelineError(
            f"study '{study.study_name}' was made with other data/model/train/tune settings; "
            "give tune.study a new name (or leave it null to name the study after its settings)"
        )


# ---------------------------------------------------------------- the search space


def _values(space: IntRange | FloatRange) -> list:
    if space.choices is not None:
        return list(space.choices)
    if isinstance(space, IntRange) and not space.log:
        return list(range(space.low, space.high + 1, space.step))
    return [space.low, space.high]


def head_choices(space: SearchSpace, n_embd: int) -> list[int]:
    """n_head candidates: all of them with head_size, else only the divisors of the fixed n_embd."""
    values = _values(space.n_head)
    if space.head_size is not None:
        return values
    if isinstance(space.n_head, IntRange) and space.n_head.log and space.n_head.choices is None:
        values = list(range(space.n_head.low, space.n_head.high + 1))
    divisors = [h for h in values if n_embd % h == 0]
    if not divisors:
        raise PipelineError(f"tune.space.n_head: no value in {values} divides model.n_embd ({n_embd})")
    return divisors


def suggest(trial: optuna.Trial, space: SearchSpace, n_embd: int) -> dict:
    """One value for every key in the space, drawn by the trial's sampler."""
    values = {}
    for name in SPACE_LIMITS:
        if (param := getattr(space, name)) is None:
            continue
        if name == "n_head" and space.head_size is None:
            values[name] = trial.suggest_categorical(name, head_choices(space, n_embd))
        elif param.choices is not None:
            values[name] = trial.suggest_categorical(name, param.choices)
        elif isinstance(param, IntRange):
            values[name] = trial.suggest_int(name, param.low, param.high, step=param.step, log=param.log)
        else:
            values[name] = trial.suggest_float(name, param.low, param.high, log=param.log)
    return values


def apply_values(params: ExampleParams, values: dict) -> ExampleParams:
    """`params` with the tuned values and the sweep's per-trial budget, validated again."""
    model = {k: v for k, v in values.items() if k in MODEL_KEYS}
    if "head_size" in values:
        model["n_embd"] = values.get("n_head", params.model.n_head) * values["head_size"]
    train = {k: v for k, v in values.items() if k not in MODEL_KEYS | {"head_size"}}
    train |= {"max_steps": params.tune.max_steps, "eval_interval": params.tune.eval_interval}
    if "learning_rate" in values:  # the schedule keeps its shape: min_lr stays the same fraction of it
        train["min_lr"] = params.train.min_lr * values["learning_rate"] / params.train.learning_rate
    return dataclasses.replace(
        params, model=dataclasses.replace(params.model, **model), train=dataclasses.replace(params.train, **train)
    )


def baseline_values(params: ExampleParams) -> dict:
    """The params.yaml configuration, as values of the search space: the sweep's first trial."""
    space = params.tune.space
    current = dataclasses.asdict(params.model) | dataclasses.asdict(params.train)
    current["head_size"] = params.model.n_embd // params.model.n_head
    values = {name: current[name] for name in SPACE_LIMITS if getattr(space, name) is not None}
    for name, value in values.items():
        param = getattr(space, name)
        allowed = head_choices(space, params.model.n_embd) if name == "n_head" else None
        inside = value in (allowed or param.choices or []) or (
            allowed is None and param.choices is None and param.low <= value <= param.high
        )
        if not inside:
            raise PipelineError(
                f"tune.space.{name} does not contain the params.yaml value {value}, which the sweep runs first "
                "as its baseline: widen the range"
            )
    return values


def check_space(params: ExampleParams) -> None:
    """Every corner of the space gives a valid configuration, before any trial starts."""
    space = params.tune.space
    corners = {name: _values(getattr(space, name)) for name in SPACE_LIMITS if getattr(space, name) is not None}
    if "n_head" in corners:
        corners["n_head"] = head_choices(space, params.model.n_embd)
    base = baseline_values(params)
    for name, values in corners.items():
        for value in {min(values), max(values)}:
            try:
                apply_values(params, base | {name: value})
            except pydantic.ValidationError as e:
                reasons = "; ".join(error["msg"].removeprefix("Value error, ") for error in e.errors())
                raise PipelineError(f"tune.space.{name} = {value} gives an invalid configuration: {reasons}") from None


# ---------------------------------------------------------------- trials


def claim_lock(url: str):
    """Server databases lock the claimed row; SQLite ignores that, so its workers take turns by a file lock."""
    database = sqlalchemy.engine.make_url(url)
    if database.get_backend_name() == "sqlite" and database.database:
        return filelock.FileLock(f"{database.database}.claim.lock")
    return contextlib.nullcontext()


def claim_trial(study: optuna.Study, storage: optuna.storages.BaseStorage, lock) -> optuna.Trial | None:
    """Take a queued trial, or None when the queue is empty; never create one."""
    optuna.storages.fail_stale_trials(study)  # trials of dead workers, silent past the grace period
    study_id = storage.get_study_id_from_name(study.study_name)
    with lock:
        for waiting in storage.get_all_trials(study_id, deepcopy=False, states=(TrialState.WAITING,)):
            trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, waiting.number)
            try:
                if storage.set_trial_state_values(trial_id, state=TrialState.RUNNING):  # False: taken already
                    return optuna.Trial(study, trial_id)
            except optuna.exceptions.UpdateFinishedTrialError:
                continue
    return None


@contextlib.contextmanager
def heartbeat(storage: optuna.storages.BaseStorage, trial: optuna.Trial, seconds: int):
    """Tell the storage this trial's worker is alive; a killed worker's trial is then failed by others."""
    trial_id = storage.get_trial_id_from_study_id_trial_number(
        storage.get_study_id_from_name(trial.study.study_name), trial.number
    )
    stop = threading.Event()

    def beat():
        while not stop.wait(seconds):
            storage.record_heartbeat(trial_id)

    storage.record_heartbeat(trial_id)
    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def trial_tags(sweep: Sweep, trial: optuna.Trial, device: torch.device) -> dict:
    return run_tags(sweep.paths.example, device) | {
        "mlflow.parentRunId": sweep.parent_run_id,
        "optuna.study": sweep.study_name,
        "optuna.trial_number": str(trial.number),
        "optuna.storage": safe_url(sweep.storage_url),
        "baseline": str(bool(trial.user_attrs.get("baseline"))),
    }


def keep_if_best(sweep: Sweep, trial: optuna.Trial, tracker: Tracker, run_id: str, result, vocab) -> None:
    """Log the trial's checkpoint when it beats every finished trial, so the best model can be registered."""
    done = [t.value for t in trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    if done and result.evals[-1].val_loss >= min(done):
        return
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "ckpt.pt"
        save_checkpoint(path, result.model, result.optimizer, vocab, result.steps, result.best_val_loss)
        tracker.log_artifacts(run_id, [path], "checkpoint")
    trial.set_user_attr("checkpoint", "checkpoint/ckpt.pt")


def run_trial(sweep: Sweep, trial: optuna.Trial, dataset: Dataset, tracker: Tracker, device) -> float:
    """The objective: train with the trial's values, report every evaluation, return the final val loss."""
    params = apply_values(sweep.params, suggest(trial, sweep.tune.space, sweep.params.model.n_embd))
    model = build_model(params, dataset.vocab.size)
    run_params = flatten({key: dataclasses.asdict(getattr(params, key)) for key in ("data", "model", "train")})
    run_id = tracker.start_run(
        sweep.paths.example + "-tune",
        f"trial-{trial.number}",
        trial_tags(sweep, trial, device),
        run_params | {"num_params": model.num_params(), "vocab_size": dataset.vocab.size},
    )
    trial.set_user_attr("mlflow_run_id", run_id)
    logger = TrainingLogger(tracker, run_id)

    def report(record):
        logger.on_eval(record)
        trial.report(record.val_loss, record.step)
        if trial.should_prune():
            raise optuna.TrialPruned(f"val loss {record.val_loss:.4f} at step {record.step}")

    with tracker.active(run_id, clean_exits=(optuna.TrialPruned,)):
        try:
            result = train(model, dataset, params.train, device, logger.on_step, report, progress=False)
        except BaseException as e:
            state = "PRUNED" if isinstance(e, optuna.TrialPruned) else "FAIL"
            logger.flush()
            tracker.set_tags(run_id, {"optuna.trial_state": state, "error": str(e)[:500]})
            raise
        logger.flush()
        val_loss = result.evals[-1].val_loss
        tracker.log_metrics(run_id, {"final_val_loss": val_loss, "train_seconds": result.seconds}, result.steps)
        tracker.set_tags(run_id, {"optuna.trial_state": "COMPLETE"})
        keep_if_best(sweep, trial, tracker, run_id, result, dataset.vocab)
    return val_loss


def run_one(study: optuna.Study, trial: optuna.Trial, objective) -> TrialState:
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
    outcome = f"val loss {value:.4f}" if value is not None else trial.user_attrs.get("pruned_at", "")
    if state == TrialState.FAIL:
        outcome = trial.user_attrs.get("error", "")
    print(f"trial {trial.number}: {state.name.lower()} in {time.perf_counter() - started:.1f} s {outcome}", flush=True)
    return state


def end_stale_run(tracker: Tracker, trial: optuna.trial.FrozenTrial) -> None:
    """A dead worker's trial was just marked failed: end its MLflow run the same way."""
    if run_id := trial.user_attrs.get("mlflow_run_id"):
        tracker.set_tags(run_id, {"optuna.trial_state": "FAIL", "error": "worker stopped sending heartbeats"})
        tracker.client.set_terminated(run_id, "FAILED")


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
    lock = claim_lock(sweep.storage_url)
    while (trial := claim_trial(study, storage, lock)) is not None:
        with heartbeat(storage, trial, sweep.tune.heartbeat_seconds):
            state = run_one(study, trial, lambda t: run_trial(sweep, t, dataset, tracker, device))
        ran += 1
        if on_trial:
            on_trial(state)
    return ran


def _worker_process(sweep: Sweep, worker: int, workers: int) -> None:
    quiet_optuna()
    run_worker(sweep, worker, workers)


# ---------------------------------------------------------------- the coordinator


def queue_missing_trials(study: optuna.Study, params: ExampleParams, total: int) -> int:
    """Queue trials up to `total`, the params.yaml configuration first; returns how many were queued."""
    missing = max(0, total - len(study.get_trials(deepcopy=False)))
    for number in range(missing):
        if number == 0 and not study.get_trials(deepcopy=False):
            study.enqueue_trial(baseline_values(params), user_attrs={"baseline": True})
        else:
            study.enqueue_trial({})
    return missing


def parent_run(study: optuna.Study, sweep_params: ExampleParams, paths: ExamplePaths, tracker: Tracker, url: str):
    """The sweep's MLflow run: the one the study names when this store has it, else a new one."""
    run_id = study.user_attrs.get("mlflow_parent_run_id")
    with contextlib.suppress(Exception):
        if run_id and tracker.client.get_run(run_id):
            return run_id
    tags = run_tags(paths.example, pick_device(sweep_params.train.device)) | {
        "optuna.study": study.study_name,
        "optuna.storage": safe_url(url),
    }
    tune = dataclasses.asdict(sweep_params.tune)
    tune["storage"] = safe_url(url)
    run_id = tracker.start_run(paths.example + "-tune", study.study_name, tags, flatten(tune, "tune."))
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


def prepare_sweep(params: ExampleParams, paths: ExamplePaths, tracker: Tracker) -> tuple[Sweep, optuna.Study, int]:
    """Check everything, create the study and its parent run, queue the missing trials."""
    check_space(params)
    url = storage_url(params.tune, tracker.root)
    name = study_name(params, paths.example)
    study = open_study(open_storage(url, params.tune.heartbeat_seconds), params.tune, name)
    check_study_settings(study, params)
    parent_run_id = parent_run(study, params, paths, tracker, url)
    queued = queue_missing_trials(study, params, params.tune.trials)
    return Sweep(params, paths, tracker.root, url, name, parent_run_id), study, queued


# ---------------------------------------------------------------- results


@dataclasses.dataclass
class SweepSummary:
    counts: dict[str, int]  # trials complete, pruned, failed, and in all
    best: optuna.trial.FrozenTrial | None
    baseline: optuna.trial.FrozenTrial | None

    def metrics(self) -> dict:
        values = {"best_val_loss": self.best and self.best.value, "best_trial": self.best and self.best.number}
        values["baseline_val_loss"] = self.baseline and self.baseline.value
        return self.counts | {k: v for k, v in values.items() if v is not None}


def summarize(study: optuna.Study) -> SweepSummary:
    trials = study.get_trials(deepcopy=False)
    counts = {f"trials_{s.name.lower()}": sum(t.state == s for t in trials) for s in FINISHED}
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    best = min(complete, key=lambda t: t.value) if complete else None
    baseline = next((t for t in trials if t.user_attrs.get("baseline")), None)
    return SweepSummary(counts | {"trials": len(trials)}, best, baseline)


def best_config(params: ExampleParams, trial: optuna.trial.FrozenTrial, example: str) -> dict:
    """The best trial's values in the shape of params.yaml: {example: {model: {...}, train: {...}}}."""
    tuned, keys = apply_values(params, trial.params), set(trial.params)
    model_keys = keys & MODEL_KEYS | ({"n_embd"} if "head_size" in keys else set())
    train_keys = keys - MODEL_KEYS - {"head_size"}
    config = {}
    if model_keys:
        config["model"] = {k: getattr(tuned.model, k) for k in sorted(model_keys)}
    if train_keys:
        config["train"] = {k: getattr(tuned.train, k) for k in sorted(train_keys)}
    return {example: config}


def apply_command(config: dict) -> str:
    """The `dvc exp run` line that trains the pipeline with these values."""
    settings = flatten(config)
    return "dvc exp run " + " ".join(f"-S {key}={value}" for key, value in settings.items())


def save_sweep_outputs(study: optuna.Study, summary: SweepSummary, params: ExampleParams, paths: ExamplePaths):
    """Best parameters, the trial table, the metrics file and the study's plots; returns the files."""
    paths.tune_dir.mkdir(parents=True, exist_ok=True)
    files = [paths.tune_dir / "trials.csv", paths.tune_metrics]
    write_text(files[0], study.trials_dataframe().to_csv(index=False, float_format="%.6g"))
    write_json(files[1], summary.metrics())
    if summary.best:
        config = best_config(params, summary.best, paths.example)
        header = (
            f"# Best of Optuna study '{study.study_name}': trial {summary.best.number}, "
            f"val loss {summary.best.value:.4f} after {params.tune.max_steps} steps.\n"
            f"# Apply it with:\n#   {apply_command(config)}\n"
        )
        files.append(paths.tune_dir / "best_params.yaml")
        write_text(files[-1], header + yaml.safe_dump(config, sort_keys=False))
    return files + save_study_plots(study, paths.tune_dir)


def log_sweep(tracker: Tracker, sweep: Sweep, summary: SweepSummary, files: list[Path]) -> None:
    run_id = sweep.parent_run_id
    tracker.log_metrics(run_id, summary.metrics(), summary.counts["trials"])
    if summary.best:
        best = {f"best.{k}": v for k, v in summary.best.params.items()}
        tracker.set_tags(run_id, best | {"best.trial": summary.best.number, "best.run_id": best_run_id(summary)})
    tracker.log_artifacts(run_id, files)


def best_run_id(summary: SweepSummary) -> str:
    return summary.best.user_attrs.get("mlflow_run_id", "") if summary.best else ""


def tune_example(params: ExampleParams, paths: ExamplePaths, tracker: Tracker, progress: bool = True) -> SweepSummary:
    """Run (or continue) the example's sweep, then write and log its results."""
    if params.tune is None:
        raise PipelineError(f"params for '{paths.example}' have no tune section")
    quiet_optuna()
    check_data_fits(load_dataset(paths), params.model.block_size, paths.example)
    sweep, study, queued = prepare_sweep(params, paths, tracker)
    print(
        f"{paths.example}: study '{sweep.study_name}' in {safe_url(sweep.storage_url)}: {queued} trial(s) queued "
        f"to reach {params.tune.trials}, {params.tune.workers} worker(s); MLflow parent run {sweep.parent_run_id}"
    )
    with stop_on_signals(at_once=True), tracker.active(sweep.parent_run_id):
        run_workers(sweep, params.tune.workers, progress)
        summary = summarize(study)
        files = save_sweep_outputs(study, summary, params, paths)
        log_sweep(tracker, sweep, summary, files)
        if params.tune.register_as and summary.best and summary.best.user_attrs.get("checkpoint"):
            version, champion = register_model(
                tracker, params.tune.register_as, best_run_id(summary), "checkpoint", summary.best.value
            )
            print(f"registered {params.tune.register_as} version {version}" + (" as @champion" * champion))
    print(sweep_report(summary, sweep, paths))
    return summary


def sweep_report(summary: SweepSummary, sweep: Sweep, paths: ExamplePaths) -> str:
    counts = summary.counts
    lines = [
        f"{counts['trials']} trials: {counts['trials_complete']} complete, {counts['trials_pruned']} pruned, "
        f"{counts['trials_fail']} failed"
    ]
    if summary.baseline and summary.baseline.value is not None:
        lines.append(f"baseline (params.yaml, trial {summary.baseline.number}): val loss {summary.baseline.value:.4f}")
    if summary.best:
        config = best_config(sweep.params, summary.best, paths.example)
        lines += [
            f"best: trial {summary.best.number}, val loss {summary.best.value:.4f}, {summary.best.params}",
            f"apply it: {apply_command(config)}",
        ]
    lines.append(f"inspect: optuna trials --study-name {sweep.study_name} --storage {safe_url(sweep.storage_url)}")
    return "\n".join(lines)
