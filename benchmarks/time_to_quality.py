"""Time to quality, side by side: the reference (nanoGPT's recipe) and the candidate (the example's
params and any --set or --set-file, which change the candidate only), one after the other in one
run on one machine; both train on the candidate's data.

Each trains through the pipeline's own loop; every `--eval-interval` steps the benchmark measures
the loss on the whole validation split in float32, outside the clock: seconds count training
steps only. It reports, for each side, the seconds to the reference's best validation loss (its
final one while the curve still falls; on a GPU nanoGPT's recipe overfits and, like nanoGPT and the
train stage's best.pt, a run keeps its best) and the best loss reached within the reference's
training seconds, and the two ratios; then the best loss within each time budget and the seconds to
each target loss. For a word list, also the share of real words among 1,000 sampled and the exact
probability of sampling one (the evaluate stage's `valid_share` and `valid_mass`) at every
evaluation.

    python -m benchmarks.time_to_quality --help
"""

import argparse
import sys

from benchmarks.common import (
    add_reference_argument,
    benchmark_parser,
    example_config,
    format_table,
    load_example,
    machine,
    run_benchmark,
)
from pipeline.config import example_params, load_params
from pipeline.device import pick_device
from pipeline.evaluation import eval_windows, split_loss, word_metrics
from pipeline.model import build_model
from pipeline.overrides import read_overrides_file
from pipeline.records import StepRecord
from pipeline.schema import EvaluateParams, ExampleParams
from pipeline.training import TrainCallbacks, train


def build_parser() -> argparse.ArgumentParser:
    example = "python -m benchmarks.time_to_quality   (Shakespeare: reference, then defaults; ~6 minutes)"
    parser = benchmark_parser(__file__, __doc__, example)
    add_reference_argument(parser)
    parser.add_argument("--eval-interval", type=int, default=100, help="steps between evaluations (default: 100)")
    parser.add_argument("--budgets", default="30,60,120", help="seconds of training (default: %(default)s)")
    parser.add_argument("--targets", default="2.0,1.9,1.8,1.7", help="validation losses (default: %(default)s)")
    return parser


WORD_METRICS = ("valid_share", "valid_mass")
EVAL_BATCH = EvaluateParams().batch_size  # the evaluate stage's windows per forward pass


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",")]


def train_timeline(label: str, params: ExampleParams, dataset, interval: int) -> dict:
    """Train `params`; the validation loss on the whole split against training seconds."""
    device = pick_device(params.train.device)
    model = build_model(params.model, dataset.vocab.size, params.train.seed)
    windows = eval_windows(dataset, "val", params.model.block_size)
    tokens = params.train.batch_size * params.model.block_size
    clock = {"seconds": 0.0, "first_step": None}
    timeline = []

    def on_step(record: StepRecord) -> None:
        clock["seconds"] += tokens / record.tokens_per_sec
        clock["first_step"] = clock["first_step"] or clock["seconds"]  # with torch.compile, mostly compiling

    def on_eval(record) -> None:
        point = {"step": record.step, "seconds": clock["seconds"]}
        point["val_loss"] = split_loss(model, windows, EVAL_BATCH, device, "float32")  # one yardstick for both sides
        if params.evaluate.words is not None:  # a word list: how many sampled words are real ones
            metrics = word_metrics(model, dataset, params.evaluate.words, device)
            point |= {key: metrics[key] for key in WORD_METRICS}
        model.train()
        timeline.append(point)
        shown = "".join(f", {key} {point[key]:.4f}" for key in WORD_METRICS if key in point)
        loss = point["val_loss"]
        print(f"  {label}: {point['seconds']:6.1f} s, step {point['step']}: val loss {loss:.4f}{shown}", flush=True)

    print(f"{label}: {model.num_params():,} parameters, {params.train.max_steps} steps on {device}", flush=True)
    callbacks = TrainCallbacks(on_step=on_step, on_eval=on_eval)
    result = train(model, dataset, params=params.train, device=device, callbacks=callbacks, progress=False)
    words = {key: timeline[-1][key] for key in WORD_METRICS if key in timeline[-1]}
    return words | {
        "label": label,
        "train_seconds": clock["seconds"],
        "first_step_seconds": clock["first_step"],
        "steps": result.steps,
        "tokens_per_sec": result.steps * tokens / clock["seconds"],
        "ms_per_step": clock["seconds"] / result.steps * 1e3,
        "final_val_loss": timeline[-1]["val_loss"],
        "best_val_loss": min(point["val_loss"] for point in timeline),
        "timeline": timeline,
    }


def seconds_to(timeline: list[dict], target: float) -> float | None:
    """When the loss first reached `target`, interpolated between the evaluations around it."""
    before = {"seconds": 0.0, "val_loss": float("inf")}
    for point in timeline:
        if point["val_loss"] <= target:
            if before["val_loss"] == float("inf"):
                return point["seconds"]
            share = (before["val_loss"] - target) / (before["val_loss"] - point["val_loss"])
            return before["seconds"] + share * (point["seconds"] - before["seconds"])
        before = point
    return None


def loss_at(timeline: list[dict], seconds: float) -> float | None:
    """The best loss within `seconds` of training, interpolated between evaluations; a run that ended
    sooner keeps its best."""
    lowest, best_so_far = float("inf"), []
    for point in timeline:
        lowest = min(lowest, point["val_loss"])
        best_so_far.append({"seconds": point["seconds"], "val_loss": lowest})
    before = None
    for point in best_so_far:
        if point["seconds"] >= seconds:
            if before is None:
                return None
            share = (seconds - before["seconds"]) / (point["seconds"] - before["seconds"])
            return before["val_loss"] + share * (point["val_loss"] - before["val_loss"])
        before = point
    return lowest


def side_params(args, overrides: list[str]) -> ExampleParams:
    loop = [f"{args.example}.train.eval_interval={args.eval_interval}", f"{args.example}.train.eval_batches=1"]
    return example_params(load_params(args.params, overrides + loop), args.example, args.params)


def run(args) -> dict:
    candidate_params = example_config(args)  # folds --set-file into args.overrides
    sides = [("candidate", side_params(args, args.overrides))]
    if args.reference:
        sides.insert(0, ("reference", side_params(args, read_overrides_file(args.reference))))
    dataset = load_example(candidate_params, args.example)
    runs = [train_timeline(label, params, dataset, args.eval_interval) for label, params in sides]
    reference = runs[0] if args.reference else None
    for side in runs:
        side["budgets"] = [{"budget_s": b, "val_loss": loss_at(side["timeline"], b)} for b in floats(args.budgets)]
        side["targets"] = [{"target": t, "seconds": seconds_to(side["timeline"], t)} for t in floats(args.targets)]
        if reference:
            side["seconds_to_reference_loss"] = seconds_to(side["timeline"], reference["best_val_loss"])
            side["loss_at_reference_seconds"] = loss_at(side["timeline"], reference["train_seconds"])
    ratios = {}
    if reference and (seconds := runs[-1]["seconds_to_reference_loss"]):
        ratios["time_to_reference_loss"] = reference["seconds_to_reference_loss"] / seconds
    if reference:
        ratios["tokens_per_sec"] = runs[-1]["tokens_per_sec"] / reference["tokens_per_sec"]
    return {
        "benchmark": "time_to_quality",
        "command": " ".join(["python -m benchmarks.time_to_quality", *sys.argv[1:]]),
        "machine": machine(pick_device(candidate_params.train.device)),
        "example": args.example,
        "reference_file": str(args.reference) if args.reference else None,
        "sides": runs,
        "ratios": ratios,
    }


SIDE_COLUMNS = {
    "label": "{}",
    "steps": "{}",
    "train_seconds": "{:.1f}",
    "first_step_seconds": "{:.1f}",
    "ms_per_step": "{:.1f}",
    "tokens_per_sec": "{:,.0f}",
    "final_val_loss": "{:.4f}",
    "best_val_loss": "{:.4f}",
    "seconds_to_reference_loss": "{:.1f}",
    "loss_at_reference_seconds": "{:.4f}",
    "valid_share": "{:.3f}",
    "valid_mass": "{:.4f}",
}


def report(results: dict) -> None:
    print(format_table(results["sides"], SIDE_COLUMNS))
    for side in results["sides"]:
        budgets = ", ".join(
            f"{b['budget_s']:g} s: {b['val_loss']:.4f}" if b["val_loss"] is not None else f"{b['budget_s']:g} s: -"
            for b in side["budgets"]
        )
        targets = ", ".join(
            f"{t['target']:g} at {t['seconds']:.1f} s" if t["seconds"] is not None else f"{t['target']:g} never"
            for t in side["targets"]
        )
        print(f"{side['label']}: loss after {budgets}; reached {targets}")
    if ratio := results["ratios"].get("time_to_reference_loss"):
        reference = results["sides"][0]
        print(
            f"time to the reference's best loss {reference['best_val_loss']:.4f}: {ratio:.2f}x faster; "
            f"best loss within the reference's {reference['train_seconds']:.1f} s: "
            f"{results['sides'][-1]['loss_at_reference_seconds']:.4f} (reference {reference['best_val_loss']:.4f}); "
            f"tokens/s {results['ratios']['tokens_per_sec']:.2f}x"
        )
    elif results["reference_file"]:
        print("the candidate never reached the reference's best loss")


def main(argv=None) -> int:
    return run_benchmark(build_parser(), run, report, argv)


if __name__ == "__main__":
    sys.exit(main())
