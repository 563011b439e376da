"""What several test modules share: the project's paths, tiny parameters for every example, and
ways to run the real command line."""

import contextlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.config import listed_examples, load_params
from pipeline.data import prepare
from pipeline.overrides import apply_overrides
from pipeline.paths import ExamplePaths

ROOT = Path(__file__).resolve().parents[1]

# Overrides that make any example train, sample and sweep in seconds, by the kind of its data
TINY_BY_KIND = {
    "words": [
        "train.max_steps=60",
        "train.warmup_steps=10",
        "train.eval_interval=20",
        "train.batch_size=128",
        "data.repeats=4",
    ],
    "text": [
        "train.max_steps=20",
        "train.warmup_steps=5",
        "train.eval_interval=10",
        "train.batch_size=4",
        "model.block_size=32",
        "model.ngram_rows=[64,128]",  # the default's code path, at a size that writes checkpoints fast
        "sample.max_new_tokens=20",
    ],
}
TINY_MODEL = ["train.eval_batches=2", "model.n_embd=32", "model.n_layer=1"]
TINY_SWEEP = ["tune.trials=3", "tune.max_steps=20", "tune.eval_interval=10"]


def tiny_overrides(params_file: Path) -> dict[str, list[str]]:
    """For each example of `params_file`, the overrides that make it tiny."""
    raw = yaml.safe_load(Path(params_file).read_text())
    tiny = {}
    for example in listed_examples(params_file):
        keys = TINY_BY_KIND[raw[example]["data"]["kind"]] + TINY_MODEL
        keys += TINY_SWEEP if raw[example].get("tune") else []
        tiny[example] = [f"{example}.{key}" for key in keys]
    return tiny


TINY = tiny_overrides(ROOT / "params.yaml")


def write_tiny_params(path: Path, source: Path = ROOT / "params.yaml") -> None:
    """`source` with every example made tiny, as a params file at `path`."""
    raw = apply_overrides(yaml.safe_load(source.read_text()), sum(tiny_overrides(source).values(), []))
    path.write_text(yaml.safe_dump(raw, sort_keys=False, allow_unicode=True))


def tiny_params(example: str, *extra: str):
    return load_params(ROOT / "params.yaml", TINY[example] + list(extra))[example]


def copy_inputs(root: Path) -> Path:
    for example in TINY:
        (root / "data" / example).mkdir(parents=True)
        shutil.copy(ROOT / "data" / example / "input.txt", root / "data" / example / "input.txt")
    return root


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


# A small sweep of the toy example: 4 trials of 20 steps, a learning rate that ranges down to
# hopeless values, so that the median pruner has something to prune.
SWEEP_SPACE = (
    "{n_layer: {low: 1, high: 2}, n_head: {choices: [1, 2]}, head_size: {choices: [8, 16]},"
    " learning_rate: {low: 1.0e-6, high: 2.0e-2, log: true}}"
)
SWEEP = [
    "toy.model.n_head=2",
    "toy.model.n_embd=32",
    "toy.train.learning_rate=1.0e-2",
    "toy.train.warmup_steps=2",
    "toy.tune.trials=4",
    "toy.tune.max_steps=20",
    "toy.tune.eval_interval=5",
    f"toy.tune.space={SWEEP_SPACE}",
    "toy.tune.heartbeat_seconds=1",
    "toy.tune.register_as=chargpt-test",
]
# the baseline learns well; most draws of a learning rate near 1e-6 do not, and are pruned
PRUNE_HARD = "toy.tune.pruner={kind: median, startup_trials: 1, warmup_steps: 0}"


def sweep_params(*extra):
    """(params, tune) of the small toy sweep, with `extra` overrides."""
    from pipeline.tuning.space import parse_tune

    params = tiny_params("toy", *SWEEP, *extra)
    return params, parse_tune(params, "toy")


def load_study(params, tune, root: Path):
    import optuna

    from pipeline.tuning.storage import storage_url, study_name

    return optuna.load_study(study_name=study_name(params, tune, "toy"), storage=storage_url(tune, root))


def child_runs(tracker, parent_run_id):
    experiment = tracker.client.get_experiment_by_name("toy-tune")
    return tracker.client.search_runs([experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}'")


# A project in a fresh git repository, as a user's clone: DVC and the command line run in it


def project_files() -> list[str]:
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\n")
    return [f for f in listed if f and (ROOT / f).is_file() and not f.startswith(("models/", "dvc.lock"))]


def repo_env() -> dict:
    variables = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "DVC_ROOT")}
    identity = {"GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@example.com"}
    identity |= {"GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@example.com"}
    bin_dir = str(Path(sys.executable).parent)
    return variables | identity | {"PATH": f"{bin_dir}:{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}


def run_ok(path: Path, *command: str, env: dict | None = None) -> str:
    result = subprocess.run(command, cwd=path, env=env or repo_env(), capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


def commit(path: Path, message: str) -> None:
    run_ok(path, "git", "add", "-A")
    run_ok(path, "git", "commit", "-qm", message)


def new_repo(path: Path) -> Path:
    """The project's files in `path`, made a git repository, with every example's tiny parameters."""
    for name in project_files():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, path / name)
    write_tiny_params(path / "params.yaml")
    run_ok(path, "git", "init", "-q")
    commit(path, "project")
    return path


@contextlib.contextmanager
def read_only(path: Path):
    """`path`, a file or a folder, cannot be written while the block runs, even by root."""
    if os.geteuid() == 0:  # root writes through chmod: make it immutable instead (ext4, xfs, btrfs)
        if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0:
            pytest.skip("chattr +i is not available on this filesystem, and chmod does not stop root")
        undo = ["chattr", "-i", str(path)]
    else:
        modes = ("555", "755") if path.is_dir() else ("444", "644")
        path.chmod(int(modes[0], 8))
        undo = ["chmod", modes[1], str(path)]
    try:
        yield
    finally:
        subprocess.run(undo, check=True)
