"""The model registry: each example's registered model, its versions and the `champion` alias.

Registered versions point at `models:/<model_id>` (pipeline/logged_models.py), so
`models:/<name>@<alias>` always loads.
"""

import contextlib
import re

import mlflow
from mlflow.exceptions import MlflowException

from pipeline.tracking import Tracker, global_tracking_uri


def model_name(example: str) -> str:
    """The registered model of an example."""
    return f"chargpt-{example}"


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
        with global_tracking_uri(tracker.uri):  # the registry store looks `models:/<id>` up through it
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
