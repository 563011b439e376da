"""Interrupted trainings, in real processes: kill -9 and resume, SIGINT and SIGTERM."""

import json
import os
import random
import shutil
import signal
import subprocess
import time

import pandas as pd
import pytest
import torch

from pipeline.checkpoint import load_resume_point
from pipeline.errors import Stopped
from pipeline.interrupts import stop_on_signals
from pipeline.paths import ExamplePaths
from pipeline.tracking import Tracker

from .helpers import RESUMABLE, cli, cli_env, prepared_project, run_cli, same_weights


def test_a_signal_asks_the_loop_to_stop_and_a_second_stops_at_once():
    before = signal.getsignal(signal.SIGTERM)
    with stop_on_signals() as stop:
        assert stop() is None
        os.kill(os.getpid(), signal.SIGTERM)
        reason = stop()
        assert isinstance(reason, Stopped) and reason.signum == signal.SIGTERM and "SIGTERM" in str(reason)
        with pytest.raises(Stopped, match="SIGINT"):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGTERM) is before


@pytest.fixture(scope="module")
def reference(tmp_path_factory, empty_store):
    """An uninterrupted run: what every interrupted and resumed run must reproduce."""
    project = prepared_project(tmp_path_factory.mktemp("reference"), empty_store)
    result = run_cli(project, "train", *RESUMABLE)
    assert result.returncode == 0, result.stderr
    return ExamplePaths(project, "toy")


@pytest.fixture
def fresh(tmp_path, empty_store):
    return ExamplePaths(prepared_project(tmp_path, empty_store), "toy")


def start_and_signal(paths: ExamplePaths, signum: int, after_eval: int, delay: float):
    """Start training; send `signum` `delay` seconds after the evaluation at step `after_eval` is printed."""
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    process = subprocess.Popen(cli("train", *RESUMABLE), cwd=paths.root, env=cli_env(), **pipes)
    for line in process.stdout:
        if line.startswith(f"step {after_eval}:"):
            time.sleep(delay)
            break
    sent = time.perf_counter()
    process.send_signal(signum)
    stdout, stderr = process.communicate(timeout=60)
    return process.returncode, time.perf_counter() - sent, stderr


def run_id(paths: ExamplePaths) -> str:
    return json.loads(paths.run_info.read_text())["run_id"]


def assert_same_as(reference: ExamplePaths, paths: ExamplePaths) -> None:
    """Bit for bit: the final weights, every evaluation, every step's loss and learning rate."""
    assert same_weights(reference.checkpoint, paths.checkpoint)
    assert paths.evals.read_text() == reference.evals.read_text()
    columns = ["step", "train_loss", "lr"]
    pd.testing.assert_frame_equal(pd.read_csv(paths.history)[columns], pd.read_csv(reference.history)[columns])
    final = [json.loads(p.train_metrics.read_text())["final_val_loss"] for p in (reference, paths)]
    assert final[0] == final[1]


def assert_logged_once(paths: ExamplePaths, run: str) -> None:
    """The resumed run is the same MLflow run, finished, with every step's point exactly once."""
    tracker = Tracker.for_project(paths.root)
    assert tracker.client.get_run(run).info.status == "FINISHED"
    steps = [m.step for m in tracker.client.get_metric_history(run, "train_loss")]
    assert sorted(steps) == list(range(1, 121))
    assert sorted(m.step for m in tracker.client.get_metric_history(run, "val_loss")) == [20, 40, 60, 80, 100, 120]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_kill_9_at_a_random_step_then_resume_gives_the_uninterrupted_run(reference, fresh, seed):
    rng = random.Random(seed)
    code, _, _ = start_and_signal(fresh, signal.SIGKILL, rng.choice([20, 40, 60]), rng.uniform(0, 0.15))
    assert code == -signal.SIGKILL
    killed_run = run_id(fresh)
    point = load_resume_point(fresh.latest_checkpoint)  # never torn, whenever the kill came
    assert point.run_id == killed_run and not point.finished and point.state.step % 20 == 0
    tracker = Tracker.for_project(fresh.root)
    assert tracker.client.get_run(killed_run).info.status == "RUNNING"  # nobody could tell it: SIGKILL

    resumed = run_cli(fresh.root, "train", *RESUMABLE)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming at step {point.state.step} of 120" in resumed.stdout
    assert run_id(fresh) == killed_run
    assert_same_as(reference, fresh)
    assert_logged_once(fresh, killed_run)
    assert not list(fresh.model_dir.rglob("*.tmp"))


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_saves_a_checkpoint_marks_the_run_killed_and_the_rerun_resumes(reference, fresh, signum):
    code, seconds, stderr = start_and_signal(fresh, signum, after_eval=40, delay=0.05)
    name = signal.Signals(signum).name
    # 2.2 s on an idle machine; 11.4 s once in CI beside the other test worker
    assert code == 128 + signum and seconds < 30, (code, seconds, stderr)
    assert f"stopped by {name} at step" in stderr and "run the same command again to resume" in stderr
    assert "Traceback" not in stderr
    point = load_resume_point(fresh.latest_checkpoint)
    assert f"at step {point.state.step}," in stderr and 40 <= point.state.step < 120  # stopped, not finished
    assert Tracker.for_project(fresh.root).client.get_run(point.run_id).info.status == "KILLED"

    resumed = run_cli(fresh.root, "train", *RESUMABLE)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming at step {point.state.step} of 120" in resumed.stdout
    assert_same_as(reference, fresh)
    assert_logged_once(fresh, point.run_id)


def test_a_finished_run_other_params_or_fresh_start_a_new_run(reference, tmp_path):
    project = tmp_path / "copy"
    shutil.copytree(reference.root, project)
    paths, tracker = ExamplePaths(project, "toy"), Tracker.for_project(project)
    again = run_cli(project, "train", *RESUMABLE)
    assert again.returncode == 0 and "not resuming" in again.stdout and "its run finished" in again.stdout
    first = run_id(paths)
    assert first != run_id(reference)
    assert_same_as(reference, paths)  # the same parameters give the same model, in a new run

    unfinish(paths.latest_checkpoint)  # as if killed, with its run left RUNNING
    tracker.client.update_run(first, "RUNNING")
    other = run_cli(project, "train", *RESUMABLE, "toy.train.max_steps=40")
    assert other.returncode == 0 and "it was made with other data, model or train parameters" in other.stdout
    assert f"its MLflow run {first}, left RUNNING by a killed process, is now marked KILLED" in other.stdout
    assert tracker.client.get_run(first).info.status == "KILLED"
    assert load_resume_point(paths.latest_checkpoint).state.step == 40

    unfinish(paths.latest_checkpoint)
    forced = run_cli(project, "train", *RESUMABLE, "toy.train.max_steps=40", flags=("--fresh",))
    assert forced.returncode == 0 and "resuming" not in forced.stdout and run_id(paths) != first


def unfinish(path) -> None:
    state = torch.load(path, weights_only=True)
    state["resume"]["finished"] = False
    torch.save(state, path)
