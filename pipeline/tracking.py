"""MLflow tracking: one run per trained model, which evaluate and sample log into as well.

The store is `sqlite:///<project root>/mlflow.db` unless `MLFLOW_TRACKING_URI` names another
(a shared `mlflow server`, say). The project root is `DVC_ROOT` when DVC set it, so that
`dvc exp run --temp` and queued experiments, which run in a temporary copy, log into the
workspace's store and artifact folder rather than into the copy.
"""

import contextlib
import dataclasses
import hashlib
import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import filelock
import mlflow
import torch
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.tracking._tracking_service import utils as tracking_utils
from mlflow.utils.validation import MAX_TAG_VAL_LENGTH

from pipeline.errors import PipelineError
from pipeline.processes import gone_here, this_host
from pipeline.records import EvalRecord, StepRecord
from pipeline.stores import (
    check_sqlite_opens,
    check_sqlite_writable,
    check_store_room,
    mlflow_store_problem,
    problem,
    quiet_store_errors,
    retries_in_one_line,
    sqlite_file,
    store_write_fault,
)

PID_TAG, HOST_TAG = "process.pid", "process.host"  # the process that last marked the run RUNNING
BATCH_LIMIT = 1000  # MLflow's most metrics in one log_batch call
SERVER_TIMEOUT = 5  # seconds to wait for a tracking server to answer before giving up
SERVER_START_WAIT = SERVER_TIMEOUT  # seconds to ask again a server that refuses connections: it may be starting


def project_root() -> Path:
    return Path(os.environ.get("DVC_ROOT") or Path.cwd()).resolve()


def tracking_uri(root: Path) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{root / 'mlflow.db'}"


def flatten(tree: dict, prefix: str = "") -> dict:
    """{'model': {'n_layer': 4}} -> {'model.n_layer': 4}"""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat |= flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def git_commit() -> str:
    """The commit the code came from; in a DVC experiment, the experiment's baseline."""
    if baseline := os.environ.get("DVC_EXP_BASELINE_REV"):
        return baseline
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True)
    except OSError:  # no git here
        return "unknown"
    return result.stdout.strip() or "unknown"


def run_tags(example: str, device: torch.device) -> dict[str, str]:
    commit = git_commit()
    tags = {
        "example": example,
        "git_commit": commit,
        "mlflow.source.git.commit": commit,
        "device": str(device),
        "torch_version": torch.__version__,
    }
    if exp_name := os.environ.get("DVC_EXP_NAME"):
        tags["dvc_experiment"] = exp_name
    return tags


def check_server(uri: str) -> None:
    """Fail within seconds if an HTTP tracking server does not answer.

    MLflow's own client retries for minutes (MLFLOW_HTTP_REQUEST_MAX_RETRIES), which is right for
    a server that drops a request now and then, not for one that is not there at all. A refused
    connection is asked again for SERVER_START_WAIT seconds, saying so on one line: a server that
    is starting refuses until it listens. A name that does not resolve or a timeout is not retried.
    """
    if not uri.startswith(("http://", "https://")):
        return
    deadline, said = time.monotonic() + SERVER_START_WAIT, False
    while (reason := server_fault(uri)) is not None:
        if not isinstance(reason, ConnectionRefusedError) or time.monotonic() > deadline:
            raise PipelineError(
                f"MLflow tracking server {uri} is unreachable ({reason}): start it, or unset MLFLOW_TRACKING_URI "
                "to log into the project's sqlite:///mlflow.db"
            )
        if not said:
            print(f"{uri} refuses connections: retrying for up to {SERVER_START_WAIT} s, as for a starting server")
            said = True
        time.sleep(0.5)


def server_fault(uri: str) -> BaseException | None:
    """Why the server at `uri` does not answer its health check, or None when it answers at all."""
    try:
        urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=SERVER_TIMEOUT).close()
    except urllib.error.HTTPError:
        return None  # it answered, if only to say no: the server is there
    except (urllib.error.URLError, OSError) as e:
        return getattr(e, "reason", e)
    return None


def _lock(name: str) -> filelock.FileLock:
    """An exclusive lock between processes, named after `name`, for a `with` block."""
    digest = hashlib.sha256(name.encode()).hexdigest()[:16]
    return filelock.FileLock(Path(tempfile.gettempdir()) / f"char-gpt-{digest}.lock", thread_local=False)


def _metrics(values: dict[str, float], step: int) -> list[Metric]:
    now = int(time.time() * 1000)
    return [Metric(key, float(value), now, step) for key, value in values.items()]


def process_is_dead(run) -> bool:
    """Whether the process that last marked `run` RUNNING is proven gone: it ran on this host and its
    pid is not running. A run of another host, or without the tags, is never taken for dead."""
    tags = run.data.tags
    return gone_here(tags.get(HOST_TAG), tags.get(PID_TAG))


class StoreClient:
    """An MlflowClient whose calls turn a write that a full disk or a file-size limit stopped into one
    PipelineError naming the store; every other call and error is the client's own."""

    def __init__(self, client: MlflowClient, uri: str):
        self._client, self._uri = client, uri

    def __getattr__(self, name: str):
        attribute = getattr(self._client, name)
        if not callable(attribute):
            return attribute

        def call(*args, **kwargs):
            try:
                return attribute(*args, **kwargs)
            except Exception as e:
                if (line := store_write_fault(self._uri, e)) is None:
                    raise
                raise PipelineError(line) from None

        return call


def open_client(uri: str, fresh: bool) -> MlflowClient:
    """The client of `uri`; a `fresh` store file, which could not be filled (a full disk), is removed."""
    try:
        with retries_in_one_line(uri):
            return MlflowClient(tracking_uri=uri)
    except Exception as e:  # not a database, an unknown scheme, ...: MLflow's types differ by store
        if fresh and (path := sqlite_file(uri)):
            for leftover in (path, path.with_name(path.name + "-journal")):
                leftover.unlink(missing_ok=True)
        raise PipelineError(store_write_fault(uri, e) or mlflow_store_problem(uri, e)) from None


@dataclasses.dataclass
class Tracker:
    """An MLflow client bound to one store, and where local artifacts of that store go."""

    client: StoreClient  # an MlflowClient, its full-disk errors one line each
    uri: str
    root: Path

    @classmethod
    def for_project(cls, root: Path | None = None, writable: bool = True) -> "Tracker":
        """`writable`: fail now if the store cannot be written (a read-only SQLite file), not at the first write."""
        root = root or project_root()
        uri = tracking_uri(root)
        check_server(uri)
        quiet_store_errors()  # a failed write becomes one line (StoreClient), not MLflow's logged traceback
        # A new client creates a new store's tables, unguarded: two processes at once would collide
        with _lock(uri) if uri.startswith("sqlite:") else contextlib.nullcontext():
            check_sqlite_opens(uri, "the MLflow store")
            if writable:
                check_sqlite_writable(uri, "the MLflow store")
                check_store_room(uri, "the MLflow store")
            client = open_client(uri, fresh=(path := sqlite_file(uri)) is not None and not path.exists())
        return cls(StoreClient(client, uri), uri, root)

    def experiment_id(self, name: str) -> str:
        if experiment := self.client.get_experiment_by_name(name):
            return experiment.experiment_id
        local = self.uri.startswith(("sqlite:", "file:")) or "://" not in self.uri
        location = (self.root / "mlartifacts" / name).as_uri() if local else None
        try:
            return self.client.create_experiment(name, artifact_location=location)
        except MlflowException as e:  # another process created it a moment ago, or the store refuses writes
            if experiment := self.client.get_experiment_by_name(name):
                return experiment.experiment_id
            raise PipelineError(f"cannot create MLflow experiment '{name}' in {self.uri}: {problem(e)}") from None

    def start_run(self, experiment: str, run_name: str, tags: dict[str, str], params: dict) -> str:
        try:
            owner = {PID_TAG: str(os.getpid()), HOST_TAG: this_host()}  # a new run is RUNNING: say whose
            run = self.client.create_run(self.experiment_id(experiment), tags=tags | owner, run_name=run_name)
        except MlflowException as e:
            raise PipelineError(f"cannot start an MLflow run in {self.uri}: {problem(e)}") from None
        params = [Param(k, str(v)) for k, v in params.items()]
        for i in range(0, len(params), 100):
            self.client.log_batch(run.info.run_id, params=params[i : i + 100])
        return run.info.run_id

    @contextlib.contextmanager
    def active(self, run_id: str, clean_exits: tuple[type[BaseException], ...] = ()):
        """Mark the run RUNNING while the block runs, then FINISHED, FAILED or KILLED (SIGINT, SIGTERM).

        `clean_exits` are exceptions that end the run as FINISHED (a pruned sweep trial, say).
        """
        self.client.update_run(run_id, status="RUNNING")
        self.set_tags(run_id, {PID_TAG: os.getpid(), HOST_TAG: this_host()})  # who to ask whether it still runs
        try:
            yield run_id
        except clean_exits:
            self.client.set_terminated(run_id, "FINISHED")
            raise
        except KeyboardInterrupt:
            self._terminate(run_id, "KILLED")
            raise
        except BaseException:
            self._terminate(run_id, "FAILED")
            raise
        self.client.set_terminated(run_id, "FINISHED")

    def _terminate(self, run_id: str, status: str) -> None:
        """Set the status of a run that is stopping anyway: a failure here must not hide the first."""
        try:
            self.client.set_terminated(run_id, status)
        except Exception as e:
            print(
                f"warning: could not mark MLflow run {run_id} {status} in {self.uri} ({problem(e)}): "
                "it stays RUNNING until the example's next train marks it KILLED",
                file=sys.stderr,
            )

    def end_dead_runs(self, experiment: str) -> list[str]:
        """Mark KILLED the RUNNING runs of `experiment` whose process is proven dead; returns their ids."""
        found = self.client.get_experiment_by_name(experiment)
        running = self.client.search_runs([found.experiment_id], "attributes.status = 'RUNNING'") if found else []
        dead = [run.info.run_id for run in running if process_is_dead(run)]
        for run_id in dead:
            self.client.set_terminated(run_id, "KILLED")
        return dead

    def run_status(self, run_id: str) -> str | None:
        """The run's status, or None when this store has no such run."""
        try:
            return self.client.get_run(run_id).info.status
        except MlflowException:
            return None

    def last_step(self, run_id: str, key: str) -> int:
        """The highest step logged for `key` in the run (0 if none)."""
        return max((m.step for m in self.client.get_metric_history(run_id, key)), default=0)

    def log_metrics(self, run_id: str, values: dict[str, float], step: int = 0) -> None:
        metrics = _metrics(values, step)
        self.log_metric_batch(run_id, metrics)

    def log_metric_batch(self, run_id: str, metrics: list[Metric]) -> None:
        for i in range(0, len(metrics), BATCH_LIMIT):
            self.client.log_batch(run_id, metrics=metrics[i : i + BATCH_LIMIT])

    def set_tags(self, run_id: str, tags: dict) -> None:
        """Values past MLflow's length limit (a prompt of a whole play) are cut here, without its warning."""
        self.client.log_batch(run_id, tags=[RunTag(k, str(v)[:MAX_TAG_VAL_LENGTH]) for k, v in tags.items()])

    def run_metrics(self, run_id: str) -> dict[str, float]:
        """The latest value of each of the run's metrics."""
        return self.client.get_run(run_id).data.metrics

    def end_run(self, run_id: str, status: str) -> None:
        self.client.set_terminated(run_id, status)

    def experiment_names(self) -> dict[str, str]:
        """Every experiment of the store, by id."""
        return {e.experiment_id: e.name for e in self.client.search_experiments()}

    def search_runs(self, experiment_ids: list[str], filter_string: str = "") -> list:
        return self.client.search_runs(experiment_ids, filter_string, max_results=10_000) if experiment_ids else []

    def log_artifacts(self, run_id: str, paths: list[Path], artifact_path: str | None = None) -> None:
        for path in paths:
            self.client.log_artifact(run_id, str(path), artifact_path)


class TrainingLogger:
    """Buffers per-step metrics and sends them in batches at every evaluation."""

    def __init__(self, tracker: Tracker, run_id: str, logged_through: int = 0):
        """`logged_through`: a resumed run's last step already in MLflow, which is not logged twice."""
        self.tracker, self.run_id, self.pending, self.logged_through = tracker, run_id, [], logged_through

    def on_step(self, record: StepRecord) -> None:
        if record.step <= self.logged_through:
            return
        values = {"train_loss": record.train_loss, "lr": record.lr, "tokens_per_sec": record.tokens_per_sec}
        self.pending += _metrics(values, record.step)

    def on_eval(self, record: EvalRecord) -> None:
        if record.step > self.logged_through:
            self.pending += _metrics({"val_loss": record.val_loss, "train_loss_eval": record.train_loss}, record.step)
        self.flush()

    def flush(self) -> None:
        self.tracker.log_metric_batch(self.run_id, self.pending)
        self.pending = []


@contextlib.contextmanager
def global_tracking_uri(uri: str):
    """Model.log finds its store only through MLflow's global tracking URI: set it for the call, then restore it.

    The private `_tracking_uri` because no public API tells "never set" from a default (MLflow's own
    `_use_tracking_uri` reads it too), and restoring `get_tracking_uri()`'s default would pin it.
    """
    before, env = tracking_utils._tracking_uri, os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before)
        if env is not None:
            os.environ["MLFLOW_TRACKING_URI"] = env
