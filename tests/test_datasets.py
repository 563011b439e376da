"""pipeline/datasets.py: the prepared data logged as a run's input dataset."""

import json

from pipeline import datasets
from pipeline.files import read_json


def test_log_dataset_names_the_prepared_data(store):
    tracker, run_id, _, meta_path = store
    datasets.log_dataset(tracker, run_id, meta_path)
    (logged,) = tracker.client.get_run(run_id).inputs.dataset_inputs
    meta, dataset = read_json(meta_path), logged.dataset
    assert (dataset.name, dataset.source_type) == ("shakespeare", "local")
    assert json.loads(dataset.source) == {"uri": "data/shakespeare/input.txt"}
    assert dataset.digest == datasets.dataset_digest(meta) and len(dataset.digest) == 16
    profile = json.loads(dataset.profile)
    assert (profile["train_tokens"], profile["val_tokens"]) == (meta["train_tokens"], meta["val_tokens"])
    assert (profile["train_sha256"], profile["val_sha256"]) == (meta["sha256"]["train"], meta["sha256"]["val"])
    assert profile["source_sha256"] == meta["source"]["sha256"]
    assert {t.key: t.value for t in logged.tags} == {"mlflow.data.context": "training"}
    other = meta | {"sha256": meta["sha256"] | {"val": "0" * 64}}
    assert datasets.dataset_digest(other) != dataset.digest  # another split is another dataset
