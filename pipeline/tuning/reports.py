"""What a sweep leaves behind: its summary, best parameters, trial table, pictures and MLflow parent run."""

import dataclasses
import warnings
from pathlib import Path

import optuna
import yaml
from optuna.trial import TrialState

from pipeline.files import write_folder, write_text
from pipeline.paths import ExamplePaths
from pipeline.plots import png_bytes
from pipeline.schema import ExampleParams
from pipeline.tracking import Tracker, flatten
from pipeline.tuning.space import MODEL_KEYS, TuneParams, apply_values
from pipeline.tuning.storage import safe_url
from pipeline.tuning.sweep import FINISHED, Sweep, objective_label


@dataclasses.dataclass
class SweepSummary:
    counts: dict[str, int]  # trials complete, pruned, failed, and in all
    best: optuna.trial.FrozenTrial | None
    baseline: optuna.trial.FrozenTrial | None
    objective: str = "val_loss"

    def metrics(self) -> dict:
        values = {f"best_{self.objective}": self.best and self.best.value, "best_trial": self.best and self.best.number}
        values[f"baseline_{self.objective}"] = self.baseline and self.baseline.value
        return self.counts | {k: v for k, v in values.items() if v is not None}


def summarize(study: optuna.Study, objective: str = "val_loss") -> SweepSummary:
    trials = study.get_trials(deepcopy=False)
    counts = {f"trials_{s.name.lower()}": sum(t.state == s for t in trials) for s in FINISHED}
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    best = min(complete, key=lambda t: t.value) if complete else None
    baseline = next((t for t in trials if t.user_attrs.get("baseline")), None)
    return SweepSummary(counts | {"trials": len(trials)}, best, baseline, objective)


def best_config(params: ExampleParams, tune: TuneParams, trial: optuna.trial.FrozenTrial, example: str) -> dict:
    """The best trial's values in the shape of params.yaml: {example: {model: {...}, train: {...}}}."""
    tuned, keys = apply_values(params, tune, trial.params), set(trial.params)
    model_keys = keys & MODEL_KEYS | ({"n_embd"} if "head_size" in keys else set())
    train_keys = keys - MODEL_KEYS - {"head_size"}
    config = {}
    if model_keys:
        config["model"] = {k: getattr(tuned.model, k) for k in sorted(model_keys)}
    if train_keys:
        config["train"] = {k: getattr(tuned.train, k) for k in sorted(train_keys)}
    return {example: config}


def apply_command(config: dict) -> str:
    """The `dvc exp run` line that trains the pipeline with these values."""
    settings = flatten(config)
    return "dvc exp run " + " ".join(f"-S {key}={value}" for key, value in settings.items())


def save_sweep_outputs(study: optuna.Study, summary: SweepSummary, sweep: Sweep, paths: ExamplePaths):
    """Best parameters, the trial table and the study's pictures; returns the files. The metrics file
    is the tune stage's to write, last."""
    paths.tune_dir.mkdir(parents=True, exist_ok=True)
    files = [paths.tune_dir / "trials.csv"]
    write_text(files[0], study.trials_dataframe().to_csv(index=False, float_format="%.6g"))
    if summary.best:
        config = best_config(sweep.params, sweep.tune, summary.best, paths.example)
        header = (
            f"# Best of Optuna study '{study.study_name}': trial {summary.best.number}, "
            f"{objective_label(sweep)} {summary.best.value:.4f} after {sweep.tune.max_steps} steps.\n"
            f"# Apply it with:\n#   {apply_command(config)}\n"
        )
        files.append(paths.tune_dir / "best_params.yaml")
        write_text(files[-1], header + yaml.safe_dump(config, sort_keys=False))
    pictures = study_pictures(study)
    write_folder(paths.tune_plots, pictures)
    return files + [paths.tune_plots / name for name in pictures]


def log_sweep(tracker: Tracker, sweep: Sweep, summary: SweepSummary, files: list[Path]) -> None:
    run_id = sweep.parent_run_id
    tracker.log_metrics(run_id, summary.metrics(), summary.counts["trials"])
    if summary.best:
        best = {f"best.{k}": v for k, v in summary.best.params.items()}
        tracker.set_tags(run_id, best | {"best.trial": summary.best.number, "best.run_id": best_run_id(summary)})
    tracker.log_artifacts(run_id, files)


def best_run_id(summary: SweepSummary) -> str:
    return summary.best.user_attrs.get("mlflow_run_id", "") if summary.best else ""


def study_pictures(study: optuna.Study) -> dict[str, bytes]:
    """Optuna's pictures of a sweep, as PNG files by name; a picture the study cannot support yet is left out."""
    import optuna.visualization.matplotlib as views  # only sweeps need it; keep the stages light

    pictures = {
        "history.png": views.plot_optimization_history,
        "intermediate.png": views.plot_intermediate_values,
        "parallel.png": views.plot_parallel_coordinate,
        "importances.png": views.plot_param_importances,
    }
    saved = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna marks its matplotlib views experimental
        for name, plot in pictures.items():
            try:
                axes = plot(study)
            except (ValueError, RuntimeError, ZeroDivisionError) as e:  # e.g. importances of < 2 finished trials
                print(f"{name} left out: {e}")
                continue
            figure = (axes.flat[0] if hasattr(axes, "flat") else axes).figure
            figure.set_size_inches(9, 5)
            saved[name] = png_bytes(figure)
    return saved


def sweep_report(summary: SweepSummary, sweep: Sweep, paths: ExamplePaths) -> str:
    counts = summary.counts
    lines = [
        f"{counts['trials']} trials: {counts['trials_complete']} complete, {counts['trials_pruned']} pruned, "
        f"{counts['trials_fail']} failed"
    ]
    if summary.baseline and summary.baseline.value is not None:
        value = f"{objective_label(sweep)} {summary.baseline.value:.4f}"
        lines.append(f"baseline (params.yaml, trial {summary.baseline.number}): {value}")
    if summary.best:
        config = best_config(sweep.params, sweep.tune, summary.best, paths.example)
        lines += [
            f"best: trial {summary.best.number}, {objective_label(sweep)} {summary.best.value:.4f}, "
            f"{summary.best.params}",
            f"apply it: {apply_command(config)}",
        ]
    lines.append(f"inspect: optuna trials --study-name {sweep.study_name} --storage {safe_url(sweep.storage_url)}")
    return "\n".join(lines)
