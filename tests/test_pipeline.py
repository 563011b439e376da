"""The real pipeline: `dvc repro` and `dvc exp run` in a copy of the project, with tiny parameters."""

import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from pipeline.compare import runs_table
from pipeline.config import load_params
from pipeline.data import load_dataset, prepare
from pipeline.device import cpu_supports_bf16
from pipeline.evaluation import word_metrics
from pipeline.model import build_model
from pipeline.paths import ExamplePaths
from pipeline.sampling import complete_word, make_generator
from pipeline.tracking import Tracker
from pipeline.training import train

from .helpers import ROOT, commit, new_repo, same_weights, write_tiny_params
from .helpers import repo_env as env
from .helpers import run_ok as run

pytestmark = pytest.mark.slow

STAGES = ["prepare", "train", "evaluate", "sample", "inspect", "tune"]
OUTPUTS = ["ckpt.pt", "run.json", "loss.png", "history.csv", "evals.csv", "train.json", "metrics.json", "samples.txt"]
REPORTS = ["next-chars.txt", "loss.png", "1-CORN-next-chars.png", "1-CORN-attention.png"]


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """A fresh git + DVC repository holding the project, with tiny parameters, after one `dvc repro`."""
    path = new_repo(tmp_path_factory.mktemp("project"))
    imports = path.parent / "imports"  # what each stage process imported (tests/imports/sitecustomize.py)
    imports.mkdir()
    recording = {"PYTHONPATH": str(ROOT / "tests" / "imports"), "RECORD_IMPORTS_TO": str(imports)}
    result = run(path, "dvc", "repro", env=env() | recording)
    commit(path, "first repro")
    shutil.copytree(path, path.parent / "pristine", symlinks=True)  # as it is now, before the tests change it
    return path, result


def every_stage(params_file: Path = ROOT / "params.yaml") -> set[str]:
    """Every stage of dvc.yaml, for every example the params file lists."""
    lists = yaml.safe_load(params_file.read_text())
    return {f"{s}@{e}" for s in STAGES if s != "tune" for e in lists["examples"]} | {
        f"tune@{e}" for e in lists["sweeps"]
    }


def ran_stages(output: str) -> set[str]:
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage")}


def test_repro_runs_every_stage_and_writes_every_output(repo):
    path, output = repo
    assert ran_stages(output) == every_stage()
    assert {"best_params.yaml", "trials.csv"} <= {p.name for p in (path / "models/toy/tune").iterdir()}
    assert {"history.png", "intermediate.png"} <= {p.name for p in (path / "models/toy/tune-plots").iterdir()}
    assert yaml.safe_load((path / "models/toy/tune.json").read_text())["trials"] == 3
    for example in ("toy", "shakespeare"):
        for name in OUTPUTS:
            assert (path / "models" / example / name).stat().st_size > 0, f"{example}/{name}"
        reports = path / "models" / example / "reports"
        assert len(list(reports.glob("*-attention.png"))) == len(
            yaml.safe_load((path / "params.yaml").read_text())[example]["inspect"]["prompts"]
        )
        assert {p.name for p in (path / "data" / example / "prepared").iterdir()} == {
            "train.bin",
            "val.bin",
            "meta.json",
        }
    assert (path / "models/toy/loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert all((path / "models/toy/reports" / name).stat().st_size > 0 for name in REPORTS)


def test_mlflow_holds_one_finished_run_per_example_with_all_it_logged(repo):
    path, _ = repo
    tracker = Tracker.for_project(path)
    table = pd.concat([runs_table(tracker, experiment=example) for example in ("toy", "shakespeare")])
    assert sorted(table.example) == ["shakespeare", "toy"]
    for run_id in table.run_id:
        run = tracker.client.get_run(run_id)
        assert run.info.status == "FINISHED"
        assert {"train_loss", "val_loss", "lr", "tokens_per_sec", "eval.val.loss", "eval.val.bpc"} <= set(
            run.data.metrics
        )
        assert {"example", "git_commit", "device", "torch_version"} <= set(run.data.tags)
        assert run.data.params["model.n_layer"] == "1"
        expected = "bfloat16" if run.data.params["train.precision"] == "auto" and cpu_supports_bf16() else "float32"
        assert run.data.params["resolved.newton_schulz_dtype"] == expected  # Muon's, on this machine
        artifacts = {a.path for a in tracker.client.list_artifacts(run_id)}
        assert {"checkpoint", "loss.png", "history.csv", "metrics.json", "samples.txt", "reports"} <= artifacts
        reports = {a.path for a in tracker.client.list_artifacts(run_id, "reports")}
        assert "reports/next-chars.txt" in reports and len([r for r in reports if r.endswith("-attention.png")]) >= 2
        steps = len(tracker.client.get_metric_history(run_id, "train_loss"))
        assert steps == int(run.data.params["train.max_steps"])
    toy = tracker.client.get_run(table.run_id[table.example == "toy"].item())
    assert "eval.words.valid_share" in toy.data.metrics


def test_a_second_repro_does_nothing(repo):
    path, _ = repo
    output = run(path, "dvc", "repro")
    assert ran_stages(output) == set() and "Data and pipelines are up to date" in output


def test_exp_run_reruns_only_the_stages_that_read_the_changed_key(repo):
    path, _ = repo
    output = run(path, "dvc", "exp", "run", "-S", "shakespeare.train.max_steps=12")
    assert ran_stages(output) == {f"{stage}@shakespeare" for stage in ("train", "evaluate", "sample", "inspect")}
    output = run(path, "dvc", "exp", "run", "-S", "toy.sample.temperature=0.5", "-S", "toy.inspect.top_k=2")
    assert ran_stages(output) == {"sample@toy", "inspect@toy"}
    table = runs_table(Tracker.for_project(path), experiment="shakespeare")
    assert len(table) == 2 and "12" in set(table.steps)
    params_diff = run(path, "dvc", "params", "diff")
    assert "shakespeare.train.max_steps" in params_diff and "12" in params_diff
    assert "models/shakespeare/metrics.json" in run(path, "dvc", "metrics", "diff")


def test_a_queued_exp_run_logs_into_the_workspace_store(repo):
    """A queued experiment runs in a temporary copy under .dvc/tmp, as `--temp` does, by DVC's queue
    worker; its runs still go to the workspace's stores, tagged with the experiment's name."""
    path, _ = repo
    before = len(runs_table(Tracker.for_project(path), experiment="toy"))
    run(path, "dvc", "exp", "run", "--queue", "-S", "toy.train.max_steps=25", "-n", "queued-exp")
    run(path, "dvc", "exp", "run", "--run-all")
    table = runs_table(Tracker.for_project(path), experiment="toy")
    assert len(table) == before + 1 and list(table.run[table.steps == "25"]) == ["toy-queued-exp"]
    new = Tracker.for_project(path).client.get_run(table.run_id[table.steps == "25"].item())
    assert new.data.tags["dvc_experiment"] == "queued-exp" and "eval.val.loss" in new.data.metrics
    assert not list((path / ".dvc" / "tmp").rglob("mlflow.db")) and not list((path / ".dvc" / "tmp").rglob("optuna.db"))


def test_plots_render(repo):
    path, _ = repo
    run(path, "dvc", "plots", "show", "-o", "plots")
    html = (path / "plots" / "index.html").read_text()
    assert "Training loss (toy)" in html and "loss.png" in html
    for example in ("toy", "shakespeare"):
        assert f"models/{example}/reports/1-" in html and "-attention.png" in html and "-next-chars.png" in html
    assert "next-chars.txt" not in html


def test_dvc_exp_run_set_goes_through_the_same_checks(repo):
    """`dvc exp run -S` writes params.yaml; the stage reads it through the schema and stops before training."""
    path, _ = repo
    params_before, runs_before = (path / "params.yaml").read_text(), len(runs_table(Tracker.for_project(path)))
    command = ["dvc", "exp", "run", "-S", "toy.train.max_steps=0", "-S", "toy.model.n_embd=31"]
    try:
        result = subprocess.run(command, cwd=path, env=env(), capture_output=True, text=True)
        output = result.stdout + result.stderr
        assert result.returncode != 0
        assert "error: params.yaml has 2 problems" in output
        assert "toy.train.max_steps: Input should be greater than 0 (got 0)" in output
        assert "toy.model: n_embd (31) must be divisible by n_head (2)" in output
        assert len(runs_table(Tracker.for_project(path))) == runs_before
    finally:
        (path / "params.yaml").write_text(params_before)
        run(path, "dvc", "checkout", "--force")  # DVC removed the stage's outputs before running it


def test_repro_after_a_killed_training_resumes_it(repo, tmp_path):
    """DVC deletes a stage's outputs before re-running it, but not models/<ex>/checkpoints: the run goes on."""
    path, _ = repo
    run(path, "dvc", "repro", "train@toy")
    shutil.copy(path / "models/toy/ckpt.pt", tmp_path / "uninterrupted.pt")
    evals = (path / "models/toy/evals.csv").read_text()
    train = [sys.executable, "-m", "pipeline", "train", "--example", "toy"]
    pipes = {"stdout": subprocess.PIPE, "text": True}
    process = subprocess.Popen(train, cwd=path, env=env() | {"PYTHONUNBUFFERED": "1"}, **pipes)
    for line in process.stdout:
        if line.startswith("step 20:"):
            process.kill()
            break
    process.wait()
    killed_run = json.loads((path / "models/toy/run.json").read_text())["run_id"]

    output = run(path, "dvc", "repro", "--force", "train@toy")
    assert "toy: resuming at step" in output
    assert json.loads((path / "models/toy/run.json").read_text())["run_id"] == killed_run
    assert same_weights(path / "models/toy/ckpt.pt", tmp_path / "uninterrupted.pt")
    assert (path / "models/toy/evals.csv").read_text() == evals
    assert Tracker.for_project(path).client.get_run(killed_run).info.status == "FINISHED"


def test_toy_defaults_learn_the_words_and_complete_cor(project):
    """The default toy parameters (not tiny ones): samples are real words and COR -> N is likely."""
    params = load_params(ROOT / "params.yaml")["toy"]
    paths = ExamplePaths(project, "toy")
    prepare(params.data, paths)
    dataset = load_dataset(paths)
    cpu = torch.device("cpu")
    model = build_model(params.model, dataset.vocab.size, params.train.seed)
    model = train(model, dataset, params=params.train, device=cpu, progress=False).model
    metrics = word_metrics(model, dataset, params.evaluate.words, cpu)
    assert metrics["valid_share"] >= 0.97 and metrics["coverage"] >= 0.85
    completion = complete_word(model, dataset.vocab, "COR", params.sample, make_generator(0, cpu), cpu)
    assert completion.answer in {"CORE", "CORN"}
    assert dict(completion.next_chars)["N"] > 0.3


def stage_imports(path: Path, stage: str) -> set[str]:
    """The project's files that the toy's `stage` process of the fixture's `dvc repro` had imported
    when it exited (tests/imports/sitecustomize.py recorded them)."""
    records = [json.loads(f.read_text()) for f in (path.parent / "imports").glob("*.json")]
    [files] = [r["files"] for r in records if r["argv"][0].endswith(f"stages/{stage}.py") and "toy" in r["argv"]]
    return {str(Path(f).relative_to(path)) for f in files if f.startswith(str(path)) and "/.venv/" not in f}


def holds_code(path: Path) -> bool:
    """More than a docstring: an `__init__.py` that only documents its package is not a dependency."""
    body = ast.parse(path.read_text()).body
    return len(body) > 1 or (bool(body) and not isinstance(body[0], ast.Expr))


@pytest.mark.parametrize("stage", STAGES)
def test_each_stage_lists_exactly_the_modules_it_imports_and_runs(repo, stage):
    """The stage as `dvc repro` ran it, to its end: a module it imports (so any code it runs) but does
    not list would leave results stale; one it lists but does not import would re-run it for nothing."""
    path, _ = repo
    deps = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][stage]["do"]["deps"]
    listed = {d for d in deps if d.endswith(".py")}
    imported = stage_imports(path, stage)
    assert f"stages/{stage}.py" in listed and f"pipeline/stages/{stage}.py" in imported
    imported_code = {f for f in imported if holds_code(path / f)}
    assert imported_code == listed, f"imported, not listed: {imported_code - listed}; listed: {listed - imported_code}"
    assert "pipeline/cli.py" not in imported


def downstream(stage: str) -> set[str]:
    """The stages that consume `stage`'s outputs, directly or not."""
    consumers = {"prepare": {"train", "evaluate", "tune"}, "train": {"evaluate", "sample", "inspect"}}
    found = set(consumers.get(stage, ()))
    for consumer in list(found):
        found |= downstream(consumer)
    return found


def stages_after_editing(path: Path, module: str) -> set[str]:
    """The stages `dvc status` lists as changed by `module` once it gets one more comment line (then
    put back); stages made stale by the tests before are left out by naming the file."""
    file = path / module
    original = file.read_bytes()
    try:
        file.write_bytes(original + b"# an edit\n")
        status = json.loads(run(path, "dvc", "status", "--json"))
    finally:
        file.write_bytes(original)
    changed = {
        stage
        for stage, changes in status.items()
        for change in changes
        if isinstance(change, dict) and module in change.get("changed deps", {})
    }
    return changed


@pytest.mark.parametrize("stage", STAGES)
def test_editing_a_stage_module_lists_only_that_stage_and_its_consumers(repo, stage):
    path, _ = repo
    listed = stages_after_editing(path, f"pipeline/stages/{stage}.py")
    own = {name for name in every_stage(path / "params.yaml") if name.startswith(f"{stage}@")}
    assert own and own <= listed
    assert {name.split("@")[0] for name in listed} <= {stage} | downstream(stage)


@pytest.mark.parametrize("module", ["pipeline/cli.py", "pipeline/compare.py"])
def test_editing_what_only_the_command_line_uses_lists_no_stage(repo, module):
    """The help texts, the flags and `compare` live in modules no stage imports."""
    path, _ = repo
    assert stages_after_editing(path, module) == set()


POEMS = "".join(f"{line}\n" for line in ["the sea is wide", "the wind is cold", "a ship comes home"] * 60)


def test_a_third_example_is_a_text_file_a_section_and_a_name(repo, tmp_path):
    """No code changes: the input file, a few params lines, the name in the list, then `dvc repro`."""
    source, _ = repo
    path = tmp_path / "project"
    shutil.copytree(source.parent / "pristine", path, symlinks=True)
    (path / "data" / "poems").mkdir()
    (path / "data" / "poems" / "input.txt").write_text(POEMS)
    params = (path / "params.yaml").read_text()
    params = params.replace("examples:\n- toy\n", "examples:\n- toy\n- poems\n", 1)
    section = {"data": {"kind": "text"}, **{key: {} for key in ("model", "train", "evaluate", "sample", "inspect")}}
    (path / "params.yaml").write_text(params + yaml.safe_dump({"poems": section}))
    write_tiny_params(path / "params.yaml", path / "params.yaml")

    output = run(path, "dvc", "repro")
    assert ran_stages(output) == {f"{stage}@poems" for stage in STAGES if stage != "tune"}
    assert "poems" in load_params(path / "params.yaml")
    for name in OUTPUTS:
        assert (path / "models" / "poems" / name).stat().st_size > 0, name
    table = runs_table(Tracker.for_project(path), experiment="poems")
    assert len(table) == 1 and Tracker.for_project(path).client.get_run(table.run_id[0]).info.status == "FINISHED"
    assert "Data and pipelines are up to date" in run(path, "dvc", "repro")
