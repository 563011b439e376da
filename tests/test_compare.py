import pytest

from pipeline.cli import main
from pipeline.compare import runs_table
from pipeline.errors import PipelineError

from .test_tracking import start


def test_runs_table_sorts_by_validation_loss_and_filters(tracker):
    for example, loss in (("toy", 2.0), ("toy", 1.0), ("shakespeare", 1.5)):
        run_id = start(tracker, example)
        tracker.log_metrics(run_id, {"eval.val.loss": loss})
    table = runs_table(tracker)
    assert list(table.val_loss) == [1.0, 1.5, 2.0]
    assert list(runs_table(tracker, example="toy").example) == ["toy", "toy"]
    assert list(runs_table(tracker, experiment="shakespeare").val_loss) == [1.5]
    with pytest.raises(PipelineError, match="no MLflow experiment named 'nope'"):
        runs_table(tracker, experiment="nope")


def test_compare_prints_the_table_and_saves_csv(tracker, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tracker.log_metrics(start(tracker, "toy"), {"eval.val.loss": 0.5})
    assert main(["compare", "--example", "toy", "--csv", str(tmp_path / "runs.csv")]) == 0
    out = capsys.readouterr().out
    assert "val_loss" in out.splitlines()[0] and "toy" in out
    assert (tmp_path / "runs.csv").read_text().startswith("example,experiment,run,")
