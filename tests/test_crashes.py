"""Crash consistency of the whole project: `kill -9` a running `dvc repro` at random moments, in any
stage; a plain `dvc repro` then finishes, and the workspace, the MLflow store and the data agree."""

import json
import os
import random
import signal
import subprocess
import time

import pytest
import yaml
from mlflow.entities import LoggedModelStatus
from mlflow.tracking import MlflowClient

from pipeline.checkpoint import load_checkpoint
from pipeline.data import load_dataset
from pipeline.paths import ExamplePaths

from .helpers import new_repo, repo_env, run_ok

pytestmark = pytest.mark.slow

KILLS = 20
RUN_ARTIFACTS = {"checkpoint", "history.csv", "evals.csv", "loss.png", "train.json", "metrics.json", "samples.txt"}


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """The project with one example, toy, and its sweep, on tiny parameters, after one whole `dvc repro`."""
    path = new_repo(tmp_path_factory.mktemp("crash"))
    params = yaml.safe_load((path / "params.yaml").read_text())
    params["examples"], params["sweeps"] = ["toy"], ["toy"]
    params["toy"]["tune"]["trials"] = 2
    (path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    started = time.monotonic()
    run_ok(path, "dvc", "repro")
    return path, time.monotonic() - started


def killed_repro(path, after: float) -> str:
    """`dvc repro --force`, its whole process group killed with SIGKILL `after` seconds in; the stage it was in."""
    with open(path / "killed.log", "w") as log:
        repro = subprocess.Popen(
            ["dvc", "repro", "--force"], cwd=path, env=repo_env(), stdout=log, stderr=log, start_new_session=True
        )
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


def test_a_repro_killed_at_random_moments_always_recovers(project):
    path, seconds = project
    check_consistent(path)
    moments = random.Random(2026).sample(range(1, int(seconds * 10)), KILLS)
    stages = []
    for moment in moments:
        stages.append(killed_repro(path, moment / 10))
        run_ok(path, "dvc", "repro")  # exits 0, or run_ok fails the test
        check_consistent(path)
    print(f"{KILLS} kills in a {seconds:.0f} s repro, in stages: {sorted(stages)}")
    assert len({stage.split("@")[0] for stage in stages}) >= 4, stages  # the kills reached most stages
