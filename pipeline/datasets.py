"""The data a run trained on, logged as its MLflow input dataset: the UI's *Dataset* column."""

import hashlib
import json
from pathlib import Path

from mlflow.entities import Dataset, DatasetInput, InputTag
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

from pipeline.errors import PipelineError
from pipeline.files import read_json
from pipeline.tracking import Tracker

DIGEST_LENGTH = 16  # MLflow stores at most 36 characters of a dataset digest


def dataset_digest(meta: dict) -> str:
    """Short hash of both token files' SHA-256 in meta.json: one digest per prepared split."""
    hashes = meta.get("sha256") or {}
    if not {"train", "val"} <= set(hashes):
        raise PipelineError("meta.json has no sha256 of its token files: prepare again")
    return hashlib.sha256(f"{hashes['train']}:{hashes['val']}".encode()).hexdigest()[:DIGEST_LENGTH]


def log_dataset(tracker: Tracker, run_id: str, meta_path: Path, context: str = "training") -> Dataset:
    """Log the prepared data (meta.json) as the run's input dataset: name, source, digest, split sizes."""
    meta = read_json(meta_path)
    source = meta.get("source", {})
    profile = {
        "train_tokens": meta["train_tokens"],
        "val_tokens": meta["val_tokens"],
        "vocab_size": meta["vocab_size"],
        "source_sha256": source.get("sha256"),
        "train_sha256": meta["sha256"]["train"],
        "val_sha256": meta["sha256"]["val"],
    }
    dataset = Dataset(
        name=meta.get("example") or Path(meta_path).parent.parent.name,
        digest=dataset_digest(meta),
        source_type="local",
        source=json.dumps({"uri": source.get("path") or str(meta_path)}),  # what mlflow.data's local source writes
        profile=json.dumps(profile),
    )
    tracker.client.log_inputs(run_id, [DatasetInput(dataset, [InputTag(MLFLOW_DATASET_CONTEXT, context)])])
    return dataset
