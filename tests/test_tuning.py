import itertools
import os
import signal
import subprocess
import sys
import time

import optuna
import pytest
import torch
import yaml
from optuna.trial import TrialState

from pipeline import tuning
from pipeline.cli import main
from pipeline.config import load_params
from pipeline.errors import PipelineError
from pipeline.model import ModelConfig
from pipeline.tuning import (
    apply_values,
    baseline_values,
    check_space,
    open_storage,
    storage_url,
    study_name,
    suggest,
    tune_example,
    worker_device,
)
from tests.conftest import ROOT, TINY, tiny_params

SPACE = (
    "{n_layer: {low: 1, high: 2}, n_head: {choices: [1, 2]}, head_size: {choices: [8, 16]},"
    " learning_rate: {low: 1.0e-6, high: 2.0e-2, log: true}}"
)
TUNE = [
    "toy.model.n_head=2",
    "toy.model.n_embd=32",
    "toy.train.learning_rate=1.0e-2",
    "toy.train.warmup_steps=2",
    "toy.tune.trials=4",
    "toy.tune.max_steps=20",
    "toy.tune.eval_interval=5",
    f"toy.tune.space={SPACE}",
    "toy.tune.heartbeat_seconds=1",
    "toy.tune.register_as=chargpt-test",
]
# the baseline learns well; most draws of a learning rate near 1e-6 do not, and are pruned
PRUNE_HARD = "toy.tune.pruner={kind: median, startup_trials: 1, warmup_steps: 0}"


def tune_params(*extra):
    return tiny_params("toy", *TUNE, *extra)


def load_study(params, paths):
    return optuna.load_study(study_name=study_name(params, "toy"), storage=storage_url(params.tune, paths.root))


def children(tracker, parent_run_id):
    experiment = tracker.client.get_experiment_by_name("toy-tune")
    return tracker.client.search_runs([experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}'")


@pytest.fixture(autouse=True)
def local_tracking(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def test_sweep_prunes_tracks_children_registers_and_continues(toy, tracker):
    _, paths, _ = toy
    params = tune_params(PRUNE_HARD)
    tune_example(params, paths, tracker, progress=False)

    study = load_study(params, paths)
    trials = study.get_trials()
    assert [t.number for t in trials] == [0, 1, 2, 3]
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    assert any(t.state == TrialState.PRUNED for t in trials)
    assert trials[0].user_attrs["baseline"] and trials[0].params == baseline_values(params)

    parent_id = study.user_attrs["mlflow_parent_run_id"]
    parent = tracker.client.get_run(parent_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["best_val_loss"] == pytest.approx(study.best_value)
    assert parent.data.tags["best.trial"] == str(study.best_trial.number)
    assert {"history.png", "parallel.png", "importances.png", "best_params.yaml"} <= {
        a.path for a in tracker.client.list_artifacts(parent_id)
    }
    runs = {run.info.run_id: run for run in children(tracker, parent_id)}
    assert set(runs) == {t.user_attrs["mlflow_run_id"] for t in trials}
    for trial in trials:
        run = runs[trial.user_attrs["mlflow_run_id"]]
        assert run.info.status == "FINISHED"
        assert run.data.tags["optuna.trial_state"] == trial.state.name
        assert run.data.params["model.n_layer"] == str(trial.params["n_layer"])
        val_losses = tracker.client.get_metric_history(run.info.run_id, "val_loss")
        assert [m.step for m in val_losses] == sorted(trial.intermediate_values)

    metrics = yaml.safe_load(paths.tune_metrics.read_text())
    assert metrics["trials"] == 4 and metrics["trials_pruned"] >= 1
    assert metrics["best_val_loss"] == pytest.approx(study.best_value)
    best = yaml.safe_load((paths.tune_dir / "best_params.yaml").read_text())
    model = best["toy"]["model"]
    assert model["n_embd"] == study.best_params["n_head"] * study.best_params["head_size"]
    overrides = [f"toy.{section}.{k}={v}" for section, values in best["toy"].items() for k, v in values.items()]
    assert load_params(ROOT / "params.yaml", overrides)["toy"].model.n_layer == study.best_params["n_layer"]

    champion = tracker.client.get_model_version_by_alias("chargpt-test", "champion")
    assert champion.run_id == study.best_trial.user_attrs["mlflow_run_id"]

    tune_example(params, paths, tracker, progress=False)  # finished: nothing to add
    assert len(load_study(params, paths).trials) == 4
    assert len(children(tracker, parent_id)) == 4

    more = tune_params(PRUNE_HARD, "toy.tune.trials=6")
    tune_example(more, paths, tracker, progress=False)
    trials = load_study(more, paths).trials
    assert [t.number for t in trials] == list(range(6))
    assert all(t.state.is_finished() for t in trials)
    assert len(children(tracker, parent_id)) == 6
    assert len(tracker.client.search_model_versions("name = 'chargpt-test'")) >= 1


def test_a_diverging_trial_fails_and_the_sweep_goes_on(toy, tracker, monkeypatch):
    _, paths, _ = toy
    params = tune_params("toy.tune.trials=3", "toy.tune.pruner={kind: none}")
    build, built = tuning.build_model, itertools.count()

    def first_model_diverges(*args):
        """Fault injection: the first trial's logits turn NaN after 5 steps."""
        model, passes, poisoned = build(*args), itertools.count(1), next(built) == 0
        model.lm_head.register_forward_hook(
            lambda module, inputs, out: (
                out * float("nan") if poisoned and module.training and next(passes) > 5 else None
            )
        )
        return model

    monkeypatch.setattr(tuning, "build_model", first_model_diverges)
    tune_example(params, paths, tracker, progress=False)
    trials = load_study(params, paths).trials
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    assert "training diverged: loss is nan at step 6" in trials[0].user_attrs["error"]
    failed_run = tracker.client.get_run(trials[0].user_attrs["mlflow_run_id"])
    assert failed_run.info.status == "FAILED" and failed_run.data.tags["optuna.trial_state"] == "FAIL"


def check_parallel_sweep(params, paths, tracker, total):
    tune_example(params, paths, tracker, progress=False)
    study = load_study(params, paths)
    trials = study.get_trials()
    assert sorted(t.number for t in trials) == list(range(total))
    assert all(t.state.is_finished() for t in trials)
    run_ids = [t.user_attrs["mlflow_run_id"] for t in trials]
    assert len(set(run_ids)) == total
    assert {r.info.run_id for r in children(tracker, study.user_attrs["mlflow_parent_run_id"])} == set(run_ids)


def test_two_workers_on_the_embedded_storage_run_exactly_the_total(toy, tracker):
    _, paths, _ = toy
    check_parallel_sweep(tune_params("toy.tune.workers=2", "toy.tune.trials=5"), paths, tracker, 5)


def test_two_workers_share_a_postgresql_study(toy, tracker, postgres_url):
    _, paths, _ = toy
    params = tune_params("toy.tune.workers=2", "toy.tune.trials=5", f"toy.tune.storage={postgres_url}")
    check_parallel_sweep(params, paths, tracker, 5)


def running_trials(params, paths) -> int:
    try:
        return sum(t.state == TrialState.RUNNING for t in load_study(params, paths).trials)
    except KeyError:  # the study is not created yet
        return 0


def test_a_killed_workers_trial_is_marked_failed_and_the_sweep_continues(toy, tracker):
    _, paths, _ = toy
    extra = ["toy.tune.trials=2", "toy.tune.max_steps=1500", "toy.tune.pruner={kind: none}"]
    params = tune_params(*extra)
    command = [sys.executable, "-m", "pipeline", "tune", "--example", "toy", "--params", str(ROOT / "params.yaml")]
    for override in TINY["toy"] + TUNE + extra:
        command += ["--set", override]
    worker = subprocess.Popen(command, cwd=paths.root, env=os.environ | {"PYTHONPATH": str(ROOT)})
    deadline = time.time() + 120
    while time.time() < deadline and worker.poll() is None and not running_trials(params, paths):
        time.sleep(0.2)
    assert worker.poll() is None, "the worker ended before it could be killed"
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    assert running_trials(params, paths) == 1

    time.sleep(3)  # past the grace period, twice heartbeat_seconds
    tune_example(params, paths, tracker, progress=False)
    trials = load_study(params, paths).trials
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]
    killed_run = tracker.client.get_run(trials[0].user_attrs["mlflow_run_id"])
    assert killed_run.info.status == "FAILED"


@pytest.mark.parametrize(
    "override, message",
    [
        ("toy.tune.space.n_layer={low: 4, high: 2}", "empty range: low (4) is above high (2)"),
        ("toy.tune.space.n_head={choices: []}", "choices is empty"),
        ("toy.tune.space.learning_rate={low: 0.0, high: 1.0e-2, log: true}", "a log range needs low > 0"),
        ("toy.tune.space.dropout={low: 0.0, high: 1.5}", "dropout: values must be in [0.0, 1.0)"),
        ("toy.tune.space.n_layers={low: 1, high: 2}", "unknown key (did you mean 'n_layer'?)"),
        ("toy.tune.pruner.kind=medain", "toy.tune.pruner.kind: Input should be"),
        ("toy.tune.sampler.kind=cmaes", "toy.tune.sampler.kind: Input should be"),
        ("toy.tune.space={}", "the search space is empty"),
    ],
)
def test_bad_tune_params_are_refused_before_anything_is_written(override, message, toy, capsys, monkeypatch):
    _, paths, _ = toy
    monkeypatch.chdir(paths.root)
    before = sorted(paths.root.rglob("*"))
    code = main(["tune", "--example", "toy", "--params", str(ROOT / "params.yaml"), "--set", override])
    assert code == 2
    assert message in capsys.readouterr().err
    assert sorted(paths.root.rglob("*")) == before


@pytest.mark.parametrize(
    "extra, message",
    [
        (["toy.tune.space.learning_rate={low: 1.0e-4, high: 1.0e-3}"], "does not contain the params.yaml value"),
        (["toy.tune.space.head_size=null", "toy.tune.space.n_head={choices: [3, 5]}"], "no value in [3, 5] divides"),
        (["toy.tune.space.warmup_steps={low: 0, high: 50}"], "warmup_steps = 50 gives an invalid configuration"),
    ],
)
def test_a_space_that_cannot_hold_the_baseline_or_a_valid_model_is_refused(extra, message):
    with pytest.raises(PipelineError, match="tune.space") as error:
        check_space(tune_params(*extra))
    assert message in str(error.value)


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
    tune_example(tune_params("toy.tune.study=mine", "toy.tune.trials=1"), paths, tracker, progress=False)
    with pytest.raises(PipelineError, match="study 'mine' was made with other"):
        tune_example(tune_params("toy.tune.study=mine", "toy.tune.max_steps=30"), paths, tracker, progress=False)


@pytest.mark.parametrize("with_head_size", [True, False])
def test_every_suggested_configuration_is_a_valid_model(with_head_size):
    extra = [] if with_head_size else ["toy.tune.space.head_size=null", "toy.tune.space.n_head={low: 1, high: 8}"]
    params = tune_params(*extra)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(40):
        values = suggest(study.ask(), params.tune.space, params.model.n_embd)
        model = apply_values(params, values).model
        assert isinstance(model, ModelConfig) and model.n_embd % model.n_head == 0
        if with_head_size:
            assert model.n_embd == values["n_head"] * values["head_size"]
        else:
            assert model.n_embd == params.model.n_embd


def test_cpu_workers_stay_on_the_cpu():
    assert worker_device("cpu", 3) == torch.device("cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_workers_take_the_gpus_round_robin():
    count = torch.cuda.device_count()
    assert [worker_device("auto", i) for i in range(2 * count)] == [
        torch.device("cuda", i % count) for i in range(2 * count)
    ]
