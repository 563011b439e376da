"""pipeline/registry.py: registered versions and the alias that moves only to a better model."""

import json

import mlflow

from pipeline import logged_models, registry


def test_register_moves_the_alias_only_to_a_better_model(store, global_store):
    tracker, run_id, checkpoint, _ = store
    name = "chargpt-test-aliases"
    first, second = (logged_models.log_model(tracker, run_id, checkpoint).model_id for _ in range(2))
    assert registry.register(tracker, name, first, run_id, 2.0) == ("1", True)
    assert registry.register(tracker, name, second, run_id, 2.5) == ("2", False)  # worse: the alias stays
    assert str(tracker.client.get_model_version_by_alias(name, "champion").version) == "1"
    assert registry.register(tracker, name, f"models:/{second}", run_id, 2.5) == ("2", False)  # once per model
    assert registry.register(tracker, name, second, run_id, 2.5, alias="latest", only_if_better=False) == ("2", True)
    assert registry.register(tracker, name, first, run_id, 2.0, alias=None) == ("1", False)
    assert len(tracker.client.search_model_versions(f"name = '{name}'")) == 2
    version = tracker.client.get_model_version_by_alias(name, "champion")
    assert version.source == f"models:/{first}" and version.tags["val_loss"] == "2.000000"
    linked = json.loads(tracker.client.get_logged_model(first).tags["mlflow.modelVersions"])
    assert [(v["name"], str(v["version"])) for v in linked] == [(name, "1")]  # the model page lists its version
    prediction = mlflow.pyfunc.load_model(f"models:/{name}@champion").predict(["ROMEO"], {"max_new_tokens": 3})
    assert len(prediction["completion"][0]) == 3


def test_a_champion_that_is_no_mlflow_model_gives_way(store, global_store):
    """A version registered before models were logged (a bare checkpoint folder) cannot be loaded: replace it."""
    tracker, run_id, checkpoint, _ = store
    name = "chargpt-test-legacy"
    tracker.client.create_registered_model(name)
    source = f"{tracker.client.get_run(run_id).info.artifact_uri}/checkpoint"
    legacy = tracker.client.create_model_version(name, source, run_id, tags={"val_loss": "0.100000"})
    tracker.client.set_registered_model_alias(name, "champion", legacy.version)
    model_id = logged_models.log_model(tracker, run_id, checkpoint).model_id
    assert registry.register(tracker, name, model_id, run_id, 3.0) == ("2", True)
    mlflow.pyfunc.load_model(f"models:/{name}@champion")
