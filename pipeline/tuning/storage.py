"""Where a sweep lives: the Optuna storage and study, and how workers claim its queued trials."""

import contextlib
import dataclasses
import hashlib
import json
import threading
import warnings
from pathlib import Path

import filelock
import optuna
import sqlalchemy
from optuna.trial import TrialState

from pipeline.errors import PipelineError
from pipeline.schema import ExampleParams
from pipeline.stores import check_sqlite_writable, problem
from pipeline.tracked_training import trained_with
from pipeline.tuning.space import TuneParams

# settings that do not change what a trial computes, so changing them continues the same study
VOLATILE_KEYS = {"study", "storage", "trials", "workers", "heartbeat_seconds", "register_as"}
SQLITE_BUSY_SECONDS = 60.0  # how long a worker waits for a SQLite study another process is writing
# The code that decides what a trial computes, beside its settings: after an edit to it, DVC re-runs
# the sweep, which then starts a new study instead of reporting the trials the old code ran.
PACKAGE = Path(__file__).resolve().parents[1]
TRIAL_CODE = (
    *("model.py", "data.py", "optim.py", "training.py", "device.py", "evaluation.py"),
    *("tuning/space.py", "tuning/sweep.py"),  # a trial's values from its suggestions, and its objective
)


def quiet_optuna() -> None:
    """One line per trial is ours to print; Optuna's info lines and experimental-API warnings are noise."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    # ask-and-tell workers record their own heartbeats (heartbeat() below)
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")


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


def code_digest(package: Path = PACKAGE) -> str:
    """A hash of the files of `package` that decide what a trial computes (TRIAL_CODE)."""
    digest = hashlib.sha256()
    for name in TRIAL_CODE:
        digest.update((package / name).read_bytes())
    return digest.hexdigest()[:8]


def settings_fingerprint(params: ExampleParams, tune: TuneParams) -> str:
    """A hash of everything that decides what a trial computes: its settings and its code."""
    settings = trained_with(params)
    settings["code"] = code_digest()
    settings["tune"] = {k: v for k, v in dataclasses.asdict(tune).items() if k not in VOLATILE_KEYS}
    for key in ("max_steps", "eval_interval"):  # the sweep's budget replaces these
        del settings["train"][key]
    if tune.objective == "val_loss":  # the key came later: studies made before it keep their names
        del settings["tune"]["objective"]
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]


def study_name(params: ExampleParams, tune: TuneParams, example: str) -> str:
    return tune.study or f"{example}-{settings_fingerprint(params, tune)}"


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
    study = optuna.create_study(
        storage=storage, study_name=name, sampler=sampler, pruner=pruner, direction="minimize", load_if_exists=True
    )
    if study.metric_names != [tune.objective]:  # optuna-dashboard and the plots name the objective by it
        study.set_metric_names([tune.objective])
    return study


def check_study_settings(study: optuna.Study, params: ExampleParams, tune: TuneParams) -> None:
    """Refuse to continue a study that was made with other settings."""
    fingerprint = settings_fingerprint(params, tune)
    made_with = study.user_attrs.get("settings_fingerprint")
    if made_with is None:
        study.set_user_attr("settings_fingerprint", fingerprint)
    elif made_with != fingerprint:
        raise PipelineError(
            f"study '{study.study_name}' was made with other data/model/train/tune settings or training code; "
            "give tune.study a new name (or leave it null to name the study after its settings)"
        )


class AdvisoryLock:
    """A PostgreSQL advisory lock: one holder at a time among all machines that share the database."""

    def __init__(self, url: str, name: str):
        self.engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
        self.key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)
        self.connection = None

    def __enter__(self):
        self.connection = self.engine.connect()
        self.connection.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": self.key})

    def __exit__(self, *exc):
        self.connection.close()  # ending the session releases the lock
        self.connection = None


def claim_lock(url: str, study: str):
    """Workers take queued trials in turn, so that `study.ask()` always finds one and never creates one.

    SQLite: a file lock beside the database. PostgreSQL: an advisory lock, which spans machines.
    """
    database = sqlalchemy.engine.make_url(url)
    backend = database.get_backend_name()
    if backend == "sqlite":
        return filelock.FileLock(f"{database.database}.claim.lock") if database.database else threading.Lock()
    if backend == "postgresql":
        return AdvisoryLock(url, f"optuna-claim:{study}")
    raise PipelineError(f"tune.storage {safe_url(url)}: sweeps run on SQLite or PostgreSQL, not {backend}")


def claim_trial(study: optuna.Study, lock) -> optuna.Trial | None:
    """Take a queued trial, or None when the queue is empty; never create one.

    Not `study.optimize` with `MaxTrialsCallback`: concurrent workers overshoot its count, queued trials do not.
    """
    optuna.storages.fail_stale_trials(study)  # trials of dead workers, silent past the grace period
    with lock:
        if not study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            return None
        return study.ask()  # pops the oldest queued trial; under the lock one is always there


@contextlib.contextmanager
def heartbeat(storage: optuna.storages.BaseStorage, trial: optuna.Trial, seconds: int):
    """Tell the storage this trial's worker is alive; a killed worker's trial is then failed by others.

    Optuna beats the heart only inside `study.optimize`; an ask-and-tell worker records its own.
    """
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
