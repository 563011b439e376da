"""run.json: which MLflow run trained an example's model, and which logged model it became.

The train stage writes it; evaluate, sample, inspect and register read it to log into that run.
"""

from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.files import read_json, write_json
from pipeline.paths import shown_path
from pipeline.tracking import Tracker


def save_run_info(path: Path, tracker: Tracker, run_id: str, model_id: str | None = None) -> None:
    """run.json: the run a model was trained in, and its MLflow logged model once there is one."""
    write_json(path, {"run_id": run_id, "tracking_uri": tracker.uri} | ({"model_id": model_id} if model_id else {}))


def load_run_id(path: Path, tracker: Tracker, trained_in: str | None = None) -> str:
    """The run a model was trained in, checked to exist in this store and, when the checkpoint names
    the run that trained it (`trained_in`), to be that run."""
    info = read_json(path)
    if trained_in and info.get("run_id") != trained_in:
        checkpoint = shown_path(path.parent / "ckpt.pt")
        raise PipelineError(
            f"{checkpoint} was trained in run {trained_in}, but {path.name} names run {info.get('run_id')}: "
            "run train again"
        )
    if not isinstance(info.get("run_id"), str) or tracker.run_status(info["run_id"]) is None:
        raise PipelineError(
            f"{path} names MLflow run {info.get('run_id')!r} (store {info.get('tracking_uri')}), which is not in "
            f"{tracker.uri}: train again, or point MLFLOW_TRACKING_URI at that store"
        )
    return info["run_id"]
