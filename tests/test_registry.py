"""pipeline/registry.py: logged models linked to their run with metrics, their data, registry aliases."""

import json
import os

import mlflow
import pytest

from pipeline import registry
from pipeline.files import read_json
from pipeline.schema import SampleParams
from tests.model_helpers import model_folder, model_store, shakespeare, training_run


@pytest.fixture(scope="module")
def store(trained_project, empty_store, tmp_path_factory):
    """A store of this module's own, a training run in it, and the trained shakespeare files."""
    tracker = model_store(tmp_path_factory.mktemp("registry"), empty_store)
    return tracker, training_run(tracker), *shakespeare(trained_project[0])


@pytest.fixture
def global_store(store, monkeypatch):
    """`models:/` URIs resolve through MLflow's global tracking URI: point it at the module's store."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store[0].uri)


def test_logged_model_is_linked_to_its_run_with_metrics(store):
    tracker, run_id, checkpoint, _ = store
    tracker.log_metrics(run_id, {"val_loss": 3.9}, step=20)  # the train stage's last evaluation
    sample = SampleParams(prompts=["ROMEO"], num_samples=2, max_new_tokens=30, temperature=0.7, top_k=None, seed=5)
    before = os.environ.get("MLFLOW_TRACKING_URI"), mlflow.get_tracking_uri()
    ref = registry.log_model(tracker, run_id, checkpoint, {"eval.val.loss": 3.5}, sample=sample)
    assert (os.environ.get("MLFLOW_TRACKING_URI"), mlflow.get_tracking_uri()) == before  # MLflow's global, restored
    assert ref.uri == f"models:/{ref.model_id}"
    model = tracker.client.get_logged_model(ref.model_id)
    assert (model.status, model.source_run_id, model.name) == ("READY", run_id, "model")
    assert model.params["model.n_layer"] == "1"  # the run's params
    metrics = {m.key: m.value for m in model.metrics}
    assert metrics["eval.val.loss"] == 3.5 and metrics["val_loss"] == 3.9  # given, and the run's at the step
    assert [(o.model_id, o.step) for o in tracker.client.get_run(run_id).outputs.model_outputs] == [(ref.model_id, 20)]
    assert registry.latest_model_id(tracker, run_id) == ref.model_id
    params = mlflow.models.Model.load(model_folder(tracker, ref.model_id)).signature.params
    assert {p.name: p.default for p in params.params} == {
        "max_new_tokens": 30,
        "temperature": 0.7,
        "top_k": 0,
        "num_samples": 2,
        "seed": 5,
    }


def test_register_moves_the_alias_only_to_a_better_model(store, global_store):
    tracker, run_id, checkpoint, _ = store
    name = "chargpt-test-aliases"
    first, second = (registry.log_model(tracker, run_id, checkpoint).model_id for _ in range(2))
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
    model_id = registry.log_model(tracker, run_id, checkpoint).model_id
    assert registry.register(tracker, name, model_id, run_id, 3.0) == ("2", True)
    mlflow.pyfunc.load_model(f"models:/{name}@champion")


def test_log_dataset_names_the_prepared_data(store):
    tracker, run_id, _, meta_path = store
    registry.log_dataset(tracker, run_id, meta_path)
    (logged,) = tracker.client.get_run(run_id).inputs.dataset_inputs
    meta, dataset = read_json(meta_path), logged.dataset
    assert (dataset.name, dataset.source_type) == ("shakespeare", "local")
    assert json.loads(dataset.source) == {"uri": "data/shakespeare/input.txt"}
    assert dataset.digest == registry.dataset_digest(meta) and len(dataset.digest) == 16
    profile = json.loads(dataset.profile)
    assert (profile["train_tokens"], profile["val_tokens"]) == (meta["train_tokens"], meta["val_tokens"])
    assert (profile["train_sha256"], profile["val_sha256"]) == (meta["sha256"]["train"], meta["sha256"]["val"])
    assert profile["source_sha256"] == meta["source"]["sha256"]
    assert {t.key: t.value for t in logged.tags} == {"mlflow.data.context": "training"}
    other = meta | {"sha256": meta["sha256"] | {"val": "0" * 64}}
    assert registry.dataset_digest(other) != dataset.digest  # another split is another dataset
