"""Sampling speed with and without the key/value cache, and a check that both give the same text.

Generates `--tokens` new tokens for `--batch` sequences from a one-token prompt, the way the sample
stage does, with `pipeline.sampling.generate(use_cache=True)` and with `use_cache=False` (the whole context
recomputed for every token). Up to `block_size` tokens the cache feeds one token per step; past it
the context window slides and both paths recompute it (absolute position embeddings).

    python -m benchmarks.sampling --help
"""

import argparse
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import (
    benchmark_parser,
    example_config,
    format_table,
    machine,
    run_benchmark,
    synchronize,
)
from pipeline.checkpoint import load_checkpoint
from pipeline.device import pick_device
from pipeline.model import build_model
from pipeline.sampling import generate


def build_parser() -> argparse.ArgumentParser:
    parser = benchmark_parser(
        __file__, __doc__, "python -m benchmarks.sampling --checkpoint models/shakespeare/ckpt.pt"
    )
    parser.add_argument("--checkpoint", type=Path, help="a trained model (default: a fresh one of the example's shape)")
    parser.add_argument("--tokens", help="comma-separated numbers of new tokens (default: block_size and 300)")
    parser.add_argument("--batch", type=int, default=2, help="sequences sampled at once (default: %(default)s)")
    parser.add_argument("--vocab-size", type=int, default=65, help="for a fresh model (default: 65)")
    return parser


def timed_generate(model, prompt, new_tokens: int, use_cache: bool, device) -> tuple[torch.Tensor, float]:
    generator = torch.Generator(device=device).manual_seed(1337)
    synchronize(device)
    start = time.perf_counter()
    out = generate(model, prompt, new_tokens, 0.8, 40, generator, use_cache=use_cache)
    synchronize(device)
    return out, time.perf_counter() - start


def run(args) -> dict:
    params = example_config(args)
    device = pick_device(params.train.device)
    if args.checkpoint:
        checkpoint = load_checkpoint(args.checkpoint, device)
        model, vocab_size = checkpoint.model, checkpoint.vocab.size
    else:
        model, vocab_size = (
            build_model(params.model, args.vocab_size, params.train.seed).to(device).eval(),
            args.vocab_size,
        )
    block = model.config.block_size
    lengths = [int(t) for t in args.tokens.split(",")] if args.tokens else sorted({block, 300})
    prompt = torch.zeros(args.batch, 1, dtype=torch.long, device=device)
    timed_generate(model, prompt, 2, True, device)  # warm-up
    rows = []
    for new_tokens in lengths:
        cached, cached_s = timed_generate(model, prompt, new_tokens, True, device)
        plain, plain_s = timed_generate(model, prompt, new_tokens, False, device)
        rows.append(
            {
                "new_tokens": new_tokens,
                "batch": args.batch,
                "cached_tokens_per_sec": new_tokens * args.batch / cached_s,
                "uncached_tokens_per_sec": new_tokens * args.batch / plain_s,
                "speedup": plain_s / cached_s,
                "same_tokens": bool(torch.equal(cached, plain)),
            }
        )
    return {
        "benchmark": "sampling",
        "command": " ".join(["python -m benchmarks.sampling", *sys.argv[1:]]),
        "machine": machine(device),
        "model": {k: getattr(model.config, k) for k in ("n_layer", "n_head", "n_embd", "block_size")},
        "vocab_size": vocab_size,
        "checkpoint": str(args.checkpoint) if args.checkpoint else None,
        "rows": rows,
    }


COLUMNS = {
    "new_tokens": "{}",
    "batch": "{}",
    "cached_tokens_per_sec": "{:,.0f}",
    "uncached_tokens_per_sec": "{:,.0f}",
    "speedup": "{:.2f}x",
    "same_tokens": "{}",
}


def report(results: dict) -> int:
    """The table; exit status 1 if the cached and uncached paths gave different tokens."""
    m = results["model"]
    print(f"{m['n_layer']} layers, {m['n_embd']} wide, block {m['block_size']} on {results['machine']['device_name']}")
    print(format_table(results["rows"], COLUMNS))
    return 0 if all(r["same_tokens"] for r in results["rows"]) else 1


def main(argv=None) -> int:
    return run_benchmark(build_parser(), run, report, argv)


if __name__ == "__main__":
    sys.exit(main())
