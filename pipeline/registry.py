"""Kept models as MLflow 3 logged models, the data they saw, and the model registry's aliases.

A model is logged "from code" (pipeline/served_model.py, with the `pipeline` package in its
`code/` folder) and a weights-only copy of its checkpoint: nothing in it is pickled. Registered
versions point at `models:/<model_id>`, so `models:/<name>@<alias>` always loads.
"""

import contextlib
import dataclasses
import hashlib
import importlib.metadata
import json
import os
import re
import tempfile
import time
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelSignature
from mlflow.tracking._tracking_service import utils as tracking_utils
from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

from pipeline import served_model
from pipeline.checkpoint import Checkpoint, checkpoint_state, load_checkpoint
from pipeline.errors import PipelineError
from pipeline.files import read_json, save_torch
from pipeline.tracking import Tracker

CODE_FILE = Path(served_model.__file__)
PACKAGE = CODE_FILE.parent  # the `pipeline` package, carried in the model's code/ folder
REQUIREMENTS = ("mlflow", "torch", "numpy", "pandas", "pydantic", "pyyaml", "tqdm")  # what `pipeline` imports
DIGEST_LENGTH = 16  # MLflow stores at most 36 characters of a dataset digest


@dataclasses.dataclass
class LoggedModelRef:
    model_id: str
    uri: str  # models:/<model_id>


def model_name(example: str) -> str:
    """The registered model of an example."""
    return f"chargpt-{example}"


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


@contextlib.contextmanager
def _global_tracking_uri(uri: str):
    """Model.log finds its store only through MLflow's global tracking URI: set it for the call, then restore it."""
    before, env = tracking_utils._tracking_uri, os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before)
        if env is not None:
            os.environ["MLFLOW_TRACKING_URI"] = env


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
        with _global_tracking_uri(tracker.uri):  # Model.log then marks the model READY, or FAILED
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


def _ensure_registered_model(tracker: Tracker, name: str) -> None:
    if not tracker.client.search_registered_models(f"name = '{name}'"):
        with contextlib.suppress(MlflowException):  # another process registered it a moment ago
            tracker.client.create_registered_model(
                name, description="Character-level GPT models (pipeline/registry.py)"
            )


def _logged_model_id(version) -> str | None:
    """The logged model a version was made from (the SQL registry keeps it only in the source URI)."""
    match = re.fullmatch(r"models:/(m-[0-9a-f]+)", version.source or "")
    return version.model_id or (match.group(1) if match else None)


def _alias_loss(tracker: Tracker, name: str, alias: str) -> tuple[str | None, float]:
    """The version holding `alias` and its val loss; inf for one that is no logged model (not loadable)."""
    try:
        version = tracker.client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None, float("inf")
    loss = float(version.tags.get("val_loss", "inf")) if _logged_model_id(version) else float("inf")
    return str(version.version), loss


def register(
    tracker: Tracker,
    name: str,
    model_id: str,
    run_id: str,
    val_loss: float,
    alias: str | None = "champion",
    only_if_better: bool = True,
) -> tuple[str, bool]:
    """Make the logged model a version of `name` (once), and give it `alias` unless `only_if_better`
    and the alias's version has a val loss as low or lower. Returns the version and whether it holds the alias.
    """
    model_id = model_id.removeprefix("models:/")
    _ensure_registered_model(tracker, name)
    versions = tracker.client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    version = next((v for v in versions if _logged_model_id(v) == model_id), None)
    if version is None:
        with _global_tracking_uri(tracker.uri):  # the registry store looks `models:/<id>` up through it
            version = mlflow.register_model(f"models:/{model_id}", name, tags={"val_loss": f"{val_loss:.6f}"})
    number = str(version.version)  # an int from a SQL store, a str from a tracking server
    if alias is None:
        return number, False
    holder, holder_loss = _alias_loss(tracker, name, alias)
    if holder == number:
        return number, True
    if not only_if_better or val_loss < holder_loss:
        tracker.client.set_registered_model_alias(name, alias, number)
        return number, True
    return number, False
