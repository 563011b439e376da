"""The `compare` command: MLflow runs side by side as a pandas table."""

import pandas as pd

from pipeline.errors import PipelineError
from pipeline.tracking import Tracker

SUMMARY_COLUMNS = {
    "tags.example": "example",
    "experiment": "experiment",
    "tags.mlflow.runName": "run",
    "params.model.n_layer": "n_layer",
    "params.model.n_head": "n_head",
    "params.model.n_embd": "n_embd",
    "params.model.block_size": "block",
    "params.train.learning_rate": "lr",
    "params.train.max_steps": "steps",
    "params.train.batch_size": "batch",
    "metrics.eval.train.loss": "train_loss",
    "metrics.eval.val.loss": "val_loss",
    "metrics.eval.val.bpc": "val_bpc",
    "metrics.eval.words.valid_share": "valid_words",
    "metrics.eval.words.valid_mass": "valid_mass",
    "metrics.final_val_loss": "final_val_loss",  # sweep trials have this, not the evaluate stage's
    "metrics.train_seconds": "seconds",
    "run_id": "run_id",
}


def runs_table(tracker: Tracker, example: str | None = None, experiment: str | None = None) -> pd.DataFrame:
    """One row per run with its key parameters and final metrics, best validation loss first."""
    experiments = tracker.experiment_names()
    if experiment is not None:
        experiments = {i: n for i, n in experiments.items() if n == experiment}
        if not experiments:
            raise PipelineError(f"no MLflow experiment named '{experiment}' in {tracker.uri}")
    filter_string = f"tags.example = '{example}'" if example else ""
    runs = tracker.search_runs(list(experiments), filter_string)
    rows = []
    for run in runs:
        row = {"run_id": run.info.run_id, "experiment": experiments[run.info.experiment_id]}
        row |= {f"tags.{k}": v for k, v in run.data.tags.items()}
        row |= {f"params.{k}": v for k, v in run.data.params.items()}
        row |= {f"metrics.{k}": v for k, v in run.data.metrics.items()}
        rows.append(row)
    table = pd.DataFrame(rows, columns=list(SUMMARY_COLUMNS)).rename(columns=SUMMARY_COLUMNS)
    return table.sort_values("val_loss", na_position="last").reset_index(drop=True)
