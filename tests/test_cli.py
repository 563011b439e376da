import re
import subprocess
import sys

import pytest

from pipeline.cli import main

from .helpers import ROOT


@pytest.mark.parametrize("command", ["prepare", "train", "evaluate", "sample", "inspect", "compare"])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    assert f"python -m pipeline {command}" in capsys.readouterr().out


@pytest.mark.parametrize("stage", ["prepare", "train", "evaluate", "sample", "inspect"])
def test_stage_scripts_share_the_command_line(stage):
    result = subprocess.run(
        [sys.executable, "-m", f"stages.{stage}", "--help"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0 and "--example" in result.stdout


def test_bad_parameters_stop_before_any_work(project, capsys, monkeypatch):
    monkeypatch.chdir(project)
    params = project / "params.yaml"
    params.write_text(re.sub(r"n_embd: \d+", "n_embd: 31", (ROOT / "params.yaml").read_text(), count=1))  # the toy's
    assert main(["prepare", "--example", "toy", "--params", str(params)]) == 2
    assert "toy.model: n_embd (31) must be divisible by n_head (2)" in capsys.readouterr().err
    assert not (project / "data/toy/prepared").exists()


def test_an_unknown_example_exits_non_zero(project, capsys, monkeypatch):
    monkeypatch.chdir(project)
    assert main(["train", "--example", "toyy", "--params", str(ROOT / "params.yaml")]) == 2
    assert "did you mean 'toy'" in capsys.readouterr().err
    assert not (project / "models").exists()


def test_a_prompt_with_unknown_characters_fails_cleanly(project, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(project)
    monkeypatch.setenv("DVC_ROOT", str(project))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tiny = [
        "--set",
        "toy.train.max_steps=5",
        "--set",
        "toy.train.warmup_steps=0",
        "--set",
        "toy.train.eval_interval=5",
        "--set",
        "toy.data.repeats=2",
    ]
    params = ["--example", "toy", "--params", str(ROOT / "params.yaml")]
    assert main(["prepare", *params, *tiny]) == 0
    assert main(["train", *params, *tiny, "--no-progress"]) == 0
    assert main(["sample", *params, "--set", "toy.sample.prompts=[CO, cor]"]) == 2
    assert "'cor' has 'c', 'o', 'r'" in capsys.readouterr().err
    assert not (project / "models/toy/samples.txt").exists()


def test_set_file_overrides_apply_before_set(project, capsys, monkeypatch):
    monkeypatch.chdir(project)
    (project / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    (project / "o.txt").write_text("# tiny\ntoy.model.n_embd=31\ntoy.train.max_steps=0\n")
    code = main(["train", "--example", "toy", "--set-file", "o.txt", "--set", "toy.model.n_embd=32"])
    err = capsys.readouterr().err
    assert code == 2 and "toy.train.max_steps" in err and "n_embd" not in err


def test_inspect_prints_the_table_of_a_prompt_and_refuses_unknown_characters(trained_project, capsys, monkeypatch):
    root, _ = trained_project
    monkeypatch.chdir(root)
    monkeypatch.setenv("DVC_ROOT", str(root))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    reports = root / "models/toy/reports"
    assert main(["inspect", "--example", "toy", "--prompt", "COR", "--prompt", "NO"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("prompt 'COR', read as ' COR'\n␠ -> '") and "\nR -> '" in out and "prompt 'NO'" in out
    assert {"1-COR-next-chars.png", "1-COR-attention.png", "2-NO-attention.png"} <= {p.name for p in reports.iterdir()}
    before = {p.name: p.read_bytes() for p in reports.iterdir()}
    assert main(["inspect", "--example", "toy", "--prompt", "COR", "--prompt", "cor"]) == 2
    assert "'cor' has 'c', 'o', 'r'" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in reports.iterdir()} == before
    assert main(["inspect", "--example", "toy", "--prompt", ""]) == 2
    assert "toy.inspect.prompts.0: String should have at least 1 character" in capsys.readouterr().err
