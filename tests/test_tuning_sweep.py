import itertools

import pytest
import torch
from optuna.trial import TrialState

from pipeline.stages.tune import tune_example
from pipeline.tuning import sweep
from pipeline.tuning.space import baseline_values
from pipeline.tuning.sweep import worker_device

from .helpers import PRUNE_HARD, child_runs, load_study, sweep_params


@pytest.fixture(autouse=True)
def local_tracking(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def test_the_sweep_runs_exactly_the_queued_trials_baseline_first(swept):
    params, tune, _, _, study = swept
    trials = study.get_trials()
    assert [t.number for t in trials] == [0, 1, 2, 3]
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    assert trials[0].user_attrs["baseline"] and trials[0].params == baseline_values(params, tune.space)


def test_hopeless_trials_are_pruned(swept):
    *_, study = swept
    assert any(t.state == TrialState.PRUNED for t in study.get_trials())


def test_each_trial_is_a_finished_child_run_with_its_params_and_curve(swept):
    *_, tracker, study = swept
    trials = study.get_trials()
    runs = {run.info.run_id: run for run in child_runs(tracker, study.user_attrs["mlflow_parent_run_id"])}
    assert set(runs) == {t.user_attrs["mlflow_run_id"] for t in trials}
    for trial in trials:
        run = runs[trial.user_attrs["mlflow_run_id"]]
        assert run.info.status == "FINISHED"
        assert run.data.tags["optuna.trial_state"] == trial.state.name
        assert run.data.params["model.n_layer"] == str(trial.params["n_layer"])
        val_losses = tracker.client.get_metric_history(run.info.run_id, "val_loss")
        assert [m.step for m in val_losses] == sorted(trial.intermediate_values)


def test_a_finished_sweep_adds_nothing_and_more_trials_continue_it(toy, tracker):
    _, paths, _ = toy
    params, tune = sweep_params(PRUNE_HARD)
    tune_example(params, paths, tracker, progress=False)
    parent_id = load_study(params, tune, paths.root).user_attrs["mlflow_parent_run_id"]

    tune_example(params, paths, tracker, progress=False)
    assert len(load_study(params, tune, paths.root).trials) == 4
    assert len(child_runs(tracker, parent_id)) == 4

    more, more_tune = sweep_params(PRUNE_HARD, "toy.tune.trials=6")
    tune_example(more, paths, tracker, progress=False)
    trials = load_study(more, more_tune, paths.root).trials
    assert [t.number for t in trials] == list(range(6))
    assert all(t.state.is_finished() for t in trials)
    assert len(child_runs(tracker, parent_id)) == 6


def test_a_diverging_trial_fails_and_the_sweep_goes_on(toy, tracker, monkeypatch):
    _, paths, _ = toy
    params, tune = sweep_params("toy.tune.trials=3", "toy.tune.pruner={kind: none}")
    build, built = sweep.build_model, itertools.count()

    def first_model_diverges(*args):
        """Fault injection: the first trial's logits turn NaN after 5 steps."""
        model, passes, poisoned = build(*args), itertools.count(1), next(built) == 0
        model.lm_head.register_forward_hook(
            lambda module, inputs, out: (
                out * float("nan") if poisoned and module.training and next(passes) > 5 else None
            )
        )
        return model

    monkeypatch.setattr(sweep, "build_model", first_model_diverges)
    tune_example(params, paths, tracker, progress=False)
    trials = load_study(params, tune, paths.root).trials
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    assert "training diverged: loss is nan at step 6" in trials[0].user_attrs["error"]
    failed_run = tracker.client.get_run(trials[0].user_attrs["mlflow_run_id"])
    assert failed_run.info.status == "FAILED" and failed_run.data.tags["optuna.trial_state"] == "FAIL"


def test_cpu_workers_stay_on_the_cpu():
    assert worker_device("cpu", 3) == torch.device("cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_workers_take_the_gpus_round_robin():
    count = torch.cuda.device_count()
    assert [worker_device("auto", i) for i in range(2 * count)] == [
        torch.device("cuda", i % count) for i in range(2 * count)
    ]
