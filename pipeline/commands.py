"""What each stage does for one example: which files it reads and writes, what it tracks."""

import dataclasses
import hashlib
import json
import re

import pandas as pd
import torch

from pipeline.checkpoint import ResumePoint, TrainingCheckpoints, load_checkpoint, load_resume_point, save_checkpoint
from pipeline.config import ExampleParams, ExamplePaths
from pipeline.data import Dataset, load_dataset, prepare
from pipeline.errors import Diverged, PipelineError, Stopped
from pipeline.evaluation import split_metrics, word_metrics
from pipeline.files import check_writable, write_folder, write_json, write_text
from pipeline.inspection import Inspection, check_inspect_prompts, format_table, inspect_prompt
from pipeline.interrupts import stop_on_signals
from pipeline.model import GPT, GPTConfig
from pipeline.plots import attention_maps_png, next_char_heatmap_png, save_loss_curve
from pipeline.sampling import check_prompts, sample_report
from pipeline.tracking import Tracker, TrainingLogger, flatten, load_run_id, run_tags, save_run_info
from pipeline.training import TrainResult, pick_device, train


def prepare_example(params: ExampleParams, paths: ExamplePaths) -> dict:
    meta = prepare(params.data, paths)
    print(
        f"{paths.example}: {meta['vocab_size']} characters, {meta['train_tokens']:,} train and "
        f"{meta['val_tokens']:,} validation tokens -> {paths.prepared}"
    )
    return meta


def build_model(params: ExampleParams, vocab_size: int) -> GPT:
    """A freshly initialised model that depends on `train.seed` alone, not on the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(params.train.seed)
        return GPT(GPTConfig(**dataclasses.asdict(params.model), vocab_size=vocab_size))


def _frame(records) -> pd.DataFrame:
    return pd.DataFrame([dataclasses.asdict(r) for r in records])


def check_data_fits(dataset: Dataset, block_size: int, example: str) -> None:
    """Refuse a model that cannot be trained on this data, before a run is started for it."""
    for name, split in (("train", dataset.train), ("validation", dataset.val)):
        if len(split) <= block_size:
            raise PipelineError(
                f"{example}: the {name} split has {len(split)} tokens; model.block_size + 1 = {block_size + 1} needed"
            )
    if (longest := dataset.meta.get("max_word_length", 0)) >= block_size:
        raise PipelineError(f"{example}: model.block_size ({block_size}) must exceed the longest word ({longest})")


def start_training_run(params: ExampleParams, paths: ExamplePaths, tracker: Tracker, model: GPT, device) -> str:
    tags = run_tags(paths.example, device)
    run_name = "-".join(filter(None, [paths.example, tags.get("dvc_experiment")]))
    trained_with = {key: dataclasses.asdict(getattr(params, key)) for key in ("data", "model", "train")}
    run_params = flatten(trained_with) | {"num_params": model.num_params(), "vocab_size": model.config.vocab_size}
    run_id = tracker.start_run(paths.example, run_name, tags, run_params)
    save_run_info(paths.run_info, tracker, run_id)
    return run_id


def training_fingerprint(params: ExampleParams, dataset: Dataset) -> str:
    """Everything a run's result depends on: a run is resumed only if all of it is unchanged."""
    trained_with = {key: dataclasses.asdict(getattr(params, key)) for key in ("data", "model", "train")}
    trained_with["tokens"] = dataset.meta.get("sha256") or dataset.meta.get("source")
    trained_with["vocab"] = list(dataset.vocab.chars)
    return hashlib.sha256(json.dumps(trained_with, sort_keys=True).encode()).hexdigest()


def find_resume_point(paths: ExamplePaths, fingerprint: str, tracker: Tracker) -> ResumePoint | None:
    """The latest checkpoint if it is of an unfinished run with the same parameters and data."""
    point = load_resume_point(paths.latest_checkpoint)
    if point is None:
        return None
    if point.finished:
        why = "its run finished"
    elif point.fingerprint != fingerprint:
        why = "it was made with other data, model or train parameters"
    else:
        return point
    if not point.finished and tracker.run_status(point.run_id) == "RUNNING":
        tracker.client.set_terminated(point.run_id, "KILLED")  # its process was killed before it could say so
        why += f"; its MLflow run {point.run_id}, left RUNNING by a killed process, is now marked KILLED"
    print(f"{paths.example}: starting a new run, not resuming {paths.latest_checkpoint} ({why})")
    return None


def resumed_run(point: ResumePoint, params, paths, tracker, model, device) -> tuple[str, int]:
    """The MLflow run to continue and its last logged step; a new run if this store lacks the old one."""
    step, latest = point.state.step, paths.latest_checkpoint
    if tracker.run_status(point.run_id) is not None:
        save_run_info(paths.run_info, tracker, point.run_id)
        print(f"{paths.example}: resuming at step {step} of {params.train.max_steps} from {latest}")
        return point.run_id, tracker.last_step(point.run_id, "train_loss")
    run_id = start_training_run(params, paths, tracker, model, device)
    print(
        f"{paths.example}: resuming at step {step} from {latest}; its MLflow run {point.run_id} is not in "
        f"{tracker.uri}, so the whole history goes to a new run"
    )
    return run_id, 0


def save_training_outputs(result: TrainResult, paths: ExamplePaths, vocab) -> dict:
    """Checkpoint, per-step history, evaluations, loss curve and a summary; returns the summary."""
    save_checkpoint(paths.checkpoint, result.model, result.optimizer, vocab, result.steps, result.best_val_loss)
    history, evals = _frame(result.history), _frame(result.evals)
    write_text(paths.history, history.to_csv(index=False, float_format="%.6g"))
    write_text(paths.evals, evals.to_csv(index=False, float_format="%.6g"))
    save_loss_curve(paths.loss_plot, history, evals, f"{paths.example}: {result.model.num_params():,} parameters")
    summary = {
        "steps": result.steps,
        "final_val_loss": result.evals[-1].val_loss,
        "best_val_loss": result.best_val_loss,
        "train_seconds": result.seconds,
        "tokens_per_sec": result.tokens_per_sec,
    }
    write_json(paths.train_metrics, summary)
    return summary


def prepare_model_folders(paths: ExamplePaths) -> None:
    """Fail now, not after an hour of training, if the outputs cannot be written."""
    for folder in (paths.model_dir, paths.checkpoints):
        check_writable(folder)
    for leftover in paths.checkpoints.glob(".*.tmp"):  # a process killed halfway through a write left it
        leftover.unlink()


def checkpointed_training(
    model, dataset, params: ExampleParams, paths, device, logger, checkpoints, resume, stop, progress
) -> TrainResult:
    """`train()` with MLflow logging and the latest and best checkpoints; a stop or a divergence says where it is."""
    if resume is not None:  # whatever of the saved history the MLflow run does not have yet
        checkpoints.step = resume.state.step
        for record in resume.state.history:
            logger.on_step(record)
        for record in resume.state.evals:
            logger.on_eval(record)
        logger.flush()

    def on_checkpoint(state, best: bool) -> None:
        logger.flush()  # first: MLflow may get ahead of the checkpoint, never behind it
        checkpoints.save(state, best)

    try:
        return train(
            model, dataset, params.train, device, logger.on_step, logger.on_eval, progress,
            resume.state if resume else None, on_checkpoint, stop,
        )  # fmt: skip
    except Stopped as e:
        raise Stopped(
            f"{paths.example}: {e} at step {checkpoints.step}, saved in {paths.latest_checkpoint}; "
            "run the same command again to resume",
            e.signum,
        ) from None
    except Diverged as e:
        logger.flush()  # the curve up to where it blew up
        kept = f"; the last good checkpoint, step {checkpoints.step}, stays in {paths.latest_checkpoint}"
        raise Diverged(f"{paths.example}: {e}{kept if checkpoints.step else ''}", e.step) from None


def train_example(
    params: ExampleParams, paths: ExamplePaths, tracker: Tracker, progress: bool = True, fresh: bool = False
) -> TrainResult:
    """Train, or continue the interrupted run of the same parameters unless `fresh` (README: Interruptions)."""
    dataset = load_dataset(paths)
    check_data_fits(dataset, params.model.block_size, paths.example)
    device = pick_device(params.train.device)
    prepare_model_folders(paths)
    model = build_model(params, dataset.vocab.size)
    fingerprint = training_fingerprint(params, dataset)
    resume = None if fresh else find_resume_point(paths, fingerprint, tracker)
    with stop_on_signals() as stop:
        if resume is None:
            run_id, logged_through = start_training_run(params, paths, tracker, model, device), 0
        else:
            model.load_state_dict(resume.model_state)
            run_id, logged_through = resumed_run(resume, params, paths, tracker, model, device)
        print(f"{paths.example}: {model.num_params():,} parameters on {device}; MLflow run {run_id} in {tracker.uri}")
        checkpoints = TrainingCheckpoints(
            paths.latest_checkpoint, paths.best_checkpoint, model, dataset.vocab, fingerprint, run_id
        )
        with tracker.active(run_id):
            logger = TrainingLogger(tracker, run_id, logged_through)
            result = checkpointed_training(
                model, dataset, params, paths, device, logger, checkpoints, resume, stop, progress
            )
            if (reason := stop()) is not None:  # a signal during the last evaluation
                raise reason
            logger.flush()
            summary = save_training_outputs(result, paths, dataset.vocab)
            tracker.log_metrics(run_id, summary, result.steps)
            tracker.log_artifacts(run_id, [paths.history, paths.evals, paths.loss_plot, paths.train_metrics])
            tracker.log_artifacts(run_id, [paths.checkpoint], "checkpoint")
    checkpoints.mark_finished()  # after FINISHED: a kill in between only makes the next run redo the outputs
    print(f"{paths.example}: {result.steps} steps in {result.seconds:.1f} s, val loss {summary['final_val_loss']:.4f}")
    return result


def evaluate_example(params: ExampleParams, paths: ExamplePaths, tracker: Tracker) -> dict:
    run_id = load_run_id(paths.run_info, tracker)
    device = pick_device("auto")
    checkpoint = load_checkpoint(paths.checkpoint, device)
    dataset = load_dataset(paths)
    if checkpoint.vocab != dataset.vocab:
        raise PipelineError(f"{paths.checkpoint} was trained on another vocabulary than {paths.meta}: train again")
    with stop_on_signals(at_once=True), tracker.active(run_id):
        metrics = {
            split: split_metrics(checkpoint.model, dataset, split, params.evaluate, device)
            for split in ("train", "val")
        }
        if params.evaluate.words is not None:
            metrics["words"] = word_metrics(checkpoint.model, dataset, params.evaluate.words, device)
        write_json(paths.metrics, metrics)
        tracker.log_metrics(run_id, flatten(metrics, "eval."), checkpoint.step)
        tracker.set_tags(run_id, flatten(dataclasses.asdict(params.evaluate), "evaluate."))
        tracker.log_artifacts(run_id, [paths.metrics])
    print(json.dumps(metrics, indent=2))
    return metrics


def sample_example(params: ExampleParams, paths: ExamplePaths, tracker: Tracker) -> str:
    device = pick_device("auto")
    checkpoint = load_checkpoint(paths.checkpoint, device)
    check_prompts(checkpoint.vocab, params.sample.prompts, params.data.kind == "words")
    run_id = load_run_id(paths.run_info, tracker)
    with stop_on_signals(at_once=True), tracker.active(run_id):
        report = sample_report(checkpoint.model, checkpoint.vocab, params.sample, params.data.kind == "words", device)
        write_text(paths.samples, report)
        tracker.set_tags(run_id, flatten(dataclasses.asdict(params.sample), "sample."))
        tracker.log_artifacts(run_id, [paths.samples])
    print(report)
    return report


def file_stem(number: int, prompt: str) -> str:
    """`1-CORN`, `2-ROMEO_I_will`: numbered, so that prompts alike after cleaning never collide."""
    return f"{number}-{re.sub(r'[^A-Za-z0-9]+', '_', prompt).strip('_')[:40]}".rstrip("-")


def inspection_pictures(inspection: Inspection, example: str) -> dict[str, bytes]:
    """The next-character heatmap and the attention maps of one prompt, as PNG files by suffix."""
    return {
        "next-chars.png": next_char_heatmap_png(
            inspection.probs.numpy(),
            inspection.prefixes(),
            list(inspection.vocab.chars),
            f"{example}: next character after each prefix of {inspection.context!r}",
        ),
        "attention.png": attention_maps_png(
            inspection.attention.numpy(),
            inspection.context,
            f"{example}: attention weights over {inspection.context!r}",
        ),
    }


def inspect_example(params: ExampleParams, paths: ExamplePaths, tracker: Tracker) -> str:
    """Tables and pictures of what the model makes of each prompt, into the reports folder and its run."""
    device = pick_device("auto")
    checkpoint = load_checkpoint(paths.checkpoint, device)
    word_list = params.data.kind == "words"
    check_inspect_prompts(checkpoint.vocab, params.inspect.prompts, checkpoint.model.config.block_size, word_list)
    if not paths.loss_plot.exists():
        raise PipelineError(f"{paths.loss_plot} does not exist: run the train stage first")
    run_id = load_run_id(paths.run_info, tracker)
    with stop_on_signals(at_once=True), tracker.active(run_id):
        inspections = [
            inspect_prompt(checkpoint.model, checkpoint.vocab, prompt, word_list, device)
            for prompt in params.inspect.prompts
        ]
        table = "\n".join(format_table(i, params.inspect.top_k) for i in inspections)
        files = {"next-chars.txt": table.encode(), "loss.png": paths.loss_plot.read_bytes()}
        for number, inspection in enumerate(inspections, 1):
            for suffix, png in inspection_pictures(inspection, paths.example).items():
                files[f"{file_stem(number, inspection.prompt)}-{suffix}"] = png
        write_folder(paths.reports, files)
        tracker.set_tags(run_id, flatten(dataclasses.asdict(params.inspect), "inspect."))
        tracker.log_artifacts(run_id, [paths.reports / name for name in files], "reports")
    print(table)
    print(f"{paths.example}: {len(files)} files in {paths.reports}, logged to MLflow run {run_id}")
    return table
