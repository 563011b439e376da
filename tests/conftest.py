import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.config import ExamplePaths, apply_overrides, load_params
from pipeline.data import load_dataset, prepare

ROOT = Path(__file__).resolve().parents[1]

TINY = {
    "toy": [
        "toy.train.max_steps=60",
        "toy.train.warmup_steps=10",
        "toy.train.eval_interval=20",
        "toy.train.eval_batches=2",
        "toy.model.n_embd=32",
        "toy.model.n_layer=1",
        "toy.data.repeats=4",
        "toy.tune.trials=3",
        "toy.tune.max_steps=20",
        "toy.tune.eval_interval=10",
    ],
    "shakespeare": [
        "shakespeare.train.max_steps=20",
        "shakespeare.train.warmup_steps=5",
        "shakespeare.train.eval_interval=10",
        "shakespeare.train.eval_batches=2",
        "shakespeare.train.batch_size=4",
        "shakespeare.model.n_embd=32",
        "shakespeare.model.n_layer=1",
        "shakespeare.model.block_size=32",
        "shakespeare.sample.max_new_tokens=20",
    ],
}


def tiny_params(example: str, *extra: str):
    return load_params(ROOT / "params.yaml", TINY[example] + list(extra))[example]


def copy_inputs(root: Path) -> Path:
    for example in ("toy", "shakespeare"):
        (root / "data" / example).mkdir(parents=True)
        shutil.copy(ROOT / "data" / example / "input.txt", root / "data" / example / "input.txt")
    return root


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


from tests.postgres import postgres_url  # noqa: E402, F401 (a session fixture: a PostgreSQL server)


@pytest.fixture(scope="session")
def trained_project(tmp_path_factory):
    """A project whose params.yaml holds the tiny parameters, with both examples prepared, trained
    and evaluated by the library into the project's own MLflow store: (root, tracker)."""
    from pipeline import commands
    from pipeline.tracking import Tracker

    root = copy_inputs(tmp_path_factory.mktemp("trained"))
    raw = apply_overrides(yaml.safe_load((ROOT / "params.yaml").read_text()), TINY["toy"] + TINY["shakespeare"])
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    tracker = Tracker.for_project(root)
    for example, params in load_params(root / "params.yaml").items():
        paths = ExamplePaths(root, example)
        commands.prepare_example(params, paths)
        commands.train_example(params, paths, tracker, progress=False)
        commands.evaluate_example(params, paths, tracker)
    return root, tracker


# Real processes: `python -m pipeline ...` run in a project folder, as a user or DVC would.
RESUMABLE = TINY["toy"] + ["toy.train.max_steps=120", "toy.model.dropout=0.1"]  # dropout: the RNG state matters


def cli_env(**extra: str) -> dict:
    """The environment of a CLI subprocess: this checkout's code, one thread (the same in every run)."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "DVC_ROOT")}
    return env | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"} | extra


def cli(command: str, *overrides: str, flags: tuple = ()) -> list[str]:
    sets = [arg for override in overrides for arg in ("--set", override)]
    params = ["--example", "toy", "--params", str(ROOT / "params.yaml")]
    return [sys.executable, "-m", "pipeline", command, *params, *sets, *flags]


def run_cli(project: Path, command: str, *overrides: str, flags: tuple = (), env: dict | None = None, **kwargs):
    command_line = cli(command, *overrides, flags=flags)
    return subprocess.run(command_line, cwd=project, env=env or cli_env(), capture_output=True, text=True, **kwargs)


def prepared_project(root: Path, store: Path | None, overrides=RESUMABLE) -> Path:
    """`root` with the toy example's input prepared with `overrides`, and a copy of `store` if given."""
    (root / "data" / "toy").mkdir(parents=True)
    if store:
        shutil.copy(store, root / "mlflow.db")
    shutil.copy(ROOT / "data" / "toy" / "input.txt", root / "data" / "toy" / "input.txt")
    params = load_params(ROOT / "params.yaml", list(overrides))["toy"]
    prepare(params.data, ExamplePaths(root, "toy"))
    return root


def weights(path: Path) -> dict:
    import torch

    return torch.load(path, weights_only=True)["model"]


def same_weights(a: Path, b: Path) -> bool:
    import torch

    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
