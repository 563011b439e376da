import itertools
from types import SimpleNamespace

import pytest
import torch
from optuna.trial import TrialState

from pipeline.evaluation import valid_mass
from pipeline.model import build_model
from pipeline.records import EvalRecord
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


def test_hopeless_trials_are_pruned_and_only_before_their_last_step(swept):
    _, tune, *_, study = swept
    pruned = study.get_trials(states=(TrialState.PRUNED,))
    assert pruned and all(max(t.intermediate_values) < tune.max_steps for t in pruned)


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
        assert run.data.params["resolved.autocast_dtype"] == "float32"  # the toy pins float32
        assert run.data.params["resolved.newton_schulz_dtype"] == "float32"
        val_losses = tracker.client.get_metric_history(run.info.run_id, "val_loss")
        assert [m.step for m in val_losses] == sorted(trial.intermediate_values)


def test_the_toy_sweep_minimises_the_chance_of_sampling_a_non_word(swept):
    *_, tune, _, tracker, study = swept
    assert tune.objective == "invalid_mass"
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert complete
    for trial in complete:
        metrics = tracker.client.get_run(trial.user_attrs["mlflow_run_id"]).data.metrics
        assert trial.value == pytest.approx(metrics["final_invalid_mass"]) and 0 < trial.value < 1
        assert trial.user_attrs["val_loss"] == pytest.approx(metrics["final_val_loss"]) != trial.value
        assert all(0 < v < 1 for v in trial.intermediate_values.values())


@pytest.mark.parametrize("objective", ["val_loss", "invalid_mass"])
def test_each_objective_is_measured_on_the_model_being_trained(objective, toy):
    params, _, dataset = toy
    _, tune = sweep_params(f"toy.tune.objective={objective}")
    model = build_model(params.model, dataset.vocab.size, params.train.seed).train()
    measure = sweep.objective_measure(SimpleNamespace(tune=tune, params=params), model, dataset, torch.device("cpu"))
    record = EvalRecord(step=10, train_loss=2.0, val_loss=2.5)
    if objective == "val_loss":
        assert measure(record) == 2.5
    else:
        mass = valid_mass(model.eval(), dataset.vocab, dataset.words, 1.0, torch.device("cpu"))
        model.train()
        assert measure(record) == pytest.approx(1 - mass)
    assert model.training  # training goes on after the measurement


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


def test_a_trial_that_reaches_its_last_step_completes_however_it_scores(toy, tracker):
    _, paths, _ = toy
    params, tune = sweep_params("toy.tune.trials=3", "toy.tune.eval_interval=20", PRUNE_HARD)
    assert tune.eval_interval == tune.max_steps  # the one report is the last step's
    tune_example(params, paths, tracker, progress=False)
    trials = load_study(params, tune, paths.root).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3
    assert any(t.value > trials[0].value for t in trials[1:])  # worse than the baseline: prunable before


def test_cpu_workers_stay_on_the_cpu():
    assert worker_device("cpu", 3) == torch.device("cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_workers_take_the_gpus_round_robin():
    count = torch.cuda.device_count()
    assert [worker_device("auto", i) for i in range(2 * count)] == [
        torch.device("cuda", i % count) for i in range(2 * count)
    ]


def test_the_study_names_its_objective_for_the_dashboard(swept):
    _, tune, *_, study = swept
    assert study.metric_names == [tune.objective] and tune.objective in ("val_loss", "invalid_mass")


def test_a_trial_whose_model_cannot_fit_fails_alone_before_its_run(project, empty_store, capsys):
    """A head size of 32768 makes a model of some 10^11 parameters: no machine holds it; the sweep goes on."""
    import shutil

    from pipeline.data import prepare
    from pipeline.paths import ExamplePaths
    from pipeline.tracking import Tracker

    shutil.copy(empty_store, project / "mlflow.db")
    space = "toy.tune.space={n_head: {choices: [2]}, head_size: {choices: [16, 32768]}}"
    params, tune = sweep_params(space, "toy.tune.sampler={kind: random}")
    paths = ExamplePaths(project, "toy")
    prepare(params.data, paths)
    tune_example(params, paths, Tracker.for_project(project), progress=False)
    trials = load_study(params, tune, project).get_trials()
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert failed and all(t.params["head_size"] == 32768 for t in failed)
    assert all(t.state == TrialState.COMPLETE for t in trials if t.params["head_size"] == 16)
    for trial in failed:
        assert "mlflow_run_id" not in trial.user_attrs  # refused before its MLflow run started
        assert f"trial {trial.number} (n_head=2, head_size=32768) needs about " in trial.user_attrs["error"]
        assert "free: lower the high ends of toy.tune.space" in trial.user_attrs["error"]
    printed = capsys.readouterr().out
    assert all(f"trial {t.number}: fail in " in printed for t in failed)
