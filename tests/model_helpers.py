"""Helpers of the MLflow model tests (test_served_model.py, test_logged_models.py, test_registry.py,
test_datasets.py): a store of their own."""

import shutil
import urllib.parse
from pathlib import Path

from pipeline.tracking import Tracker

SHAKESPEARE_PROMPTS = ["ROMEO", "JULIET:\nO"]


def model_store(folder: Path, empty_store: Path) -> Tracker:
    """A fresh store in `folder`, so that logged and registered models do not reach other tests' runs."""
    shutil.copy(empty_store, folder / "mlflow.db")
    return Tracker.for_project(folder)


def training_run(tracker: Tracker, example: str = "shakespeare") -> str:
    return tracker.start_run(example, example, {"example": example}, {"model.n_layer": 1})


def model_folder(tracker: Tracker, model_id: str) -> Path:
    """The local folder of a logged model's files (the stores of these tests keep artifacts on disk)."""
    location = tracker.client.get_logged_model(model_id).artifact_location
    return Path(urllib.parse.urlparse(location).path)


def shakespeare(trained_root: Path) -> tuple[Path, Path]:
    """The trained checkpoint and the prepared meta.json of the shakespeare example."""
    return (
        trained_root / "models" / "shakespeare" / "ckpt.pt",
        trained_root / "data" / "shakespeare" / "prepared" / "meta.json",
    )
