import shutil
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


@pytest.fixture
def tracker(tmp_path):
    from pipeline.tracking import Tracker

    return Tracker.for_project(tmp_path)


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
