"""Muon's step on the example's matrices: `torch.optim.Muon` beside the project's own, in one run.

Builds the example's model, gives each of its blocks' matrices a random gradient, and times
`--steps` optimizer steps of each side: torch's (Newton–Schulz in bf16, one matrix at a time) and
`pipeline.optim.Muon` (one batched product per shape) in float32 and, where the device multiplies
bf16 natively, in bf16. It also gives each side's update against torch's, as a relative error.

    python -m benchmarks.optimizer_step --help
"""

import argparse
import statistics
import sys
import time

import torch

from benchmarks.common import benchmark_parser, example_config, format_table, machine, run_benchmark, synchronize
from pipeline.device import multiplies_bf16, pick_device
from pipeline.model import build_model
from pipeline.optim import Muon

COLUMNS = {"side": "{}", "dtype": "{}", "ms_per_step": "{:.2f}", "vs_torch": "{:.1f}x", "update_error": "{:.4f}"}


def build_parser() -> argparse.ArgumentParser:
    parser = benchmark_parser(__file__, __doc__, "python -m benchmarks.optimizer_step --steps 20")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per side (default: %(default)s)")
    parser.add_argument("--vocab-size", type=int, default=65, help="the model's vocabulary (default: 65)")
    return parser


def timed_update(make_optimizer, shapes, device, steps: int) -> tuple[float, list[torch.Tensor]]:
    """Median seconds per step of a fresh optimizer on matrices of `shapes`, and its first update."""
    generator = torch.Generator().manual_seed(0)
    matrices = [torch.nn.Parameter((torch.randn(s, generator=generator) * 0.02).to(device)) for s in shapes]
    grads = [torch.randn(s, generator=generator).to(device) for s in shapes]
    optimizer = make_optimizer(matrices)
    start = [m.detach().clone() for m in matrices]
    seconds = []
    for _ in range(steps + 1):  # the first step, with its warm-up, is left out of the median
        for m, g in zip(matrices, grads):
            m.grad = g
        synchronize(device)
        tick = time.perf_counter()
        optimizer.step()
        synchronize(device)
        seconds.append(time.perf_counter() - tick)
        if len(seconds) == 1:
            first_update = [m.detach() - s for m, s in zip(matrices, start)]
    return statistics.median(seconds[1:]), first_update


def run(args) -> dict:
    params = example_config(args)
    device = pick_device(params.train.device)
    model = build_model(params.model, args.vocab_size, params.train.seed)
    shapes = [tuple(p.shape) for p in model.hidden_matrices()]
    options = dict(lr=params.train.muon_lr, momentum=params.train.muon_momentum, adjust_lr_fn="match_rms_adamw")
    sides = [("torch.optim.Muon", "bfloat16", lambda ms: torch.optim.Muon(ms, **options))]
    for dtype in [torch.float32] + ([torch.bfloat16] if multiplies_bf16(device) else []):
        name = str(dtype).removeprefix("torch.")
        sides.append(("pipeline.optim.Muon", name, lambda ms, dtype=dtype: Muon(ms, dtype=dtype, **options)))
    rows, reference = [], None
    for side, dtype, make in sides:
        seconds, update = timed_update(make, shapes, device, args.steps)
        reference = reference or update
        error = max(((a - b).norm() / b.norm()).item() for a, b in zip(update, reference))
        rows.append({"side": side, "dtype": dtype, "ms_per_step": seconds * 1e3, "update_error": error})
    for row in rows:
        row["vs_torch"] = rows[0]["ms_per_step"] / row["ms_per_step"]
    return {
        "benchmark": "optimizer_step",
        "command": " ".join(["python -m benchmarks.optimizer_step", *sys.argv[1:]]),
        "machine": machine(device),
        "example": args.example,
        "matrices": len(shapes),
        "shapes": sorted(set(shapes)),
        "rows": rows,
    }


def report(results: dict) -> None:
    print(f"{results['example']}: {results['matrices']} matrices of shapes {results['shapes']}")
    print(format_table(results["rows"], COLUMNS))


def main(argv=None) -> int:
    return run_benchmark(build_parser(), run, report, argv)


if __name__ == "__main__":
    sys.exit(main())
