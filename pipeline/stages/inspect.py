"""The inspect stage: reads the checkpoint, models/<ex>/loss.png and `<ex>.inspect`; writes
models/<ex>/reports/ (next-chars.txt, a heatmap and attention maps per prompt, loss.png); logs the
folder under `reports/` and the `inspect.*` tags into the model's run."""

import dataclasses
import re

from pipeline.checkpoint import load_checkpoint
from pipeline.device import pick_device
from pipeline.errors import PipelineError
from pipeline.files import write_folder
from pipeline.inspection import Inspection, check_inspect_prompts, format_table, inspect_prompt
from pipeline.interrupts import stop_on_signals
from pipeline.locks import writes_example
from pipeline.paths import ExamplePaths
from pipeline.plots import attention_maps_png, next_char_heatmap_png
from pipeline.run_info import load_run_id
from pipeline.schema import ExampleParams
from pipeline.tracking import Tracker, flatten


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


@writes_example  # one writer per example: a second one stops at once
def inspect_example(params: ExampleParams, paths: ExamplePaths, tracker: Tracker | None = None) -> str:
    """Next-character tables and attention maps of prompts into models/<example>/reports."""
    tracker = tracker or Tracker.for_project()
    device = pick_device(params.train.device)
    checkpoint = load_checkpoint(paths.checkpoint, device)
    word_list = params.data.kind == "words"
    check_inspect_prompts(checkpoint.vocab, params.inspect.prompts, checkpoint.model.config.block_size, word_list)
    if not paths.loss_plot.exists():
        raise PipelineError(f"{paths.loss_plot} does not exist: run the train stage first")
    run_id = load_run_id(paths.run_info, tracker, trained_in=checkpoint.run_id)
    with stop_on_signals(at_once=True):  # the run keeps the status of its training
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
