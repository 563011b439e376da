"""The sample stage: reads the checkpoint and `<ex>.sample`; writes models/<ex>/samples.txt; logs it
and the `sample.*` tags into the model's run."""

import dataclasses

from pipeline.checkpoint import load_checkpoint
from pipeline.device import pick_device
from pipeline.files import write_text
from pipeline.interrupts import stop_on_signals
from pipeline.locks import writes_example
from pipeline.memory import check_fits, sampling_estimate
from pipeline.paths import ExamplePaths
from pipeline.run_info import load_run_id
from pipeline.sampling import check_prompts, sample_report
from pipeline.schema import ExampleParams
from pipeline.tracking import Tracker, flatten


def check_sampling_fits(params: ExampleParams, checkpoint, device, example: str) -> None:
    """Refuse samples the device cannot hold: their rows, cache and tokens, for the longest prompt."""
    sample, config = params.sample, checkpoint.model.config
    longest = max(map(len, sample.prompts)) + 1  # a word list's boundary
    estimate = sampling_estimate(config, checkpoint.vocab.size, sample.num_samples, longest, sample.max_new_tokens)
    check_fits(estimate, device, f"sampling {example}", f"{example}.sample.num_samples")


@writes_example  # one writer per example: a second one stops at once
def sample_example(params: ExampleParams, paths: ExamplePaths, tracker: Tracker | None = None) -> str:
    """Write samples (text, or word completions) from the trained model."""
    tracker = tracker or Tracker.for_project()
    device = pick_device(params.train.device)
    checkpoint = load_checkpoint(paths.checkpoint, device)
    check_prompts(checkpoint.vocab, params.sample.prompts, params.data.kind == "words")
    check_sampling_fits(params, checkpoint, device, paths.example)
    run_id = load_run_id(paths.run_info, tracker, trained_in=checkpoint.run_id)
    with stop_on_signals(at_once=True):  # the run keeps the status of its training
        report = sample_report(checkpoint.model, checkpoint.vocab, params.sample, params.data.kind == "words", device)
        write_text(paths.samples, report)
        tracker.set_tags(run_id, flatten(dataclasses.asdict(params.sample), "sample."))
        tracker.log_artifacts(run_id, [paths.samples])
    print(report)
    return report
