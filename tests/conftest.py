import os
import shutil
from pathlib import Path

import pytest
import torch

from pipeline.config import load_params
from pipeline.data import load_dataset, prepare
from pipeline.paths import ExamplePaths

from .helpers import copy_inputs, tiny_params, write_tiny_params
from .model_helpers import model_store, shakespeare, training_run
from .postgres import postgres_url  # noqa: F401 (a session fixture: a PostgreSQL server)


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


@pytest.fixture(scope="module")
def store(trained_project, empty_store, tmp_path_factory):
    """For the MLflow model tests: a store of each module's own, a run in it, the trained shakespeare files."""
    tracker = model_store(tmp_path_factory.mktemp("models"), empty_store)
    return tracker, training_run(tracker), *shakespeare(trained_project[0])


@pytest.fixture
def global_store(store, monkeypatch):
    """`models:/` URIs resolve through MLflow's global tracking URI: point it at the module's store."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store[0].uri)


# `make test` runs two workers (pytest-xdist, one module per worker at a time: `--dist loadfile
# --no-loadscope-reorder`). The modules that take longest in CI (pytest's --durations) go first,
# each to its own worker; every worker also queues one more module while it runs one, so a quick
# one comes third, to be what the first worker holds back.
LONGEST_FIRST = [
    "test_pipeline",
    "test_crashes",
    "test_config",
    "test_tuning_storage",
    "test_writers",
    "test_interrupts",
    "test_tracking",
    "test_errors",
]


def pytest_configure(config):
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # Two workers on two cores: a second OpenMP thread in each spins waiting for a core the other
        # worker holds, and runs several times slower than one (docs/performance.md, `threads`).
        # The subprocesses the tests start inherit the variable.
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


def pytest_collection_modifyitems(items):
    def rank(item) -> int:
        name = item.path.stem
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: each module keeps its own order
