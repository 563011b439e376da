"""The tune stage: reads the prepared data and `<ex>.data`, `<ex>.model`, `<ex>.train`, `<ex>.tune`;
runs (or continues) an Optuna sweep, each trial a tracked training run; writes models/<ex>/tune.json,
models/<ex>/tune/ (best parameters, trial table) and tune-plots/; logs a parent run with one child
run per trial, and registers the best trial's model. Several sweeps of one study may run at once:
the study hands out its trials, and the example's lock is taken only to write the outputs."""

from pipeline.files import write_json
from pipeline.interrupts import stop_on_signals
from pipeline.locks import example_lock
from pipeline.paths import ExamplePaths
from pipeline.registry import register
from pipeline.schema import ExampleParams
from pipeline.tracking import Tracker
from pipeline.tuning.reports import SweepSummary, best_run_id, log_sweep, save_sweep_outputs, summarize, sweep_report
from pipeline.tuning.space import parse_tune
from pipeline.tuning.storage import quiet_optuna, safe_url
from pipeline.tuning.sweep import prepare_sweep, run_workers

OUTPUTS_WAIT = 60  # seconds a sweep waits for another writer of the example before writing its outputs


def tune_example(
    params: ExampleParams, paths: ExamplePaths, tracker: Tracker | None = None, *, progress: bool = True
) -> SweepSummary:
    """Optuna sweep over the params' tune.space, each trial a tracked training run."""
    tune = parse_tune(params, paths.example)
    tracker = tracker or Tracker.for_project()
    quiet_optuna()
    sweep, study, queued = prepare_sweep(params, tune, paths, tracker)
    print(
        f"{paths.example}: study '{sweep.study_name}' in {safe_url(sweep.storage_url)}: {queued} trial(s) queued "
        f"to reach {tune.trials}, {tune.workers} worker(s); MLflow parent run {sweep.parent_run_id}"
    )
    with stop_on_signals(at_once=True):
        with tracker.active(sweep.parent_run_id):
            run_workers(sweep, tune.workers, progress)
        # trials share the study with any other sweep of it; the outputs are written by one at a time
        with example_lock(paths.model_dir, wait=OUTPUTS_WAIT):
            summary = summarize(study, tune.objective)
            files = save_sweep_outputs(study, summary, sweep, paths)
            log_sweep(tracker, sweep, summary, files)
            register_best(tracker, tune, summary)
            # last, with the parent run ended: DVC deletes a stage's outputs before it runs it, so a
            # kill before this line leaves tune.json missing and the next `dvc repro` runs tune again
            write_json(paths.tune_metrics, summary.metrics())
    print(sweep_report(summary, sweep, paths))
    return summary


def register_best(tracker: Tracker, tune, summary: SweepSummary) -> None:
    """The best trial's model becomes a version of `tune.register_as`, @champion if it beats the champion."""
    if tune.register_as and summary.best and (model_id := summary.best.user_attrs.get("model_id")):
        val_loss = summary.best.user_attrs.get("val_loss", summary.best.value)  # trials before it was kept
        version, champion = register(tracker, tune.register_as, model_id, best_run_id(summary), val_loss)
        print(f"registered {tune.register_as} version {version}" + (" as @champion" * champion))
