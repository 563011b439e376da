"""Time to quality: how low the validation loss gets per second of training.

Trains the example's configuration (params.yaml, plus any --set) through the pipeline's own loop,
evaluating every `--eval-interval` steps, and prints the validation loss reached after each time
budget and the seconds to reach each target loss. Seconds count training steps only, not the
evaluations the benchmark adds; the schedule is the configuration's own (step-based).

    python -m benchmarks.time_to_quality --help
"""

import argparse
import sys

from benchmarks.common import (
    add_common_arguments,
    example_config,
    format_table,
    load_example,
    machine,
    run_benchmark,
)
from pipeline.device import pick_device
from pipeline.evaluation import eval_windows, split_loss
from pipeline.model import build_model
from pipeline.training import StepRecord, TrainCallbacks, train


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.time_to_quality",
        description=__doc__.split("\n\n")[0],
        epilog="Example: python -m benchmarks.time_to_quality   (Shakespeare defaults, about 2.5 minutes)",
    )
    add_common_arguments(parser)
    parser.add_argument("--eval-interval", type=int, default=100, help="steps between evaluations (default: 100)")
    parser.add_argument("--budgets", default="30,60,120", help="seconds of training (default: %(default)s)")
    parser.add_argument("--targets", default="2.0,1.9,1.8", help="validation losses (default: %(default)s)")
    return parser


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",")]


def run(args) -> dict:
    args.overrides = [*args.overrides, f"{args.example}.train.eval_interval={args.eval_interval}"]
    params = example_config(args)
    dataset = load_example(params, args.example)
    device = pick_device(params.train.device)
    model = build_model(params.model, dataset.vocab.size, params.train.seed)
    tokens = params.train.batch_size * params.model.block_size
    clock = {"seconds": 0.0}  # training seconds so far: the step times, not the evaluations
    timeline = []

    def on_step(record: StepRecord) -> None:
        clock["seconds"] += tokens / record.tokens_per_sec

    def on_eval(record) -> None:
        timeline.append({"step": record.step, "seconds": clock["seconds"], "val_loss": record.val_loss})
        print(f"  {clock['seconds']:6.1f} s, step {record.step}: val loss {record.val_loss:.4f}", flush=True)

    print(f"{args.example}: {model.num_params():,} parameters, {params.train.max_steps} steps on {device}", flush=True)
    callbacks = TrainCallbacks(on_step=on_step, on_eval=on_eval)
    result = train(model, dataset, params=params.train, device=device, callbacks=callbacks, progress=False)
    whole_val = split_loss(
        result.model, eval_windows(dataset, "val", params.model.block_size), 256, device, params.train.precision
    )
    budgets = [
        {"budget_s": b, "val_loss": next((e["val_loss"] for e in reversed(timeline) if e["seconds"] <= b), None)}
        for b in floats(args.budgets)
    ]
    targets = [
        {"target": t, "seconds": next((e["seconds"] for e in timeline if e["val_loss"] <= t), None)}
        for t in floats(args.targets)
    ]
    return {
        "benchmark": "time_to_quality",
        "command": " ".join(["python -m benchmarks.time_to_quality", *sys.argv[1:]]),
        "machine": machine(device),
        "example": args.example,
        "train_seconds": clock["seconds"],
        "steps": result.steps,
        "tokens_per_sec": result.steps * tokens / clock["seconds"],
        "final_val_loss": timeline[-1]["val_loss"],
        "whole_split_val_loss": whole_val,
        "budgets": budgets,
        "targets": targets,
        "timeline": timeline,
    }


def report(results: dict) -> None:
    print(format_table(results["budgets"], {"budget_s": "{:g}", "val_loss": "{:.4f}"}))
    print(format_table(results["targets"], {"target": "{:.2f}", "seconds": "{:.1f}"}))
    print(
        f"{results['steps']} steps in {results['train_seconds']:.1f} s of training "
        f"({results['tokens_per_sec']:,.0f} tokens/s); final val loss {results['final_val_loss']:.4f} "
        f"(whole validation split: {results['whole_split_val_loss']:.4f})"
    )


def main(argv=None) -> int:
    return run_benchmark(build_parser(), run, report, argv)


if __name__ == "__main__":
    sys.exit(main())
