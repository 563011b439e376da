"""The register command (not a DVC stage): the model of an example's current run becomes a version
of the registered model `chargpt-<example>`, with an alias."""

from pipeline.checkpoint import load_checkpoint
from pipeline.errors import PipelineError
from pipeline.files import read_json
from pipeline.locks import writes_example
from pipeline.logged_models import latest_model_id
from pipeline.paths import ExamplePaths
from pipeline.registry import model_name, register
from pipeline.run_info import load_run_id
from pipeline.schema import ExampleParams
from pipeline.tracking import Tracker


@writes_example  # one writer per example: a second one stops at once
def register_example(
    params: ExampleParams, paths: ExamplePaths, tracker: Tracker | None = None, *, alias: str | None = None
) -> tuple[str, bool]:
    """Register the model of models/<example>/run.json; `champion` moves only to a better model, an
    alias given by name moves to it in any case. Returns the version and whether it holds the alias."""
    tracker = tracker or Tracker.for_project()
    checkpoint = load_checkpoint(paths.checkpoint)
    run_id = load_run_id(paths.run_info, tracker, trained_in=checkpoint.run_id)
    model_id = read_json(paths.run_info).get("model_id") or latest_model_id(tracker, run_id)
    val_loss = tracker.run_metrics(run_id).get("final_val_loss")
    if model_id is None or val_loss is None:
        raise PipelineError(f"MLflow run {run_id} has no finished model: run train again")
    name = model_name(paths.example)
    version, holds = register(tracker, name, model_id, run_id, val_loss, alias or "champion", alias is None)
    shown = f"@{alias or 'champion'}" if holds else f"not @champion (it holds a lower val loss than {val_loss:.4f})"
    print(f"{paths.example}: run {run_id} is {name} version {version}, {shown}; load it as models:/{name}/{version}")
    return version, holds
