"""The evaluate stage: reads the checkpoint, the prepared data and `<ex>.evaluate`; writes
models/<ex>/metrics.json; logs the `eval.*` metrics and `evaluate.*` tags into the model's run."""

import dataclasses
import json

from pipeline.checkpoint import load_checkpoint
from pipeline.data import load_dataset
from pipeline.device import pick_device
from pipeline.errors import PipelineError
from pipeline.evaluation import split_metrics, word_metrics
from pipeline.files import read_json, write_json
from pipeline.interrupts import stop_on_signals
from pipeline.locks import writes_example
from pipeline.logged_models import log_model_metrics
from pipeline.memory import check_fits, inference_estimate, sampling_estimate
from pipeline.paths import ExamplePaths
from pipeline.run_info import load_run_id
from pipeline.schema import ExampleParams
from pipeline.tracking import Tracker, flatten


def check_evaluation_fits(params: ExampleParams, model, dataset, device, example: str) -> None:
    """Refuse an evaluation batch, or a number of sampled words, that the device cannot hold."""
    config, vocab_size = model.config, dataset.vocab.size
    batches = inference_estimate(config, vocab_size, params.evaluate.batch_size, config.block_size, 0)
    check_fits(batches, device, f"evaluating {example}", f"{example}.evaluate.batch_size")
    if params.evaluate.words is not None:
        longest = dataset.meta["max_word_length"] + 1
        words = sampling_estimate(config, vocab_size, params.evaluate.words.samples, 1, longest)
        check_fits(words, device, f"sampling words of {example}", f"{example}.evaluate.words.samples")


@writes_example  # one writer per example: a second one stops at once
def evaluate_example(params: ExampleParams, paths: ExamplePaths, tracker: Tracker | None = None) -> dict:
    """Whole-split loss, perplexity, bits per character (and word metrics) into metrics.json."""
    tracker = tracker or Tracker.for_project()
    device = pick_device(params.train.device)
    checkpoint = load_checkpoint(paths.checkpoint, device)
    run_id = load_run_id(paths.run_info, tracker, trained_in=checkpoint.run_id)
    dataset = load_dataset(paths)
    if checkpoint.vocab != dataset.vocab:
        raise PipelineError(f"{paths.checkpoint} was trained on another vocabulary than {paths.meta}: train again")
    check_evaluation_fits(params, checkpoint.model, dataset, device, paths.example)
    with stop_on_signals(at_once=True):  # the run keeps the status of its training
        metrics = {
            split: split_metrics(checkpoint.model, dataset, split, params.evaluate, device, params.train.precision)
            for split in ("train", "val")
        }
        if params.evaluate.words is not None:
            metrics["words"] = word_metrics(checkpoint.model, dataset, params.evaluate.words, device)
        write_json(paths.metrics, metrics)
        if model_id := read_json(paths.run_info).get("model_id"):  # on the run and on its logged model
            log_model_metrics(tracker, run_id, model_id, flatten(metrics, "eval."), checkpoint.step)
        else:
            tracker.log_metrics(run_id, flatten(metrics, "eval."), checkpoint.step)
        tracker.set_tags(run_id, flatten(dataclasses.asdict(params.evaluate), "evaluate."))
        tracker.log_artifacts(run_id, [paths.metrics])
    print(json.dumps(metrics, indent=2))
    return metrics
