import glob
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest

from pipeline.config import load_params
from pipeline.data import load_dataset, prepare
from pipeline.paths import ExamplePaths

from .helpers import copy_inputs, tiny_params, write_tiny_params


@pytest.fixture
def project(tmp_path):
    """A project root with both examples' input files, nothing prepared yet."""
    return copy_inputs(tmp_path)


@pytest.fixture
def toy(project):
    """The toy example prepared with tiny parameters: (params, paths, dataset)."""
    params, paths = tiny_params("toy"), ExamplePaths(project, "toy")
    prepare(params.data, paths)
    return params, paths, load_dataset(paths)


@pytest.fixture(scope="session")
def empty_store(tmp_path_factory) -> Path:
    """An MLflow SQLite store with its tables made: copying it saves each test the seconds of migrations."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("store") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def tracker(tmp_path, empty_store):
    from pipeline.tracking import Tracker

    shutil.copy(empty_store, tmp_path / "mlflow.db")
    return Tracker.for_project(tmp_path)


def _postgres_bin(name: str) -> str:
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None)
    if not found:
        pytest.fail(f"PostgreSQL's {name} is not installed: `apt-get install postgresql` (.ci/run does)")
    return found


@pytest.fixture(scope="session")
def postgres_url():
    """A real PostgreSQL server on loopback for this test session, in a temporary folder.

    TEST_POSTGRES_URL names an existing server instead.
    """
    if url := os.environ.get("TEST_POSTGRES_URL"):
        yield url
        return
    folder = Path(tempfile.mkdtemp(prefix="pg-"))
    as_user = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root: run it as Debian's `postgres` user
        shutil.chown(folder, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    run = lambda *cmd: subprocess.run(as_user + list(cmd), check=True, capture_output=True, text=True)
    run(_postgres_bin("initdb"), "-D", str(folder / "data"), "-U", "postgres", "--auth=trust", "-E", "UTF8")
    options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1"
    run(_postgres_bin("pg_ctl"), "-D", str(folder / "data"), "-o", options, "-l", str(folder / "log"), "-w", "start")
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        run(_postgres_bin("pg_ctl"), "-D", str(folder / "data"), "-m", "immediate", "-w", "stop")
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def trained_project(tmp_path_factory):
    """A project whose params.yaml holds the tiny parameters, with both examples prepared, trained
    and evaluated by the library into the project's own MLflow store: (root, tracker)."""
    from pipeline.stages.evaluate import evaluate_example
    from pipeline.stages.prepare import prepare_example
    from pipeline.stages.train import train_example
    from pipeline.tracking import Tracker

    root = copy_inputs(tmp_path_factory.mktemp("trained"))
    write_tiny_params(root / "params.yaml")
    tracker = Tracker.for_project(root)
    for example, params in load_params(root / "params.yaml").items():
        paths = ExamplePaths(root, example)
        prepare_example(params, paths)
        train_example(params, paths, tracker, progress=False)
        evaluate_example(params, paths, tracker)
    return root, tracker


@pytest.fixture(scope="session")
def swept(tmp_path_factory, empty_store):
    """The small toy sweep (tests/helpers.py: SWEEP), run once with its pruner at its hardest:
    (params, tune, paths, tracker, study). Tests only read it."""
    from pipeline.stages.tune import tune_example
    from pipeline.tracking import Tracker

    from .helpers import PRUNE_HARD, load_study, sweep_params

    root = copy_inputs(tmp_path_factory.mktemp("swept"))
    shutil.copy(empty_store, root / "mlflow.db")
    params, tune = sweep_params(PRUNE_HARD)
    paths = ExamplePaths(root, "toy")
    prepare(params.data, paths)
    tracker = Tracker.for_project(root)
    tune_example(params, paths, tracker, progress=False)
    return params, tune, paths, tracker, load_study(params, tune, root)
