import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipeline.cli import main
from pipeline.errors import PipelineError
from pipeline.records import EvalRecord, StepRecord
from pipeline.run_info import load_run_id
from pipeline.stages.evaluate import evaluate_example
from pipeline.stages.train import train_example
from pipeline.tracking import (
    SERVER_TIMEOUT,
    Tracker,
    TrainingLogger,
    check_server,
    flatten,
    project_root,
    tracking_uri,
)

from .helpers import RESUMABLE, ROOT, TINY, cli, cli_env, prepared_project


def test_flatten_joins_nested_keys():
    assert flatten({"model": {"n_layer": 2, "x": {"y": 1}}, "a": 3}) == {"model.n_layer": 2, "model.x.y": 1, "a": 3}


def test_store_defaults_to_sqlite_at_the_dvc_root(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    assert project_root() == tmp_path.resolve()
    assert tracking_uri(project_root()) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking_uri(project_root()) == "http://127.0.0.1:5000"


def start(tracker, example="toy", **params):
    return tracker.start_run(example, example, {"example": example}, {"model.n_layer": 2} | params)


def test_a_run_finishes_or_fails_with_its_block(tracker):
    ok, bad = start(tracker), start(tracker)
    with tracker.active(ok):
        assert tracker.client.get_run(ok).info.status == "RUNNING"
    with pytest.raises(ZeroDivisionError), tracker.active(bad):
        raise ZeroDivisionError("boom")
    assert tracker.client.get_run(ok).info.status == "FINISHED"
    assert tracker.client.get_run(bad).info.status == "FAILED"


def test_experiment_artifacts_live_under_the_project(tracker, tmp_path):
    run_id = start(tracker)
    assert tracker.client.get_run(run_id).info.artifact_uri.startswith((tmp_path / "mlartifacts").as_uri())


def test_training_logger_sends_every_step_point(tracker):
    run_id = start(tracker)
    logger = TrainingLogger(tracker, run_id)
    for step in range(1, 1501):
        logger.on_step(StepRecord(step, 2.0 - step / 1000, 1e-3, 100.0))
    logger.on_eval(EvalRecord(1500, 0.6, 0.7))
    history = tracker.client.get_metric_history(run_id, "train_loss")
    assert len(history) == 1500 and sorted(m.step for m in history) == list(range(1, 1501))
    assert tracker.client.get_metric_history(run_id, "val_loss")[0].value == 0.7


@pytest.fixture
def mlflow_server(tmp_path):
    """A real `mlflow server` on loopback, with its own store and artifact folder."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server_dir = tmp_path / "server"
    server_dir.mkdir()
    command = [
        str(Path(sys.executable).parent / "mlflow"),
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--backend-store-uri",
        f"sqlite:///{server_dir}/server.db",
        "--artifacts-destination",
        str(server_dir / "art"),
    ]
    process = subprocess.Popen(command, cwd=server_dir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{url}/health", timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("mlflow server did not start within 60 s")
        yield url, server_dir
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_a_shared_mlflow_server_gets_the_runs_and_artifacts(mlflow_server, toy, monkeypatch):
    url, server_dir = mlflow_server
    params, paths, _ = toy
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    tracker = Tracker.for_project(paths.root)
    assert tracker.uri == url
    train_example(params, paths, tracker, progress=False)
    evaluate_example(params, paths, tracker)
    run_id = load_run_id(paths.run_info, tracker)
    run = tracker.client.get_run(run_id)
    assert run.info.status == "FINISHED" and "eval.val.loss" in run.data.metrics
    assert [a.path for a in tracker.client.list_artifacts(run_id, "checkpoint")] == ["checkpoint/ckpt.pt"]
    assert list((server_dir / "art").rglob("ckpt.pt")), "artifacts went through the server"
    assert not (paths.root / "mlflow.db").exists() and not (paths.root / "mlartifacts").exists()


@pytest.fixture
def silent_server():
    """A port that accepts connections and never answers: a hung or firewalled server."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        yield f"http://127.0.0.1:{s.getsockname()[1]}"


@pytest.mark.parametrize("server", ["refusing", "silent"])
def test_an_unreachable_tracking_server_fails_within_seconds_naming_its_url(server, silent_server, monkeypatch):
    url = "http://127.0.0.1:9" if server == "refusing" else silent_server  # port 9: nothing listens
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    started = time.perf_counter()
    with pytest.raises(PipelineError, match=f"MLflow tracking server {url} is unreachable"):
        Tracker.for_project()
    assert time.perf_counter() - started < SERVER_TIMEOUT + 3


def test_an_unreachable_tracking_server_stops_train_before_any_work(toy, monkeypatch, capsys):
    params, paths, _ = toy
    monkeypatch.chdir(paths.root)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    args = ["train", "--example", "toy", "--params", str(ROOT / "params.yaml"), *[f"--set={o}" for o in TINY["toy"]]]
    assert main(args) == 2
    assert "error: MLflow tracking server http://127.0.0.1:9 is unreachable" in capsys.readouterr().err
    assert not paths.model_dir.exists()


def test_four_concurrent_trainings_into_one_new_sqlite_store_lose_nothing(tmp_path):
    """Real processes, a store none of them has seen: its tables are made once, and no write is lost."""
    store = tmp_path / "shared" / "mlflow.db"
    store.parent.mkdir()
    env = cli_env(MLFLOW_TRACKING_URI=f"sqlite:///{store}")
    steps = [*RESUMABLE, "toy.train.eval_interval=5"]  # 120 steps, an evaluation and a log_batch every 5
    projects = [prepared_project(tmp_path / f"p{i}", None) for i in range(4)]
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    processes = [
        subprocess.Popen(cli("train", *steps, f"toy.train.seed={i}"), cwd=p, env=env, **pipes)
        for i, p in enumerate(projects)
    ]
    outputs = [p.communicate(timeout=600) for p in processes]
    for process, (_, stderr) in zip(processes, outputs):
        assert process.returncode == 0, stderr
        assert "database is locked" not in stderr and "Traceback" not in stderr
    client = MlflowClient(tracking_uri=f"sqlite:///{store}")
    runs = client.search_runs([client.get_experiment_by_name("toy").experiment_id])
    assert len(runs) == 4 and {r.info.status for r in runs} == {"FINISHED"}
    for run in runs:
        train_steps = [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")]
        assert sorted(train_steps) == list(range(1, 121))
        assert len(client.get_metric_history(run.info.run_id, "val_loss")) == 24
        assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"checkpoint", "history.csv"}


def test_a_server_that_is_starting_is_waited_for_on_one_line(capsys):
    """A refused connection may be a server that does not listen yet: asked again, said once."""
    import http.server
    import threading

    with socket.socket() as probe:  # a free port, nobody listening on it yet
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = http.server.HTTPServer(("127.0.0.1", port), http.server.BaseHTTPRequestHandler, bind_and_activate=False)
    starting = threading.Timer(1.5, lambda: (server.server_bind(), server.server_activate(), server.serve_forever()))
    starting.start()
    try:
        check_server(f"http://127.0.0.1:{port}")  # a 501 for GET is an answer: the server is there
    finally:
        server.shutdown()
        starting.join()
        server.server_close()
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and "refuses connections: retrying" in lines[0]


STORE_PAST_THE_LIMIT = """
import os, resource, sys
from pathlib import Path
from pipeline.errors import PipelineError
from pipeline.tracking import Tracker
tracker = Tracker.for_project(Path(sys.argv[1]))
run_id = tracker.start_run("toy", "toy", {}, {})
limit = os.path.getsize(sys.argv[1] + "/mlflow.db") // 2  # every page past it is out of reach: a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
try:
    tracker.set_tags(run_id, {f"tag{i}": "x" * 1000 for i in range(200)})
except PipelineError as e:
    print(e)
"""


def test_a_store_write_that_the_disk_refuses_is_one_pipeline_error(tmp_path, empty_store):
    import shutil

    shutil.copy(empty_store, tmp_path / "mlflow.db")
    command = [sys.executable, "-c", STORE_PAST_THE_LIMIT, str(tmp_path)]
    result = subprocess.run(command, env=cli_env(), capture_output=True, text=True, timeout=120)
    assert "Traceback" not in result.stderr and "SQLAlchemy" not in result.stderr, result.stderr
    assert result.stdout.startswith(f"the MLflow store {tmp_path / 'mlflow.db'} cannot be written: disk I/O error")
    assert "(the file-size limit, ulimit -f, is " in result.stdout
