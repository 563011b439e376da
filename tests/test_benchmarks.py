"""Each benchmark runs end to end on a tiny configuration, so that none of them can rot.

They measure speed; these tests check only that they run and report every figure they promise.
"""

import json
import os
import subprocess
import sys

import pytest

from pipeline.device import cpu_supports_bf16

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


@pytest.mark.parametrize("name", ["train_step", "time_to_quality", "sampling", "profile_step", "optimizer_step"])
def test_every_benchmark_has_help(name):
    result = subprocess.run([sys.executable, "-m", f"benchmarks.{name}", "--help"], cwd=ROOT, capture_output=True)
    assert result.returncode == 0 and b"--json" in result.stdout
    assert f"usage: python -m benchmarks.{name} ".encode() in result.stdout


def test_train_step_compares_variants_with_every_figure_against_the_reference(tmp_path):
    reference = tmp_path / "reference.txt"
    reference.write_text(
        "toy.train.batch_size=4\ntoy.model.n_layer=1\ntoy.model.n_embd=32\ntoy.train.precision=bfloat16\n"
    )
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
        "--reference",
        str(reference),
        tmp_path=tmp_path,
    )
    rows = results["rows"]
    assert [(r["variant"], r["batch"]) for r in rows] == [
        ("reference", 4),
        ("float32", 8),
        ("bfloat16", 8),
        ("float32", 16),
        ("bfloat16", 16),
    ]
    for row in rows:
        assert row["ms_per_step"] > 0 and row["tokens_per_sec"] > 0 and row["peak_mem_mib"] > 0
        assert row["gflops"] > 0 and row["threads"] == 1
        assert row["val_loss"] > 0 and row["train_loss"] > 0
    # a ratio of the same run's throughputs (which of two is faster on a busy 2-core machine is not tested)
    speeds = [r["tokens_per_sec"] for r in rows]
    assert [r["vs_reference"] for r in rows] == pytest.approx([speed / speeds[0] for speed in speeds])
    assert [(r["precision"], r["compile"]) for r in rows[:3]] == [
        ("bfloat16", False),
        ("float32", False),
        ("bfloat16", False),
    ]
    # a bf16 peak only where bf16 is native; each row's MFU is against its own precision's peak
    peaks = results["matmul_peak_gflops"]
    assert set(peaks) == ({"float32", "bfloat16"} if cpu_supports_bf16() else {"float32"})
    for row in rows:
        expected = row["gflops"] / peaks[row["precision"]] if row["precision"] in peaks else None
        assert row["mfu"] == (pytest.approx(expected) if expected else None)
    assert results["machine"]["device"] == "cpu" and len(results["machine"]["load_average"]) == 3
    assert results["machine"]["machine_class"].startswith(("CPU with bf16", "CPU without bf16"))


def test_the_cuda_graphs_variant_compiles_in_reduce_overhead_mode():
    from benchmarks.train_step import VARIANTS, job_overrides
    from pipeline.config import load_params

    overrides = job_overrides("toy", VARIANTS["bfloat16+cudagraphs"], batch=8, threads=1, steps=10, warmup=5)
    train = load_params(ROOT / "params.yaml", overrides)["toy"].train
    assert (train.precision, train.compile, train.compile_mode) == ("bfloat16", True, "reduce-overhead")


def test_the_gpu_check_skips_each_part_its_budget_cannot_hold_and_says_so(tmp_path):
    env = os.environ | {"BUDGET": "0", "PYTHON": sys.executable, "WHEELS": str(tmp_path / "no-wheels")}
    result = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh", str(tmp_path / "out")], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    parts = ["tests", "time_to_quality", "train_step", "profile_step", "prepare", "sweep_1_workers", "sweep_4_workers"]
    assert [line.split(":")[0].removeprefix("== ") for line in result.stdout.splitlines() if "skipped" in line] == parts
    assert (tmp_path / "out" / "gpu_check.log").exists()


def test_an_unknown_variant_is_refused():
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.train_step", "--variants", "float16"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and "unknown variant float16" in result.stderr


def test_time_to_quality_runs_the_reference_then_the_candidate_and_compares_them(tmp_path):
    reference = tmp_path / "reference.txt"
    weaker = ["toy.train.learning_rate=1e-4", "toy.train.min_lr=1e-5", "toy.train.max_steps=20"]
    reference.write_text("# a weaker recipe\n" + "\n".join([*weaker, "toy.train.warmup_steps=5"]) + "\n")
    results = run_benchmark(
        "time_to_quality",
        *TINY_TOY,
        "--set",
        "toy.train.max_steps=40",
        "--set",
        "toy.train.warmup_steps=5",
        "--reference",
        str(reference),
        "--eval-interval",
        "10",
        "--budgets",
        "0.000001,1000",
        "--targets",
        "100,0.01",
        tmp_path=tmp_path,
    )
    ref, candidate = results["sides"]
    assert (ref["label"], ref["steps"], candidate["label"], candidate["steps"]) == ("reference", 20, "candidate", 40)
    assert [e["step"] for e in candidate["timeline"]] == [10, 20, 30, 40]
    assert 0 < candidate["first_step_seconds"] < candidate["timeline"][0]["seconds"]
    early, late = candidate["budgets"]
    assert early["val_loss"] is None and late["val_loss"] == candidate["best_val_loss"]
    assert candidate["best_val_loss"] == min(e["val_loss"] for e in candidate["timeline"])
    reached, missed = candidate["targets"]
    assert reached["seconds"] == candidate["timeline"][0]["seconds"] > 0 and missed["seconds"] is None
    assert ref["seconds_to_reference_loss"] <= ref["train_seconds"]
    assert candidate["final_val_loss"] < ref["final_val_loss"]  # ten times the learning rate, twice the steps
    ratio = results["ratios"]["time_to_reference_loss"]
    assert ratio == pytest.approx(ref["seconds_to_reference_loss"] / candidate["seconds_to_reference_loss"])
    assert candidate["loss_at_reference_seconds"] < ref["best_val_loss"]


def test_the_loss_within_a_time_is_the_best_so_far_as_a_run_keeps_its_best_checkpoint():
    from benchmarks.time_to_quality import loss_at, seconds_to

    overfitting = [
        {"seconds": 1.0, "val_loss": 2.0},
        {"seconds": 2.0, "val_loss": 1.5},
        {"seconds": 3.0, "val_loss": 1.8},
    ]
    assert loss_at(overfitting, 0.5) is None and loss_at(overfitting, 1.5) == pytest.approx(1.75)
    assert loss_at(overfitting, 2.5) == loss_at(overfitting, 3.0) == loss_at(overfitting, 9.0) == 1.5
    assert seconds_to(overfitting, 1.6) == pytest.approx(1.8) and seconds_to(overfitting, 1.4) is None


def test_time_to_quality_without_a_reference_measures_the_candidate_alone(tmp_path):
    args = ["--set", "toy.train.max_steps=10", "--set", "toy.train.warmup_steps=2", "--eval-interval", "5"]
    args += ["--reference", "none"]
    results = run_benchmark("time_to_quality", *TINY_TOY, *args, tmp_path=tmp_path)
    assert [side["label"] for side in results["sides"]] == ["candidate"] and results["ratios"] == {}
    (side,) = results["sides"]
    assert all(0 <= point["valid_mass"] <= 1 and 0 <= point["valid_share"] <= 1 for point in side["timeline"])
    last = side["timeline"][-1]
    assert (side["valid_share"], side["valid_mass"]) == (last["valid_share"], last["valid_mass"])


@pytest.mark.parametrize(
    "name, shape, recipe",
    [
        ("nanogpt.txt", (4, 4, 128, 64), (12, 2000, "float32", False)),
        ("nanogpt-gpu.txt", (6, 6, 384, 256), (64, 5000, "bfloat16", True)),
    ],
)
def test_each_reference_is_nanogpts_recipe_in_full(name, shape, recipe):
    from pipeline.config import load_params
    from pipeline.overrides import read_overrides_file

    reference = load_params(ROOT / "params.yaml", read_overrides_file(ROOT / "overrides" / name))["shakespeare"]
    model, train = reference.model, reference.train
    assert (model.n_layer, model.n_head, model.n_embd, model.block_size) == shape
    assert (train.batch_size, train.max_steps, train.precision, train.compile) == recipe
    assert (model.positions, model.norm, model.mlp, model.qk_norm) == ("learned", "layernorm", "gelu", False)
    assert model.tie_embeddings and not model.zero_init and model.logit_softcap == 0 and not model.bias
    assert (train.optimizer, train.schedule, train.warmup_steps) == ("adamw", "cosine", 100)
    assert (train.learning_rate, train.min_lr, train.beta2, train.weight_decay) == (1e-3, 1e-4, 0.99, 0.1)


def test_profile_step_lists_the_top_ops_and_finds_no_bf16_in_a_float32_step(tmp_path):
    results = run_benchmark("profile_step", *TINY_TOY, "--steps", "2", "--skip", "1", tmp_path=tmp_path)
    ops = {row["op"]: row for row in results["rows"]}
    assert ops["aten::mm"]["ms_per_step"] > 0 and ops["aten::mm"]["dtypes"] == "float"
    assert results["emulated"] == [] and not any(row["low_precision"] for row in results["rows"])
    assert sum(row["share"] for row in results["rows"]) == pytest.approx(1.0)


def test_profile_step_fails_where_a_bf16_op_is_emulated(tmp_path):
    args = [*TINY_TOY, "--set", "toy.train.precision=bfloat16", "--steps", "1", "--skip", "1", "--json"]
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.profile_step", *args, str(tmp_path / "out.json")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    emulated = json.loads((tmp_path / "out.json").read_text())["emulated"]
    if cpu_supports_bf16():  # native here: listed, not failed
        assert result.returncode == 0 and emulated == [] and "ops with bf16 inputs: aten::" in result.stdout
    else:
        assert result.returncode == 1 and "aten::mm" in emulated and "emulated here" in result.stdout


def test_optimizer_step_times_torchs_muon_beside_ours_with_the_same_update(tmp_path):
    results = run_benchmark("optimizer_step", *TINY_TOY, "--steps", "2", tmp_path=tmp_path)
    rows = results["rows"]
    assert [(r["side"], r["dtype"]) for r in rows[:2]] == [
        ("torch.optim.Muon", "bfloat16"),
        ("pipeline.optim.Muon", "float32"),
    ]
    assert len(rows) == (3 if cpu_supports_bf16() else 2)  # ours in bf16 only where bf16 is native
    assert all(r["ms_per_step"] > 0 for r in rows) and rows[0]["update_error"] == 0
    assert all(0 < r["update_error"] < 0.05 for r in rows[1:])  # bf16's rounding, no more
    assert results["matrices"] == 4 and results["machine"]["machine_class"]


def test_flops_per_token_leave_out_the_bigram_table_which_is_only_looked_up():
    from benchmarks.common import flops_per_token
    from pipeline.model import ModelConfig, build_model

    plain, bigrams = (build_model(ModelConfig(bigram_embedding=b), 65, 0) for b in (False, True))
    assert bigrams.num_params() == plain.num_params() + (65 * 65 + 1) * 128
    assert flops_per_token(bigrams) == flops_per_token(plain)
