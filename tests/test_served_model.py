"""The logged model (pipeline/served_model.py): no pickle in it, loaded and served with pickle refused."""

import contextlib
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
import yaml
from mlflow.exceptions import MlflowException

from pipeline import logged_models, registry
from pipeline.checkpoint import load_checkpoint
from pipeline.config import load_params
from pipeline.data import prepare
from pipeline.paths import ExamplePaths
from pipeline.sampling import complete_word, generate, make_generator, sample_texts
from pipeline.schema import SampleParams
from pipeline.stages.train import train_example
from tests.helpers import ROOT, copy_inputs
from tests.model_helpers import SHAKESPEARE_PROMPTS, model_folder, model_store, shakespeare, training_run
from tests.test_sampling import LONG_PROMPT

PICKLE_HEADERS = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")


@pytest.fixture(scope="module")
def logged(trained_project, empty_store, tmp_path_factory):
    """The trained shakespeare checkpoint logged into a store of this module: (tracker, model id, vocabulary)."""
    checkpoint, _ = shakespeare(trained_project[0])
    tracker = model_store(tmp_path_factory.mktemp("served"), empty_store)
    run_id = training_run(tracker)
    ref = logged_models.log_model(tracker, run_id, checkpoint, {"eval.val.loss": 3.5}, prompts=["ROMEO"])
    return tracker, ref.model_id, set(load_checkpoint(checkpoint).vocab.chars)


def model_env(tracker, **extra) -> dict:
    """A process that finds `pipeline` only in the model's code/ folder, and may not unpickle."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "DVC_ROOT")}
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"  # mlflow's server runs `uvicorn` from PATH
    return env | {"MLFLOW_TRACKING_URI": tracker.uri, "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false"} | extra


def test_nothing_in_the_logged_model_is_pickled(logged):
    tracker, model_id, _ = logged
    folder = model_folder(tracker, model_id)
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert not [p for p in files if p.suffix in (".pkl", ".pickle") or "pickle" in p.name]
    flavor = yaml.safe_load((folder / "MLmodel").read_text())["flavors"]["python_function"]
    assert "python_model" not in flavor  # the cloudpickled PythonModel of the pickle way
    assert flavor["loader_module"] == "mlflow.pyfunc.loaders.code_model"
    assert flavor["model_code_path"].endswith("served_model.py") and (folder / "served_model.py").exists()
    assert (folder / flavor["code"] / "pipeline" / "served_model.py").exists()
    weights = folder / flavor["artifacts"]["weights"]["path"]
    assert weights.name == "weights.pt"
    for path in files:
        if path != weights:
            assert not any(h in path.read_bytes() for h in PICKLE_HEADERS), path
    assert set(load_checkpoint(weights).optimizer_state) == set()  # read with weights_only, no optimizer state


LOAD_AND_PREDICT = """
import json, sys, mlflow, pandas as pd
model = mlflow.pyfunc.load_model(sys.argv[1])
import pipeline
out = {"pipeline": pipeline.__file__}
params = {"max_new_tokens": 12, "num_samples": 2, "seed": 3, "temperature": 0.8, "top_k": 10}
out["list"] = model.predict(["ROMEO", "JULIET:\\nO"], params=params).to_dict("records")
out["frame"] = model.predict(pd.DataFrame({"text": ["KING"]}), params={"max_new_tokens": 5}).to_dict("records")
for name, data, params in [("prompt", ["ROMEO~"], None), ("param", ["ROMEO"], {"temperature": -1.0})]:
    try:
        model.predict(data, params=params)
    except mlflow.exceptions.MlflowException as e:
        out[name] = [e.error_code, e.message]
print(json.dumps(out))
"""


def test_loads_and_predicts_without_pickle_from_another_folder(logged, tmp_path):
    tracker, model_id, vocab = logged
    result = subprocess.run(
        [sys.executable, "-c", LOAD_AND_PREDICT, f"models:/{model_id}"],
        cwd=tmp_path,
        env=model_env(tracker),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.splitlines()[-1])
    assert out["pipeline"].startswith(str(model_folder(tracker, model_id) / "code"))
    assert [(r["prompt"], r["sample"]) for r in out["list"]] == [
        (p, i) for p in ["ROMEO", "JULIET:\nO"] for i in (0, 1)
    ]
    assert [r["prompt"] for r in out["frame"]] == ["KING"]
    for rows, length in ((out["list"], 12), (out["frame"], 5)):
        assert all(len(r["completion"]) == length and set(r["completion"]) <= vocab for r in rows)
    assert out["prompt"][0] == out["param"][0] == "INVALID_PARAMETER_VALUE"
    assert "outside the vocabulary" in out["prompt"][1] and "'~'" in out["prompt"][1]
    assert "temperature" in out["param"][1] and "greater than or equal to 0" in out["param"][1]


def test_predict_is_the_sample_stage(logged, trained_project):
    """The same prompts and params give the sample stage's text (its sampling code, KV cache and generator)."""
    tracker, model_id, _ = logged
    model = mlflow.pyfunc.load_model(str(model_folder(tracker, model_id)))
    params = {"max_new_tokens": 10, "num_samples": 3, "seed": 11, "temperature": 0.9, "top_k": 0}
    served = model.predict(SHAKESPEARE_PROMPTS, params=params)
    checkpoint = load_checkpoint(shakespeare(trained_project[0])[0])
    sample = SampleParams(prompts=SHAKESPEARE_PROMPTS, **(params | {"top_k": None}))
    generator = make_generator(sample.seed, "cpu")
    expected = [
        text[len(p) :]
        for p in sample.prompts
        for text in sample_texts(checkpoint.model, checkpoint.vocab, p, sample, generator, "cpu")
    ]
    assert list(served["completion"]) == expected


def test_a_prompt_of_100000_characters_is_completed_as_the_uncached_path(logged, trained_project):
    tracker, model_id, _ = logged
    model = mlflow.pyfunc.load_model(str(model_folder(tracker, model_id)))
    started = time.monotonic()
    served = model.predict([LONG_PROMPT], params={"max_new_tokens": 12, "temperature": 0.0})
    assert time.monotonic() - started < 10  # the whole prompt at once: a 10^10 mask, and a traceback
    checkpoint = load_checkpoint(shakespeare(trained_project[0])[0])
    context = torch.tensor([checkpoint.vocab.encode(LONG_PROMPT)])
    plain = generate(checkpoint.model, context, 12, temperature=0.0, use_cache=False)
    assert list(served["completion"]) == [checkpoint.vocab.decode(plain[0, len(LONG_PROMPT) :].tolist())]


def test_mlflow_drops_an_unknown_param_before_predict(logged):
    """Documented in served_model.py: MLflow's params schema drops `temprature` with a warning; the
    model never sees it, so it cannot refuse it. Were MLflow to pass it on, sample_params refuses it."""
    tracker, model_id, _ = logged
    model = mlflow.pyfunc.load_model(str(model_folder(tracker, model_id)))
    params = {"max_new_tokens": 8, "seed": 4}
    typo = model.predict(["ROMEO"], params=params | {"temprature": 0.0, "colour": 1})
    assert list(typo["completion"]) == list(model.predict(["ROMEO"], params=params)["completion"])


@pytest.fixture(scope="module")
def toy_champion(empty_store, tmp_path_factory):
    """The toy trained with its real defaults (about 10 s) by the train stage, which logs its model,
    registered as chargpt-toy@champion: (tracker, the trained checkpoint, params)."""
    root = copy_inputs(tmp_path_factory.mktemp("toy-champion"))
    tracker = model_store(root, empty_store)
    params, paths = (
        load_params(ROOT / "params.yaml", ["toy.train.system_metrics=false"])["toy"],
        ExamplePaths(root, "toy"),
    )
    prepare(params.data, paths)
    result = train_example(params, paths, tracker, progress=False)
    info = json.loads(paths.run_info.read_text())
    registry.register(tracker, "chargpt-toy", info["model_id"], info["run_id"], result.best_val_loss)
    return tracker, paths.checkpoint, params


def test_the_served_toy_completes_words_as_the_sample_stage_does(toy_champion, monkeypatch):
    tracker, checkpoint_path, params = toy_champion
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracker.uri)
    model = mlflow.pyfunc.load_model("models:/chargpt-toy@champion")
    words = set((ROOT / "data/toy/input.txt").read_text().split())
    greedy = model.predict(["COR"], params={"temperature": 0.0})
    assert "COR" + greedy["completion"][0] in words  # " TAL " before: the prompt was not read from the boundary
    served = model.predict(["COR", "CA"], params={"num_samples": 8, "seed": 3})
    checkpoint = load_checkpoint(checkpoint_path)
    generator = make_generator(3, "cpu")
    sample = dataclasses.replace(params.sample, seed=3, num_samples=8)
    stage = [
        complete_word(checkpoint.model, checkpoint.vocab, p, sample, generator, "cpu").samples for p in ("COR", "CA")
    ]
    assert [p + c for p, c in zip(served["prompt"], served["completion"])] == stage[0] + stage[1]
    assert sum(word in words for word in stage[0] + stage[1]) >= 15  # stopped at the word's end, not past it


@pytest.mark.parametrize(
    "data, params, message",
    [
        (["ROMEO", "caf\u00e9"], None, "'caf\u00e9' has '\u00e9'"),
        ([""], None, "at least 1 character"),
        (["ROMEO"], {"max_new_tokens": 0}, "max_new_tokens: Input should be greater than or equal to 1"),
        (["ROMEO"], {"max_new_tokens": 50_000}, "max_new_tokens is 50000, at most 10000"),
        (["ROMEO"], {"num_samples": "many"}, "num_samples"),
        (["ROMEO"], {"seed": -1}, "seed"),
    ],
)
def test_bad_input_is_a_clear_error(logged, data, params, message):
    tracker, model_id, _ = logged
    model = mlflow.pyfunc.load_model(str(model_folder(tracker, model_id)))
    with pytest.raises(MlflowException) as error:
        model.predict(data, params=params)
    assert error.value.error_code == "INVALID_PARAMETER_VALUE"
    assert message in error.value.message
    assert "Traceback" not in error.value.message


def test_direct_calls_check_the_input_too():
    """Without MLflow's schema enforcement (python_model.predict called directly), the model checks it."""
    from pipeline.served_model import read_prompts, sample_params

    assert read_prompts(pd.DataFrame({"text": ["A", "B"]})) == read_prompts(["A", "B"]) == ["A", "B"]
    assert read_prompts("A") == ["A"]
    for data, message in [(pd.DataFrame({"a": ["X"], "b": ["Y"]}), "one column"), ([], "non-empty"), ([1], "strings")]:
        with pytest.raises(MlflowException, match=message):
            read_prompts(data)
    with pytest.raises(MlflowException, match=r"unknown params \['bogus'\]"):
        sample_params(["A"], {"bogus": 1})
    assert sample_params(["A"], {"top_k": 0}).top_k is None  # 0: no top-k cut, as in params.yaml


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def wait_until_up(server: subprocess.Popen, url: str, log, seconds: float = 90) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"mlflow models serve exited with {server.returncode}: {log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.3)
    pytest.fail(f"mlflow models serve did not answer {url} within {seconds} s")


def running_in_group(pgid: int) -> list[int]:
    """The processes of a process group that still run (a zombie has ended: it only awaits its parent)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            state, _, group = stat.read_text().rsplit(")", 1)[1].split()[:3]
            if int(group) == pgid and state != "Z":
                pids.append(int(stat.parent.name))
    return pids


def stop(server: subprocess.Popen) -> None:
    """End the server and the uvicorn process it started (its own process group), and check they are gone."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.pid, signal.SIGTERM)
    deadline = time.monotonic() + 20
    while running_in_group(server.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if running_in_group(server.pid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGKILL)
        time.sleep(1)
    server.wait(timeout=10)
    assert not running_in_group(server.pid)


def test_mlflow_serves_the_champion(logged, tmp_path):
    tracker, model_id, vocab = logged
    run_id = tracker.client.get_logged_model(model_id).source_run_id
    registry.register(tracker, "chargpt-shakespeare", model_id, run_id, 3.5)
    port, log = free_port(), tmp_path / "serve.log"
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/chargpt-shakespeare@champion"]
    with log.open("w") as output:  # the server keeps its own copy of the file
        server = subprocess.Popen(
            command + ["--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
            cwd=tmp_path,
            env=model_env(tracker),
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: the uvicorn it starts ends with it
        )
    try:
        wait_until_up(server, f"http://127.0.0.1:{port}/ping", log)
        url = f"http://127.0.0.1:{port}/invocations"
        status, body = post(url, {"inputs": SHAKESPEARE_PROMPTS, "params": {"max_new_tokens": 16, "num_samples": 2}})
        assert status == 200, body
        rows = body["predictions"]
        assert [(r["prompt"], r["sample"]) for r in rows] == [(p, i) for p in SHAKESPEARE_PROMPTS for i in (0, 1)]
        assert all(len(r["completion"]) == 16 and set(r["completion"]) <= vocab for r in rows)
        status, body = post(url, {"dataframe_split": {"columns": ["prompt"], "data": [["KING"]]}})
        assert status == 200 and len(body["predictions"][0]["completion"]) == 200  # the params' default
        status, body = post(url, {"inputs": ["ROMEO~"]})
        assert status == 400, body
        assert body["error_code"] == "INVALID_PARAMETER_VALUE"
        assert "outside the vocabulary" in body["message"] and "'~'" in body["message"]
        assert "stack_trace" not in body and "Traceback" not in body["message"]
        status, body = post(url, {"inputs": ["ROMEO"], "params": {"top_k": -3}})
        assert status == 400 and "top_k" in body["message"], body
        status, body = post(url, {"inputs": [LONG_PROMPT], "params": {"max_new_tokens": 4}})
        assert status == 200 and len(body["predictions"][0]["completion"]) == 4, body  # was 400, a traceback
        status, body = post(url, {"inputs": ["ROMEO"], "params": {"max_new_tokens": 3, "temprature": 0.0}})
        assert status == 200 and len(body["predictions"][0]["completion"]) == 3  # MLflow drops the typo
    finally:
        stop(server)
    assert "Unrecognized params ['temprature'] are ignored" in log.read_text()  # only the server's log says so
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", port)) != 0  # nothing listens there any more
