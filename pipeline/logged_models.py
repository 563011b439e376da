"""Kept models as MLflow 3 logged models of their runs, with the metrics that describe them.

A model is logged "from code" (pipeline/served_model.py, with the `pipeline` package in its
`code/` folder) and a weights-only copy of its checkpoint: nothing in it is pickled.
"""

import dataclasses
import importlib.metadata
import tempfile
import time
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.entities import Metric
from mlflow.models import Model, ModelSignature
from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema

from pipeline import served_model
from pipeline.checkpoint import Checkpoint, checkpoint_state, load_checkpoint
from pipeline.files import save_torch
from pipeline.tracking import Tracker, global_tracking_uri

CODE_FILE = Path(served_model.__file__)
PACKAGE = CODE_FILE.parent  # the `pipeline` package, carried in the model's code/ folder
REQUIREMENTS = ("mlflow", "torch", "numpy", "pandas", "pydantic", "pyyaml", "tqdm")  # what `pipeline` imports


@dataclasses.dataclass
class LoggedModelRef:
    model_id: str
    uri: str  # models:/<model_id>


def signature(defaults: dict) -> ModelSignature:
    """A string column of prompts in; prompt, sample number and completion out; the sampling params."""
    kind = {int: DataType.long, float: DataType.double}
    params = [ParamSpec(name, kind[type(value)], value) for name, value in defaults.items()]
    return ModelSignature(
        inputs=Schema([ColSpec(DataType.string)]),  # unnamed: a list of prompts, or any one-column DataFrame
        outputs=Schema(
            [
                ColSpec(DataType.string, "prompt"),
                ColSpec(DataType.long, "sample"),
                ColSpec(DataType.string, "completion"),
            ]
        ),
        params=ParamSchema(params),
    )


def param_defaults(sample=None) -> dict:
    """PARAM_DEFAULTS, with the values of an example's `sample` params (SampleParams) if given."""
    given = {k: getattr(sample, k) for k in served_model.PARAM_DEFAULTS} if sample is not None else {}
    defaults = served_model.PARAM_DEFAULTS | {k: v for k, v in given.items() if v is not None}
    return {k: type(served_model.PARAM_DEFAULTS[k])(v) for k, v in defaults.items()}


def _weights_file(checkpoint_path: Path, folder: Path) -> tuple[Path, Checkpoint]:
    """A copy of the checkpoint without the optimizer state, which serving does not need."""
    checkpoint = load_checkpoint(checkpoint_path)
    path = folder / "weights.pt"
    save_torch(
        path, checkpoint_state(checkpoint.model, {}, checkpoint.vocab, checkpoint.step, checkpoint.best_val_loss)
    )
    return path, checkpoint


def log_model(
    tracker: Tracker,
    run_id: str,
    checkpoint_path: Path,
    metrics: dict[str, float] | None = None,
    step: int | None = None,
    sample=None,
    prompts: list[str] | None = None,
    name: str = "model",
    word_list: bool = False,
) -> LoggedModelRef:
    """Log the checkpoint as an MLflow logged model of run `run_id` at `step` (default: the checkpoint's).

    MLflow links the run's metrics of that step to the model; `metrics` are logged to both at that step
    (pass only new ones, e.g. eval metrics). `sample` (the example's SampleParams) sets the params'
    defaults; the first two of `prompts` make the input example (default: one letter of the vocabulary).
    `word_list`: the model completes words of a word list (data.kind words), read as the sample stage does.
    """
    run = tracker.client.get_run(run_id)
    with tempfile.TemporaryDirectory() as tmp:
        weights, checkpoint = _weights_file(Path(checkpoint_path), Path(tmp))
        step = checkpoint.step if step is None else step
        letters = [c for c in checkpoint.vocab.chars if c.isalpha()] or list(checkpoint.vocab.chars)
        logged = tracker.client.create_logged_model(
            run.info.experiment_id, name, run_id, params=run.data.params, model_type="char-gpt"
        )
        with global_tracking_uri(tracker.uri):  # Model.log then marks the model READY, or FAILED
            Model.log(
                artifact_path=None,
                name=name,
                flavor=mlflow.pyfunc,
                run_id=run_id,
                model_id=logged.model_id,
                step=step,
                python_model=str(CODE_FILE),
                artifacts={served_model.WEIGHTS: str(weights)},
                code_paths=[str(PACKAGE)],
                model_config={"word_list": word_list},  # what load_context reads
                signature=signature(param_defaults(sample)),
                input_example=(pd.DataFrame({"prompt": (prompts or letters)[:2]}), {"max_new_tokens": 8}),
                pip_requirements=[f"{p}=={importlib.metadata.version(p).split('+')[0]}" for p in REQUIREMENTS],
            )
    if metrics:
        log_model_metrics(tracker, run_id, logged.model_id, metrics, step)
    return LoggedModelRef(logged.model_id, f"models:/{logged.model_id}")


def log_model_metrics(tracker: Tracker, run_id: str, model_id: str, metrics: dict[str, float], step: int = 0) -> None:
    """Log `metrics` to the run and attach them to its logged model (the UI's model page shows them)."""
    now = int(time.time() * 1000)
    batch = [Metric(k, float(v), now, step, model_id=model_id, run_id=run_id) for k, v in metrics.items()]
    tracker.log_metric_batch(run_id, batch)


def latest_model_id(tracker: Tracker, run_id: str) -> str | None:
    """The model the run logged last (at the highest step), or None."""
    outputs = tracker.client.get_run(run_id).outputs
    models = outputs.model_outputs if outputs else []
    return max(models, key=lambda m: m.step).model_id if models else None
