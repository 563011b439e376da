"""The command line: `python -m pipeline <command> --help`. The DVC stages call it too."""

import argparse
import json
import sys
from pathlib import Path

from pipeline.errors import PipelineError

STAGES = {
    "prepare": "build the vocabulary, split and encode data/<example>/input.txt",
    "train": "train the model (or resume an interrupted run) and log the run to MLflow",
    "evaluate": "whole-split loss, perplexity, bits per character (and word metrics) into metrics.json",
    "sample": "write samples (text, or word completions) from the trained model",
    "tune": "Optuna sweep over the params' tune.space, each trial a tracked training run",
    "inspect": "next-character tables and attention maps of prompts into models/<example>/reports",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline",
        description="A tracked character-level GPT: prepare, train, evaluate, sample, compare.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="command")
    for name, help_text in STAGES.items():
        stage = commands.add_parser(name, help=help_text, description=help_text)
        stage.add_argument("--example", required=True, help="a top-level section of the params file, e.g. toy")
        stage.add_argument("--params", type=Path, default=Path("params.yaml"), help="default: %(default)s")
        add_override_arguments(stage)
        if name in ("train", "tune"):
            stage.add_argument("--no-progress", action="store_true", help="hide the progress bar")
        if name == "tune":
            add_tune_options(stage)
        if name == "inspect":
            stage.add_argument(
                "--prompt",
                dest="prompts",
                action="append",
                metavar="TEXT",
                help="inspect this prompt instead of the params file's inspect.prompts (repeatable)",
            )
        if name == "train":
            stage.add_argument(
                "--fresh",
                action="store_true",
                help="start a new run even if models/<example>/checkpoints/latest.pt holds an interrupted one",
            )
    compare = commands.add_parser(
        "compare",
        help="table of the MLflow runs, best validation loss first",
        description="Print the MLflow runs with their key parameters and final metrics, best validation loss first.",
    )
    compare.add_argument("--example", help="only runs of this example")
    compare.add_argument("--experiment", help="only runs of this MLflow experiment")
    compare.add_argument("--csv", type=Path, help="also save the table as CSV here")
    return parser


def add_override_arguments(parser: argparse.ArgumentParser) -> None:
    """--set and --set-file, for the pipeline's commands and the benchmarks alike."""
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a parameter for this run only, e.g. --set toy.train.max_steps=100 (repeatable)",
    )
    parser.add_argument(
        "--set-file",
        dest="override_files",
        action="append",
        default=[],
        type=Path,
        metavar="FILE",
        help="overrides from a file, one KEY=VALUE a line, before any --set, e.g. overrides/gpu.txt",
    )


def given_overrides(args) -> list[str]:
    """The --set-file lines, then the --set values: a --set wins over a file."""
    from pipeline.config import read_overrides_file

    return [line for path in args.override_files for line in read_overrides_file(path)] + args.overrides


def add_tune_options(parser: argparse.ArgumentParser) -> None:
    """Shortcuts for the most changed tune.* params; they go through the same checks as --set."""
    parser.add_argument("--trials", type=int, help="total trials in the study (re-running adds only the missing)")
    parser.add_argument("--workers", type=int, help="worker processes on this machine")
    parser.add_argument("--storage", help="Optuna storage URL, e.g. postgresql://user@host/db (default: optuna.db)")
    parser.add_argument("--study", help="study name; the same name on several machines joins one sweep")


def tune_overrides(args) -> list[str]:
    chosen = {key: getattr(args, key) for key in ("trials", "workers", "storage", "study")}
    return [f"{args.example}.tune.{key}={json.dumps(value)}" for key, value in chosen.items() if value is not None]


# Imports inside the commands: `--help` answers at once, without loading torch and MLflow.
def run_stage(args) -> None:
    from pipeline import commands
    from pipeline.config import ExamplePaths, example_params, load_params
    from pipeline.locks import example_lock
    from pipeline.tracking import Tracker

    overrides = given_overrides(args)
    overrides += tune_overrides(args) if args.command == "tune" else []
    if getattr(args, "prompts", None):  # JSON is YAML: any character survives the trip
        overrides.append(f"{args.example}.inspect.prompts={json.dumps(args.prompts)}")
    params = example_params(load_params(args.params, overrides), args.example, args.params)
    paths = ExamplePaths(Path.cwd(), args.example)
    with example_lock(paths.model_dir):  # one writer per example; a second one stops here
        if args.command == "prepare":
            commands.prepare_example(params, paths)
        elif args.command == "train":
            commands.train_example(params, paths, Tracker.for_project(), not args.no_progress, args.fresh)
        elif args.command == "tune":
            from pipeline.tuning import tune_example

            tune_example(params, paths, Tracker.for_project(), progress=not args.no_progress)
        elif args.command == "evaluate":
            commands.evaluate_example(params, paths, Tracker.for_project())
        elif args.command == "inspect":
            commands.inspect_example(params, paths, Tracker.for_project())
        else:
            commands.sample_example(params, paths, Tracker.for_project())


def run_compare(args) -> None:
    import pandas as pd

    from pipeline.compare import runs_table
    from pipeline.files import write_text
    from pipeline.tracking import Tracker

    tracker = Tracker.for_project(writable=False)
    table = runs_table(tracker, args.example, args.experiment)
    if table.empty:
        print(f"no runs in {tracker.uri}")
    else:
        with pd.option_context(
            "display.max_columns", None, "display.width", 200, "display.float_format", "{:.4g}".format
        ):
            print(table.to_string(index=False))
    if args.csv:
        write_text(args.csv, table.to_csv(index=False))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run_compare(args) if args.command == "compare" else run_stage(args)
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGINT/SIGTERM turned into Stopped: 128 + the signal, as a shell says
        print(f"error: {e or 'interrupted'}", file=sys.stderr)
        return 128 + getattr(e, "signum", 2)
    return 0
