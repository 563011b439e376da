"""The command line: `python -m pipeline <command> --help`.

Only people use it: the DVC stages run `stages/<name>.py`, which import the stage modules and
pipeline/runner.py but not this file, so a new flag or help text here re-runs no stage.
"""

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
    "register": "register the model of the example's current run as chargpt-<example> (alias champion if better)",
}
# the commands that write an example's outputs or its MLflow runs: module and function
WRITERS = {name: (f"pipeline.stages.{name}", f"{name}_example") for name in STAGES} | {
    "register": ("pipeline.register", "register_example")
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
        if name == "register":
            stage.add_argument(
                "--alias", help="give the version this alias whatever its loss (default: champion, if better)"
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
    shown = commands.add_parser(
        "params",
        help="every parameter of an example in force, defaults included, as YAML",
        description="Print an example's parameters: the defaults, the params file and any --set, checked.",
    )
    shown.add_argument("--example", required=True, help="a section of the params file, e.g. toy")
    shown.add_argument("--params", type=Path, default=Path("params.yaml"), help="default: %(default)s")
    add_override_arguments(shown)
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
    from pipeline.overrides import read_overrides_file

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
def run_stage(args) -> int:
    from importlib import import_module

    from pipeline.runner import run

    overrides = given_overrides(args)
    overrides += tune_overrides(args) if args.command == "tune" else []
    if getattr(args, "prompts", None):  # JSON is YAML: any character survives the trip
        overrides.append(f"{args.example}.inspect.prompts={json.dumps(args.prompts)}")
    options = {"progress": not args.no_progress} if args.command in ("train", "tune") else {}
    if args.command == "train":
        options["fresh"] = args.fresh
    if args.command == "register":
        options["alias"] = args.alias
    module, function = WRITERS[args.command]
    stage = getattr(import_module(module), function)
    return run(stage, args.example, args.params, overrides, **options)


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


def show_params(args) -> None:
    import dataclasses

    import yaml

    from pipeline.config import example_params, load_params

    params = example_params(load_params(args.params, given_overrides(args)), args.example, args.params)
    values = {field.name: getattr(params, field.name) for field in dataclasses.fields(params)}
    sections = {k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for k, v in values.items()}
    if params.tune is not None:
        from pipeline.tuning.space import parse_tune

        sections["tune"] = dataclasses.asdict(parse_tune(params, args.example))
    print(yaml.safe_dump({args.example: sections}, sort_keys=False, allow_unicode=True), end="")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command not in ("compare", "params"):
        return run_stage(args)
    try:
        run_compare(args) if args.command == "compare" else show_params(args)
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
