"""One writer per example, in real processes: a second writer is refused, a checkpoint names its run,
four examples train side by side, and two sweeps of one study share its trials."""

import json
import re
import shutil
import subprocess
import sys

import yaml
from mlflow.tracking import MlflowClient

from pipeline.checkpoint import load_checkpoint
from pipeline.paths import ExamplePaths
from pipeline.tracking import Tracker

from .helpers import RESUMABLE, ROOT, SWEEP, TINY, cli, cli_env, load_study, prepared_project, run_cli, sweep_params

PIPES = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}


def run_id_in(output: str) -> str:
    return re.search(r"MLflow run (\w+) in", output).group(1)


def test_a_second_training_is_refused_and_nothing_is_attributed_to_the_wrong_run(tmp_path, empty_store):
    project = prepared_project(tmp_path / "p", empty_store)
    paths = ExamplePaths(project, "toy")
    first = subprocess.Popen(cli("train", *RESUMABLE, "toy.train.max_steps=400"), cwd=project, env=cli_env(), **PIPES)
    started = first.stdout.readline()  # the process holds the lock by the time it prints
    assert "parameters on" in started, started + first.stderr.read()

    second = run_cli(project, "train", *RESUMABLE, "toy.train.max_steps=200", "toy.train.learning_rate=1e-3")
    assert second.returncode == 2 and second.stdout == ""
    assert re.fullmatch(
        rf"error: models/toy is in use by '.*pipeline train --example toy .*' \(pid {first.pid} on this host, "
        r"since \d\d:\d\d:\d\d\); wait for it, or stop it\n",
        second.stderr,
    ), second.stderr

    rest, stderr = first.communicate(timeout=600)
    assert first.returncode == 0, stderr
    trained_in = run_id_in(started)
    assert json.loads(paths.run_info.read_text())["run_id"] == trained_in
    assert load_checkpoint(paths.checkpoint).run_id == trained_in and load_checkpoint(paths.checkpoint).step == 400
    client = Tracker.for_project(project).client
    runs = client.search_runs([client.get_experiment_by_name("toy").experiment_id])
    assert [(r.info.run_id, r.info.status) for r in runs] == [(trained_in, "FINISHED")]

    evaluated = run_cli(project, "evaluate", *RESUMABLE, "toy.train.max_steps=400")
    assert evaluated.returncode == 0, evaluated.stderr
    assert "eval.val.loss" in client.get_run(trained_in).data.metrics


def test_a_checkpoint_trained_in_another_run_than_run_json_names_is_refused(trained_project):
    root, tracker = trained_project
    paths = ExamplePaths(root, "toy")
    info = json.loads(paths.run_info.read_text())
    other = tracker.start_run("toy", "other", {}, {})
    paths.run_info.write_text(json.dumps(info | {"run_id": other}))
    try:
        for command in ("evaluate", "sample", "inspect", "register"):
            result = subprocess.run(
                [sys.executable, "-m", "pipeline", command, "--example", "toy"],
                cwd=root,
                env=cli_env(),
                **PIPES,
            )
            assert result.returncode == 2, (command, result.stderr)
            assert result.stderr == (
                f"error: models/toy/ckpt.pt was trained in run {info['run_id']}, but run.json names run {other}: "
                "run train again\n"
            )
        assert "eval.val.loss" not in tracker.client.get_run(other).data.metrics
    finally:
        paths.run_info.write_text(json.dumps(info))
        tracker.client.delete_run(other)  # the store is the session's: the other tests see its two runs only


def four_examples(project) -> list[str]:
    """The toy example and three copies of it, each its own example of one params file."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    names = ["toy", "toy2", "toy3", "toy4"]
    params = {"examples": names, "sweeps": []} | {name: raw["toy"] for name in names}
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    for name in names[1:]:
        (project / "data" / name).mkdir(parents=True)
        shutil.copy(ROOT / "data" / "toy" / "input.txt", project / "data" / name / "input.txt")
    return names


def test_four_examples_train_at_once_and_every_step_is_logged(tmp_path, empty_store):
    project = prepared_project(tmp_path / "p", empty_store)
    names = four_examples(project)
    steps = [*TINY["toy"], "train.max_steps=120", "train.eval_interval=5"]  # a log_batch every 5 steps

    def command(name, stage):
        sets = [arg for key in steps for arg in ("--set", f"{name}.{key.removeprefix('toy.')}")]
        return [sys.executable, "-m", "pipeline", stage, "--example", name, *sets]

    for name in names:
        assert subprocess.run(command(name, "prepare"), cwd=project, env=cli_env(), **PIPES).returncode == 0
    processes = [subprocess.Popen(command(name, "train"), cwd=project, env=cli_env(), **PIPES) for name in names]
    for process in processes:
        _, stderr = process.communicate(timeout=600)
        assert process.returncode == 0 and "Traceback" not in stderr and "database is locked" not in stderr, stderr
    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    for name in names:
        (run,) = client.search_runs([client.get_experiment_by_name(name).experiment_id])
        assert run.info.status == "FINISHED"
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "train_loss")) == list(range(1, 121))
        assert len(client.get_metric_history(run.info.run_id, "val_loss")) == 24
        assert json.loads((project / "models" / name / "run.json").read_text())["run_id"] == run.info.run_id


def test_two_sweeps_of_one_study_side_by_side_share_its_trials_exactly(toy):
    _, paths, _ = toy
    overrides = [*TINY["toy"], *SWEEP, "toy.tune.trials=6", "toy.tune.pruner={kind: none}"]
    command = [sys.executable, "-m", "pipeline", "tune", "--example", "toy", "--params", str(ROOT / "params.yaml")]
    command += [arg for override in overrides for arg in ("--set", override)]
    sweeps = [subprocess.Popen(command, cwd=paths.root, env=cli_env(), **PIPES) for _ in range(2)]
    for sweep in sweeps:
        _, stderr = sweep.communicate(timeout=600)
        assert sweep.returncode == 0, stderr
    params, tune = sweep_params("toy.tune.trials=6", "toy.tune.pruner={kind: none}")
    trials = load_study(params, tune, paths.root).trials
    assert sorted(t.number for t in trials) == list(range(6)) and all(t.state.is_finished() for t in trials)
    assert len({t.user_attrs["mlflow_run_id"] for t in trials}) == 6
    parents = {t.user_attrs["mlflow_run_id"]: t for t in trials}
    client = Tracker.for_project(paths.root).client
    assert {client.get_run(run_id).data.tags["mlflow.parentRunId"] for run_id in parents} == {
        load_study(params, tune, paths.root).user_attrs["mlflow_parent_run_id"]
    }
