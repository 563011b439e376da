import shutil
from pathlib import Path

import pytest

from pipeline.config import ExamplePaths, load_params
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


@pytest.fixture
def project(tmp_path):
    """A project root with both examples' input files, nothing prepared yet."""
    for example in ("toy", "shakespeare"):
        (tmp_path / "data" / example).mkdir(parents=True)
        shutil.copy(ROOT / "data" / example / "input.txt", tmp_path / "data" / example / "input.txt")
    return tmp_path


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
