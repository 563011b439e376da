import pytest
import yaml

from pipeline.config import load_params

from .helpers import ROOT


def test_the_parent_run_holds_the_best_trial_and_the_pictures(swept):
    _, tune, _, tracker, study = swept
    parent_id = study.user_attrs["mlflow_parent_run_id"]
    parent = tracker.client.get_run(parent_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics[f"best_{tune.objective}"] == pytest.approx(study.best_value)
    assert parent.data.tags["best.trial"] == str(study.best_trial.number)
    artifacts = {a.path for a in tracker.client.list_artifacts(parent_id)}
    assert {"history.png", "parallel.png", "importances.png", "best_params.yaml", "trials.csv"} <= artifacts


def test_the_metrics_file_counts_the_trials(swept):
    _, tune, paths, _, study = swept
    metrics = yaml.safe_load(paths.tune_metrics.read_text())
    assert metrics["trials"] == 4 and metrics["trials_pruned"] >= 1
    assert metrics[f"best_{tune.objective}"] == pytest.approx(study.best_value)
    assert {"history.png", "intermediate.png"} <= {p.name for p in paths.tune_plots.iterdir()}


def test_the_metrics_file_is_written_after_the_parent_run_ended(swept):
    # DVC deletes it before running the stage: a sweep killed before its run ended leaves it missing
    *_, paths, tracker, study = swept
    parent = tracker.client.get_run(study.user_attrs["mlflow_parent_run_id"])
    assert paths.tune_metrics.stat().st_mtime * 1000 >= parent.info.end_time


def test_every_trial_names_the_worker_that_ran_it(swept):
    *_, study = swept
    assert all(isinstance(t.user_attrs["worker_pid"], int) and t.user_attrs["worker_host"] for t in study.trials)


def test_best_params_apply_as_overrides(swept):
    *_, paths, _, study = swept
    best = yaml.safe_load((paths.tune_dir / "best_params.yaml").read_text())
    assert best["toy"]["model"]["n_embd"] == study.best_params["n_head"] * study.best_params["head_size"]
    overrides = [f"toy.{section}.{k}={v}" for section, values in best["toy"].items() for k, v in values.items()]
    assert load_params(ROOT / "params.yaml", overrides)["toy"].model.n_layer == study.best_params["n_layer"]


def test_the_best_trial_is_registered_as_the_champion(swept):
    *_, tracker, study = swept
    champion = tracker.client.get_model_version_by_alias("chargpt-test", "champion")
    assert champion.run_id == study.best_trial.user_attrs["mlflow_run_id"]
    # the registry compares models by validation loss, whatever the sweep minimised
    assert float(champion.tags["val_loss"]) == pytest.approx(study.best_trial.user_attrs["val_loss"], abs=1e-6)
