"""Where a training step's time goes, and whether any op runs in a dtype the device only emulates.

Trains the example's model through the pipeline's own loop (`pipeline.training.train`) under
`torch.profiler`, skipping the first `--skip` steps (warm-up) and recording the next `--steps`
with their inputs' dtypes. It prints the operations with the most self time per step, and every
operation that took bf16 inputs. On a CPU without bf16 instructions (AVX2 only) such an operation is
emulated, about 50x slower than in float32, so the benchmark then exits with status 1.

    python -m benchmarks.profile_step --help
"""

import argparse
import sys
from collections import defaultdict

from torch.profiler import ProfilerActivity, profile, schedule

from benchmarks.common import benchmark_parser, example_config, format_table, load_example, machine, run_benchmark
from pipeline.device import multiplies_bf16, pick_device
from pipeline.model import build_model
from pipeline.training import TrainCallbacks, train

COLUMNS = {"op": "{}", "calls_per_step": "{:.1f}", "ms_per_step": "{:.2f}", "share": "{:.1%}", "dtypes": "{}"}
LOW_PRECISION = {"c10::BFloat16", "c10::Half"}
# ops that only reshape or alias a tensor: no arithmetic to emulate
VIEWS = {"as_strided", "permute", "numpy_T", "t", "transpose", "view", "reshape", "_unsafe_view", "expand", "slice"}
VIEWS |= {"select", "split", "chunk", "unsqueeze", "squeeze", "alias", "detach", "resolve_conj", "resolve_neg"}


def build_parser() -> argparse.ArgumentParser:
    parser = benchmark_parser(__file__, __doc__, "python -m benchmarks.profile_step --steps 10 --top 15")
    parser.add_argument("--steps", type=int, default=10, help="profiled steps (default: %(default)s)")
    parser.add_argument("--skip", type=int, default=3, help="warm-up steps before them (default: %(default)s)")
    parser.add_argument("--top", type=int, default=12, help="operations to list (default: %(default)s)")
    return parser


def op_rows(events, steps: int) -> list[dict]:
    """Self time of each top-level operator (aten::*), per profiled step, with its inputs' dtypes."""
    totals = defaultdict(lambda: {"us": 0.0, "calls": 0, "dtypes": set()})
    for event in events:
        if not event.name.startswith("aten::"):
            continue
        row = totals[event.name]
        row["us"] += event.self_device_time_total if event.device_type.name == "CUDA" else event.self_cpu_time_total
        row["calls"] += 1
        row["dtypes"] |= {d for d in getattr(event, "input_dtypes", None) or [] if d}
    whole = sum(r["us"] for r in totals.values()) or 1.0
    rows = [
        {
            "op": name,
            "calls_per_step": r["calls"] / steps,
            "ms_per_step": r["us"] / 1e3 / steps,
            "share": r["us"] / whole,
            "dtypes": ",".join(sorted(d.removeprefix("c10::") for d in r["dtypes"])),
            "low_precision": bool(r["dtypes"] & LOW_PRECISION) and name.removeprefix("aten::") not in VIEWS,
        }
        for name, r in totals.items()
    ]
    return sorted(rows, key=lambda r: -r["ms_per_step"])


def run(args) -> dict:
    params = example_config(args)
    dataset = load_example(params, args.example)
    device = pick_device(params.train.device)
    model = build_model(params.model, dataset.vocab.size, params.train.seed)
    steps = args.skip + args.steps
    train_params = params.train.__class__(
        **{**params.train.__dict__, "max_steps": steps, "eval_interval": steps, "warmup_steps": 0}
    )
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(
        activities=activities, record_shapes=True, schedule=schedule(wait=args.skip, warmup=0, active=args.steps)
    ) as profiler:
        callbacks = TrainCallbacks(on_step=lambda record: profiler.step())
        train(model, dataset, params=train_params, device=device, callbacks=callbacks, progress=False)
    rows = op_rows(profiler.events(), args.steps)
    return {
        "benchmark": "profile_step",
        "command": " ".join(["python -m benchmarks.profile_step", *sys.argv[1:]]),
        "machine": machine(device),
        "example": args.example,
        "native_bf16": multiplies_bf16(device),
        "steps": args.steps,
        "top": args.top,
        "rows": rows,
        "emulated": [] if multiplies_bf16(device) else [r["op"] for r in rows if r["low_precision"]],
    }


def report(results: dict) -> int:
    """The top operations; exit status 1 if any op ran in bf16 where bf16 is emulated."""
    print(format_table(results["rows"][: results["top"]], COLUMNS))
    low = [r["op"] for r in results["rows"] if r["low_precision"]]
    print(f"ops with bf16 inputs: {', '.join(low) or 'none'}")
    if results["emulated"]:
        print(f"emulated here (no bf16 instructions): {', '.join(results['emulated'])}")
        return 1
    return 0


def main(argv=None) -> int:
    return run_benchmark(build_parser(), run, report, argv)


if __name__ == "__main__":
    sys.exit(main())
