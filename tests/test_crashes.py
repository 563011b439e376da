"""Crash consistency of the whole project: `kill -9` a running `dvc repro` at random moments, in any
stage; a plain `dvc repro` then finishes, and the workspace, the MLflow store and the data agree."""

import json
import os
import random
import signal
import subprocess

import pytest
import yaml
from mlflow.entities import LoggedModelStatus
from mlflow.tracking import MlflowClient

from pipeline.checkpoint import load_checkpoint
from pipeline.data import load_dataset
from pipeline.paths import ExamplePaths

from .helpers import commit, new_repo, repo_env, run_ok

pytestmark = pytest.mark.slow

KILLS = 4  # each kill costs a repro of its stage and those after it: about 40 s in CI
STAGES = ["prepare@toy", "train@toy", "evaluate@toy", "sample@toy", "inspect@toy", "tune@toy"]
RWLOCK = ".dvc/tmp/rwlock"
RUN_ARTIFACTS = {"checkpoint", "history.csv", "evals.csv", "loss.png", "train.json", "metrics.json", "samples.txt"}


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """The project with one example, toy, and its sweep, on tiny parameters, after one whole `dvc repro`."""
    path = new_repo(tmp_path_factory.mktemp("crash"))
    params = yaml.safe_load((path / "params.yaml").read_text())
    params["examples"], params["sweeps"] = ["toy"], ["toy"]
    params["toy"]["tune"]["trials"] = 2
    (path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run_ok(path, "dvc", "repro")
    commit(path, "the pipeline's results")  # dvc.lock in git, as in the project
    return path


def killed_repro(path, start: str, after: float) -> str:
    """`dvc repro --force` of `start` and every stage after it, its whole process group killed with
    SIGKILL `after` seconds in; returns the stage it was in."""
    command = ["dvc", "repro", "--force", "--downstream", start]
    with open(path / "killed.log", "w") as log:
        repro = subprocess.Popen(command, cwd=path, env=repo_env(), stdout=log, stderr=log, start_new_session=True)
        try:
            repro.wait(timeout=after)
        except subprocess.TimeoutExpired:
            os.killpg(repro.pid, signal.SIGKILL)
            repro.wait()
    stages = [line.split("'")[1] for line in (path / "killed.log").read_text().splitlines() if "Running stage" in line]
    return stages[-1] if stages and repro.returncode == -signal.SIGKILL else "none: it finished"


def check_consistent(path) -> None:
    assert json.loads(run_ok(path, "dvc", "status", "--json").splitlines()[-1]) == {}
    paths = ExamplePaths(path, "toy")
    load_dataset(paths)  # the prepared data's digests match meta.json
    client = MlflowClient(tracking_uri=f"sqlite:///{path / 'mlflow.db'}")
    info = json.loads(paths.run_info.read_text())
    run = client.get_run(info["run_id"])
    assert run.info.status == "FINISHED" and load_checkpoint(paths.checkpoint).run_id == info["run_id"]
    assert {a.path for a in client.list_artifacts(info["run_id"])} >= RUN_ARTIFACTS
    assert client.get_logged_model(info["model_id"]).status == LoggedModelStatus.READY
    for experiment in ("toy", "toy-tune"):
        runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id], max_results=1000)
        assert not [r.info.run_id for r in runs if r.info.status == "RUNNING"], f"orphan runs in {experiment}"


def lock_is_torn(path) -> bool:
    try:
        return not isinstance(yaml.safe_load((path / "dvc.lock").read_text()), dict)
    except yaml.YAMLError:
        return True


def rwlock_is_torn(path) -> bool:
    try:
        return not isinstance(json.loads((path / RWLOCK).read_text()), dict)
    except FileNotFoundError:
        return False
    except json.JSONDecodeError:
        return True


def repair_dvc_state(path) -> bool:
    """Undo what a kill tears in DVC's own files; True if there was anything to undo.

    DVC rewrites dvc.lock and its table of running stages, .dvc/tmp/rwlock, in place, so a kill
    during either write can leave it empty, and DVC then refuses to run. A user restores dvc.lock
    from git and deletes the rwlock once no DVC command runs (docs/failures.md);
    so does this test.
    """
    torn = False
    if lock_is_torn(path):
        run_ok(path, "git", "checkout", "dvc.lock")
        torn = True
    if rwlock_is_torn(path):
        (path / RWLOCK).unlink()
        torn = True
    return torn


def finish_repro(path) -> bool:
    """A plain `dvc repro` that must succeed; True if DVC had torn one of its own files first."""
    result = subprocess.run(["dvc", "repro"], cwd=path, env=repo_env(), capture_output=True, text=True)
    if result.returncode != 0 and repair_dvc_state(path):
        run_ok(path, "dvc", "repro")
        return True
    assert result.returncode == 0, result.stdout + result.stderr
    return False


def test_a_repro_killed_at_random_moments_always_recovers(project):
    path = project
    check_consistent(path)
    rng = random.Random(2026)
    killed_in, finished, torn = [], 0, 0
    starts = iter([stage for _ in range(2 * KILLS) for stage in rng.sample(STAGES, len(STAGES))])  # each in turn
    while len(killed_in) < KILLS and finished < KILLS:  # a repro that ends before its moment is no kill
        stage = killed_repro(path, next(starts), rng.uniform(0.5, 7.0))
        killed_in += [stage] if stage in STAGES else []
        finished += stage not in STAGES
        torn += finish_repro(path)
        check_consistent(path)
    print(f"{len(killed_in)} kills, in: {sorted(killed_in)}; {finished} ended first; DVC's files torn {torn}x")
    assert len(killed_in) == KILLS and len(set(killed_in)) >= 3, killed_in  # kills in several stages


@pytest.mark.parametrize("torn_file", ["dvc.lock", RWLOCK])
def test_the_readmes_repair_of_a_file_dvc_tore_works(project, torn_file):
    path = project
    run_ok(path, "git", "add", "-A")  # so the restored dvc.lock matches the outputs: nothing to re-run
    run_ok(path, "git", "commit", "-qm", "the pipeline's results", "--allow-empty")
    (path / torn_file).write_text("")  # what a kill during DVC's in-place rewrite leaves
    refused = subprocess.run(["dvc", "repro"], cwd=path, env=repo_env(), capture_output=True, text=True)
    assert refused.returncode != 0 and torn_file.split("/")[-1] in refused.stderr, refused.stderr
    assert repair_dvc_state(path)
    run_ok(path, "dvc", "repro")
    check_consistent(path)
