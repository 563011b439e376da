"""pipeline/logged_models.py: logged models linked to their run, with metrics and sampling params."""

import os

import mlflow

from pipeline import logged_models
from pipeline.schema import SampleParams
from tests.model_helpers import model_folder


def test_logged_model_is_linked_to_its_run_with_metrics(store):
    tracker, run_id, checkpoint, _ = store
    tracker.log_metrics(run_id, {"val_loss": 3.9}, step=20)  # the train stage's last evaluation
    sample = SampleParams(prompts=["ROMEO"], num_samples=2, max_new_tokens=30, temperature=0.7, top_k=None, seed=5)
    before = os.environ.get("MLFLOW_TRACKING_URI"), mlflow.get_tracking_uri()
    ref = logged_models.log_model(tracker, run_id, checkpoint, {"eval.val.loss": 3.5}, sample=sample)
    assert (os.environ.get("MLFLOW_TRACKING_URI"), mlflow.get_tracking_uri()) == before  # MLflow's global, restored
    assert ref.uri == f"models:/{ref.model_id}"
    model = tracker.client.get_logged_model(ref.model_id)
    assert (model.status, model.source_run_id, model.name) == ("READY", run_id, "model")
    assert model.params["model.n_layer"] == "1"  # the run's params
    metrics = {m.key: m.value for m in model.metrics}
    assert metrics["eval.val.loss"] == 3.5 and metrics["val_loss"] == 3.9  # given, and the run's at the step
    assert [(o.model_id, o.step) for o in tracker.client.get_run(run_id).outputs.model_outputs] == [(ref.model_id, 20)]
    assert logged_models.latest_model_id(tracker, run_id) == ref.model_id
    params = mlflow.models.Model.load(model_folder(tracker, ref.model_id)).signature.params
    assert {p.name: p.default for p in params.params} == {
        "max_new_tokens": 30,
        "temperature": 0.7,
        "top_k": 0,
        "num_samples": 2,
        "seed": 5,
    }
