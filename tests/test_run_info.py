"""pipeline/run_info.py: run.json names the run a model was trained in, checked against the store."""

import pytest

from pipeline.errors import PipelineError
from pipeline.run_info import load_run_id, save_run_info


def test_run_info_round_trip_and_a_foreign_run_is_named(tracker, tmp_path):
    run_id = tracker.start_run("toy", "toy", {"example": "toy"}, {"model.n_layer": 2})
    save_run_info(tmp_path / "run.json", tracker, run_id)
    assert load_run_id(tmp_path / "run.json", tracker) == run_id
    (tmp_path / "run.json").write_text('{"run_id": "0123abc", "tracking_uri": "elsewhere"}')
    with pytest.raises(PipelineError, match="'0123abc'.*not in"):
        load_run_id(tmp_path / "run.json", tracker)
    (tmp_path / "run.json").write_text('{"tracking_uri": "elsewhere"}')
    with pytest.raises(PipelineError, match="names MLflow run None"):
        load_run_id(tmp_path / "run.json", tracker)
    (tmp_path / "ckpt.pt").write_bytes(b"")
    save_run_info(tmp_path / "run.json", tracker, run_id)
    with pytest.raises(PipelineError, match=f"ckpt.pt was trained in run other, but run.json names run {run_id}"):
        load_run_id(tmp_path / "run.json", tracker, trained_in="other")
