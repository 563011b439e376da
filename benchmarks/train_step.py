"""Training-step speed of one configuration in several variants, side by side, in one run.

The reference (nanoGPT's recipe, overrides/nanogpt.txt: float32, eager, its own batch of 12; on a
GPU overrides/nanogpt-gpu.txt: bf16, compiled, batch 64) runs first, at its own file's precision,
compilation and batch, and every variant's tokens/s is given against it. Each variant (float32 or
bf16 autocast, eager or torch.compile) at each batch size trains for `--steps` steps through the pipeline's own
loop (`pipeline.training.train`), in a fresh process so that compilation caches, threads and peak
memory do not carry over. The table gives ms per step (median of the second half of the steps),
tokens/s, achieved GFLOP/s and its share of a matrix-product peak measured in the same run (the
model FLOPs utilisation, MFU; CPU and GPU alike, bf16 only where the device multiplies it natively), peak
memory, and the losses after the same number of steps.

    python -m benchmarks.train_step --help
"""

import argparse
import concurrent.futures
import multiprocessing
import resource
import statistics
import sys

import torch

from benchmarks.common import (
    add_reference_argument,
    benchmark_parser,
    example_config,
    flops_per_token,
    format_table,
    load_example,
    machine,
    matmul_peak,
    run_benchmark,
)
from pipeline.config import example_params, load_params
from pipeline.device import multiplies_bf16, pick_device, uses_bf16, uses_compile
from pipeline.errors import PipelineError
from pipeline.overrides import read_overrides_file

VARIANTS = {  # (precision, compile, compile_mode)
    "float32": ("float32", False, "default"),
    "bfloat16": ("bfloat16", False, "default"),
    "float32+compile": ("float32", True, "default"),
    "bfloat16+compile": ("bfloat16", True, "default"),
    "bfloat16+cudagraphs": ("bfloat16", True, "reduce-overhead"),  # CUDA graphs on a GPU
    "bfloat16+autotune": ("bfloat16", True, "max-autotune"),  # and tuned kernels: minutes of compiling
}
DEFAULT_VARIANTS = "float32,bfloat16,float32+compile,bfloat16+compile"
COLUMNS = {
    "variant": "{}",
    "batch": "{}",
    "threads": "{}",
    "ms_per_step": "{:.2f}",
    "tokens_per_sec": "{:,.0f}",
    "vs_reference": "{:.2f}x",
    "gflops": "{:.1f}",
    "mfu": "{:.0%}",
    "first_step_s": "{:.2f}",
    "peak_mem_mib": "{:,.0f}",
    "train_loss": "{:.4f}",
    "val_loss": "{:.4f}",
}


def build_parser() -> argparse.ArgumentParser:
    example = "python -m benchmarks.train_step --batch-sizes 12,64 --steps 200   (nanoGPT's batch of 12, and 64)"
    parser = benchmark_parser(__file__, __doc__, example)
    parser.add_argument(
        "--variants",
        default=DEFAULT_VARIANTS,
        help=f"comma-separated, from {', '.join(VARIANTS)} (default: %(default)s)",
    )
    parser.add_argument("--batch-sizes", help="comma-separated batch sizes (default: the example's train.batch_size)")
    parser.add_argument("--threads", help="comma-separated CPU thread counts (default: the example's train.threads)")
    parser.add_argument("--steps", type=int, default=200, help="training steps per variant (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=1, help="repeat every variant, keep its fastest round")
    add_reference_argument(parser)
    parser.add_argument("--matmul-size", type=int, default=2048, help="matrix side for the peak (default: 2048)")
    return parser


def job_overrides(example: str, setting: tuple, batch: int, threads: int, steps: int, warmup: int) -> list[str]:
    precision, compiled, mode = setting  # e.g. ("bfloat16", True, "default"), or the reference file's own
    train = f"{example}.train"
    return [
        f"{train}.threads={threads}",
        f"{train}.precision={precision}",
        f"{train}.compile={str(compiled).lower()}",
        f"{train}.compile_mode={mode}",
        f"{train}.batch_size={batch}",
        f"{train}.max_steps={steps}",
        f"{train}.warmup_steps={min(warmup, steps)}",
        f"{train}.eval_interval={steps}",
    ]


def measure(params_path, example: str, overrides: list[str]) -> dict:
    """Train one variant (in its own process) and return its figures."""
    from pipeline.model import build_model
    from pipeline.training import train

    params = example_params(load_params(params_path, overrides), example, params_path)
    dataset = load_example(params, example)
    device = pick_device(params.train.device)
    model = build_model(params.model, dataset.vocab.size, params.train.seed)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    result = train(model, dataset, params=params.train, device=device, progress=False)
    tokens = params.train.batch_size * params.model.block_size
    seconds = [tokens / h.tokens_per_sec for h in result.history]
    step = statistics.median(seconds[len(seconds) // 2 :])
    if device.type == "cuda":
        peak_mib = torch.cuda.max_memory_allocated(device) / 2**20
    else:  # the whole process, torch itself included: compare variants, not absolute sizes
        peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    return {
        "ms_per_step": step * 1e3,
        "tokens_per_sec": tokens / step,
        "first_step_s": seconds[0],
        "peak_mem_mib": peak_mib,
        "train_loss": statistics.mean(h.train_loss for h in result.history[-10:]),
        "val_loss": result.evals[-1].val_loss,
        "flops_per_token": flops_per_token(model),
        "num_params": model.num_params(),
    }


def in_fresh_process(*args) -> dict:
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(measure, *args).result()


def matmul_peaks(device: torch.device, size: int) -> dict[str, float]:
    """GFLOP/s of a large matrix product in float32, and in bf16 where the device multiplies it
    natively: an emulated bf16 product of 2048² takes minutes on a CPU without bf16 instructions."""
    dtypes = [torch.float32] + ([torch.bfloat16] if multiplies_bf16(device) else [])
    return {str(dtype).removeprefix("torch."): matmul_peak(device, dtype, size) for dtype in dtypes}


def run(args) -> dict:
    params = example_config(args)
    device = pick_device(params.train.device)
    variants = args.variants.split(",")
    if unknown := [v for v in variants if v not in VARIANTS]:
        raise PipelineError(f"unknown variant {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    batches = [int(b) for b in args.batch_sizes.split(",")] if args.batch_sizes else [params.train.batch_size]
    peaks = matmul_peaks(device, args.matmul_size)
    shown = ", ".join(f"{gflops:.0f} GFLOP/s {dtype}" for dtype, gflops in peaks.items())
    print(
        f"{args.example} ({params.model.n_layer} layers, {params.model.n_head} heads, {params.model.n_embd} wide, "
        f"block {params.model.block_size}) on {machine(device)['machine_class']}; matmul peak {shown}",
        flush=True,
    )
    threads = [int(t) for t in args.threads.split(",")] if args.threads else [params.train.threads]
    jobs = [(variant, batch, n) for n in threads for batch in batches for variant in variants]
    settings = dict(VARIANTS)  # each job's (precision, compile, compile_mode)
    if args.reference:
        reference_params = load_params(args.params, read_overrides_file(args.reference))
        reference = example_params(reference_params, args.example, args.params)
        jobs.insert(0, ("reference", reference.train.batch_size, threads[0]))
        settings["reference"] = (reference.train.precision, reference.train.compile, reference.train.compile_mode)
    best = {}
    for _ in range(args.rounds):  # rounds interleave the variants: a busy spell hits them all alike
        for job in jobs:
            variant, batch, n = job
            if variant == "reference":
                overrides = read_overrides_file(args.reference) + job_overrides(
                    args.example, settings["reference"], batch, n, args.steps, reference.train.warmup_steps
                )
            else:
                overrides = args.overrides + job_overrides(
                    args.example, settings[variant], batch, n, args.steps, params.train.warmup_steps
                )
            figures = in_fresh_process(args.params, args.example, overrides)
            if job not in best or figures["ms_per_step"] < best[job]["ms_per_step"]:
                best[job] = figures
            ms = figures["ms_per_step"]
            print(f"  {variant}, batch {batch}, {n or 'default'} threads: {ms:.2f} ms/step", flush=True)
    rows = []
    for variant, batch, n in jobs:
        figures = best[variant, batch, n]
        gflops = figures["flops_per_token"] * figures["tokens_per_sec"] / 1e9
        precision = "bfloat16" if uses_bf16(device, settings[variant][0]) else "float32"
        rows.append(
            {"variant": variant, "batch": batch, "threads": n or torch.get_num_threads()}
            | {"precision": precision, "compile": uses_compile(device, settings[variant][1])}
            | {"compile_mode": settings[variant][2]}
            | figures
            | {"gflops": gflops, "mfu": gflops / peaks[precision] if precision in peaks else None}
        )
    for row in rows:  # against the reference, or else the first variant
        row["vs_reference"] = row["tokens_per_sec"] / rows[0]["tokens_per_sec"]
    return {
        "benchmark": "train_step",
        "command": " ".join(["python -m benchmarks.train_step", *sys.argv[1:]]),
        "machine": machine(device),
        "example": args.example,
        "model": {k: getattr(params.model, k) for k in ("n_layer", "n_head", "n_embd", "block_size")},
        "steps": args.steps,
        "matmul_peak_gflops": peaks,
        "rows": rows,
    }


def report(results: dict) -> None:
    print(format_table(results["rows"], COLUMNS))


def main(argv=None) -> int:
    return run_benchmark(build_parser(), run, report, argv)


if __name__ == "__main__":
    sys.exit(main())
