"""What the benchmarks share: the example's data and params, the machine, a matmul peak, tables."""

import argparse
import datetime
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from pipeline.cli import add_override_arguments, given_overrides
from pipeline.config import example_params, load_params
from pipeline.data import Dataset, load_dataset, prepare
from pipeline.device import cpu_flags, cpu_supports_bf16, onednn_isa_cap
from pipeline.errors import PipelineError
from pipeline.files import write_json
from pipeline.model import GPT
from pipeline.paths import ExamplePaths
from pipeline.schema import ExampleParams

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "overrides" / "nanogpt.txt"  # nanoGPT's recipe: the baseline both training benchmarks run


def benchmark_parser(module_file: str, doc: str, epilog: str) -> argparse.ArgumentParser:
    """The parser of `python -m benchmarks.<name>`, named by its file (run with -m, its `__name__` is
    `__main__`): its docstring's first paragraph, an example, the common arguments."""
    name = Path(module_file).stem
    parser = argparse.ArgumentParser(
        prog=f"python -m benchmarks.{name}", description=doc.split("\n\n")[0], epilog=f"Example: {epilog}"
    )
    add_common_arguments(parser)
    return parser


def add_common_arguments(parser: argparse.ArgumentParser, example: str = "shakespeare") -> None:
    parser.add_argument("--example", default=example, help="a section of the params file (default: %(default)s)")
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml", help="default: params.yaml")
    add_override_arguments(parser)
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the results as JSON here")


def add_reference_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--reference",
        type=lambda text: None if text == "none" else Path(text),
        default=REFERENCE,
        help="the reference's overrides file, on top of params.yaml; none: no reference (default: %(default)s)",
    )


def example_config(args) -> ExampleParams:
    """The example's params; folds any --set-file lines into `args.overrides`, ahead of --set."""
    args.overrides, args.override_files = given_overrides(args), []
    return example_params(load_params(args.params, args.overrides), args.example, args.params)


def load_example(params: ExampleParams, example: str) -> Dataset:
    """The example's data, prepared afresh in a temporary folder: no DVC state needed."""
    with tempfile.TemporaryDirectory() as folder:
        paths = ExamplePaths(Path(folder), example)
        paths.input.parent.mkdir(parents=True)
        paths.input.write_bytes(ExamplePaths(ROOT, example).input.read_bytes())
        prepare(params.data, paths)
        return load_dataset(paths)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        return f"{cpu_name()}, {torch.get_num_threads()} threads"
    return device.type


def cpu_class() -> str:
    """The CPU's class, by the bf16 instructions its flags name: what decides its fast precision.
    A bf16 CPU whose oneDNN is capped below them (`ONEDNN_MAX_CPU_ISA`) says so: it emulates bf16."""
    flags, cap = cpu_flags(), onednn_isa_cap()
    for flag, name in (("amx_bf16", "AMX"), ("avx512_bf16", "AVX512-BF16")):
        if flag in flags:
            capped = f" run as one without (oneDNN capped to {cap})" if cap else ""
            return f"CPU with bf16 ({name}){capped}"
    return "CPU without bf16 (AVX2)" if "avx2" in flags else "CPU without bf16"


def machine_class(device: torch.device) -> str:
    """What every table names: the GPU, or the CPU's model and its bf16 class."""
    if device.type == "cuda":
        return f"GPU: {torch.cuda.get_device_name(device)}"
    if device.type == "cpu":
        return f"{cpu_class()}: {cpu_name()}"
    return device.type


def machine(device: torch.device) -> dict:
    """Where and when the figures were taken; the load average says how shared the machine was."""
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": str(device),
        "device_name": device_name(device),
        "machine_class": machine_class(device),
        "torch": torch.__version__,
        "cpu_bf16": cpu_supports_bf16(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, dtype: torch.dtype, size: int, seconds: float = 0.5) -> float:
    """GFLOP/s of a large square matrix product, the best of a few timed bursts."""
    a, b = (torch.randn(size, size, device=device).to(dtype) for _ in range(2))
    a @ b  # warm-up
    best = 0.0
    burst = 10 if device.type == "cuda" else 1  # queue a few products between waits on a GPU
    for _ in range(3):
        synchronize(device)
        start, count = time.perf_counter(), 0
        while time.perf_counter() - start < seconds / 3:
            for _ in range(burst):
                a @ b
            count += burst
            synchronize(device)
        elapsed = time.perf_counter() - start
        best = max(best, 2 * size**3 * count / elapsed / 1e9)
    return best


def flops_per_token(model: GPT) -> int:
    """Training FLOPs per token as nanoGPT counts them: 6 per parameter, plus attention.

    Forward and backward of every matrix product (6 N), and the attention scores and their
    use over the whole block (12 L C T; counting the causal half would halve that term). The
    bigram and n-gram tables are looked up, never multiplied: they are left out.
    """
    c = model.config
    lookups = sum(table.weight.numel() for table in model.lookup_tables())
    return 6 * (model.num_params() - lookups) + 12 * c.n_layer * c.n_embd * c.block_size


def format_table(rows: list[dict], columns: dict[str, str]) -> str:
    """A plain-text table of `rows`; `columns` maps a key to its format, e.g. {'ms': '{:.1f}'}."""
    cells = [[key for key in columns]]
    for row in rows:
        cells.append([fmt.format(row[key]) if row.get(key) is not None else "-" for key, fmt in columns.items()])
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def save_results(path: Path | None, payload: dict) -> None:
    if path:
        write_json(path, payload)
        print(f"results written to {path}")


def run_benchmark(parser: argparse.ArgumentParser, run, report, argv=None) -> int:
    """Parse, run, print the report and the load average, save the JSON: the shape of every benchmark.

    `report(results)` prints the tables and may return a non-zero exit status.
    """
    args = parser.parse_args(argv)
    try:
        results = run(args)
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    status = report(results) or 0
    m = results["machine"]
    print(f"on {m['machine_class']}, torch {m['torch']}; load average {m['load_average']}, {m['date']}")
    save_results(args.json, results)
    return status
