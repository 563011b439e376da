"""Each benchmark runs end to end on a tiny configuration, so that none of them can rot.

They measure speed; these tests check only that they run and report every figure they promise.
"""

import json
import subprocess
import sys

import pytest

from .helpers import ROOT

TINY_TOY = [
    "--example",
    "toy",
    "--set",
    "toy.model.n_layer=1",
    "--set",
    "toy.model.n_embd=32",
    "--set",
    "toy.data.repeats=4",
]


def run_benchmark(name: str, *args: str, tmp_path) -> dict:
    out = tmp_path / f"{name}.json"
    result = subprocess.run(
        [sys.executable, "-m", f"benchmarks.{name}", *args, "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "load average" in result.stdout
    return json.loads(out.read_text())


@pytest.mark.parametrize("name", ["train_step", "time_to_quality", "sampling"])
def test_every_benchmark_has_help(name):
    result = subprocess.run([sys.executable, "-m", f"benchmarks.{name}", "--help"], cwd=ROOT, capture_output=True)
    assert result.returncode == 0 and b"--json" in result.stdout


def test_train_step_compares_variants_with_every_figure(tmp_path):
    results = run_benchmark(
        "train_step",
        *TINY_TOY,
        "--variants",
        "float32,bfloat16",
        "--batch-sizes",
        "8,16",
        "--threads",
        "1",
        "--steps",
        "6",
        "--matmul-size",
        "128",
        tmp_path=tmp_path,
    )
    rows = results["rows"]
    assert [(r["variant"], r["batch"]) for r in rows] == [
        ("float32", 8),
        ("bfloat16", 8),
        ("float32", 16),
        ("bfloat16", 16),
    ]
    for row in rows:
        assert row["ms_per_step"] > 0 and row["tokens_per_sec"] > 0 and row["peak_mem_mib"] > 0
        assert row["peak_share"] > 0 and row["gflops"] > 0 and row["threads"] == 1
        assert row["val_loss"] > 0 and row["train_loss"] > 0
    assert rows[0]["speedup"] == 1.0
    assert set(results["matmul_peak_gflops"]) == {"float32", "bfloat16"}
    assert results["machine"]["device"] == "cpu" and len(results["machine"]["load_average"]) == 3


def test_an_unknown_variant_is_refused():
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.train_step", "--variants", "float16"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and "unknown variant float16" in result.stderr


def test_time_to_quality_reports_budgets_and_targets(tmp_path):
    results = run_benchmark(
        "time_to_quality",
        *TINY_TOY,
        "--set",
        "toy.train.max_steps=40",
        "--set",
        "toy.train.warmup_steps=5",
        "--eval-interval",
        "10",
        "--budgets",
        "0.001,1000",
        "--targets",
        "100,0.01",
        tmp_path=tmp_path,
    )
    assert [e["step"] for e in results["timeline"]] == [10, 20, 30, 40]
    early, late = results["budgets"]
    assert early["val_loss"] is None and late["val_loss"] == results["final_val_loss"]
    reached, missed = results["targets"]
    assert reached["seconds"] == results["timeline"][0]["seconds"] > 0 and missed["seconds"] is None
    assert results["whole_split_val_loss"] > 0 and results["steps"] == 40


def test_sampling_reports_both_speeds_and_the_same_tokens_with_and_without_the_cache(tmp_path):
    results = run_benchmark("sampling", "--set", "shakespeare.model.n_layer=1", "--tokens", "16,40", tmp_path=tmp_path)
    assert [r["new_tokens"] for r in results["rows"]] == [16, 40]
    assert all(r["same_tokens"] for r in results["rows"])
    assert all(r["cached_tokens_per_sec"] > 0 and r["uncached_tokens_per_sec"] > 0 for r in results["rows"])
