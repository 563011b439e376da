import os
import signal
import subprocess
import sys
import time

import pytest
from optuna.trial import TrialState

from pipeline.errors import PipelineError
from pipeline.stages.tune import tune_example
from pipeline.tuning.storage import open_storage

from .helpers import ROOT, SWEEP, TINY, child_runs, load_study, sweep_params


@pytest.fixture(autouse=True)
def local_tracking(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def check_parallel_sweep(params, tune, paths, tracker, total):
    tune_example(params, paths, tracker, progress=False)
    study = load_study(params, tune, paths.root)
    trials = study.get_trials()
    assert sorted(t.number for t in trials) == list(range(total))
    assert all(t.state.is_finished() for t in trials)
    run_ids = [t.user_attrs["mlflow_run_id"] for t in trials]
    assert len(set(run_ids)) == total
    assert {r.info.run_id for r in child_runs(tracker, study.user_attrs["mlflow_parent_run_id"])} == set(run_ids)


def test_two_workers_on_the_embedded_storage_run_exactly_the_total(toy, tracker):
    _, paths, _ = toy
    check_parallel_sweep(*sweep_params("toy.tune.workers=2", "toy.tune.trials=5"), paths, tracker, 5)


def test_two_workers_share_a_postgresql_study(toy, tracker, postgres_url):
    _, paths, _ = toy
    params, tune = sweep_params("toy.tune.workers=2", "toy.tune.trials=5", f"toy.tune.storage={postgres_url}")
    check_parallel_sweep(params, tune, paths, tracker, 5)


def running_trial_runs(params, tune, paths) -> list[str]:
    """The MLflow run ids that running trials have recorded so far."""
    try:
        trials = load_study(params, tune, paths.root).trials
    except KeyError:  # the study is not created yet
        return []
    running = [t for t in trials if t.state == TrialState.RUNNING]
    return [t.user_attrs["mlflow_run_id"] for t in running if "mlflow_run_id" in t.user_attrs]


def test_a_killed_workers_trial_is_marked_failed_and_the_sweep_continues(toy, tracker):
    _, paths, _ = toy
    extra = ["toy.tune.trials=2", "toy.tune.max_steps=1500", "toy.tune.pruner={kind: none}"]
    params, tune = sweep_params(*extra)
    command = [sys.executable, "-m", "pipeline", "tune", "--example", "toy", "--params", str(ROOT / "params.yaml")]
    for override in TINY["toy"] + SWEEP + extra:
        command += ["--set", override]
    worker = subprocess.Popen(command, cwd=paths.root, env=os.environ | {"PYTHONPATH": str(ROOT)})
    deadline = time.time() + 120
    while time.time() < deadline and worker.poll() is None and not running_trial_runs(params, tune, paths):
        time.sleep(0.2)
    assert worker.poll() is None, "the worker ended before it could be killed"
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    [killed_run_id] = running_trial_runs(params, tune, paths)

    time.sleep(3)  # past the grace period, twice heartbeat_seconds
    tune_example(params, paths, tracker, progress=False)
    trials = load_study(params, tune, paths.root).trials
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]
    assert tracker.client.get_run(killed_run_id).info.status == "FAILED"


@pytest.mark.parametrize(
    "url, shown",
    [
        ("postgresql://tuner:secret@127.0.0.1:9/sweeps", "postgresql://tuner:***@127.0.0.1:9/sweeps"),
        ("sqlite:////nonexistent-folder/optuna.db", "sqlite:////nonexistent-folder/optuna.db"),
        ("not a url", "not a url"),
    ],
)
def test_an_unreachable_storage_fails_at_once_naming_it(url, shown):
    started = time.perf_counter()
    with pytest.raises(PipelineError) as error:
        open_storage(url, heartbeat_seconds=10)
    assert shown in str(error.value) and "secret" not in str(error.value)
    assert time.perf_counter() - started < 30


def test_continuing_a_named_study_with_other_settings_is_refused(toy, tracker):
    _, paths, _ = toy
    tune_example(sweep_params("toy.tune.study=mine", "toy.tune.trials=1")[0], paths, tracker, progress=False)
    with pytest.raises(PipelineError, match="study 'mine' was made with other"):
        tune_example(sweep_params("toy.tune.study=mine", "toy.tune.max_steps=30")[0], paths, tracker, progress=False)


def test_an_edit_to_the_trials_code_names_a_new_study(tmp_path, monkeypatch):
    """DVC re-runs the sweep after such an edit: it must not report the trials the old code ran."""
    from pipeline.tuning.storage import PACKAGE, TRIAL_CODE, code_digest, study_name

    for name in TRIAL_CODE:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes((PACKAGE / name).read_bytes())
    assert code_digest(tmp_path) == code_digest()
    (tmp_path / "optim.py").write_text((tmp_path / "optim.py").read_text() + "# an edit\n")
    assert code_digest(tmp_path) != code_digest()
    params, tune = sweep_params()
    before = study_name(params, tune, "toy")
    monkeypatch.setattr("pipeline.tuning.storage.code_digest", lambda: code_digest(tmp_path))
    assert study_name(params, tune, "toy") != before
