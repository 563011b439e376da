import dataclasses

import pytest
import torch

from pipeline.checkpoint import TrainingCheckpoints, load_checkpoint, load_resume_point, save_checkpoint
from pipeline.data import Vocabulary
from pipeline.errors import PipelineError
from pipeline.model import build_model
from pipeline.optim import make_optimizer
from pipeline.records import TrainState
from pipeline.run_info import save_run_info
from pipeline.stages.evaluate import evaluate_example
from pipeline.stages.train import train_example

from .helpers import tiny_params


@pytest.fixture
def saved(tmp_path):
    params = tiny_params("toy")
    vocab = Vocabulary.from_text(" ACELNORST")
    model = build_model(params.model, vocab.size, params.train.seed)
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, model, make_optimizer(model, params.train, torch.device("cpu")), vocab, 7, 1.25)
    return path, model, vocab


def test_round_trip_gives_the_same_model(saved):
    path, model, vocab = saved
    checkpoint = load_checkpoint(path)
    assert checkpoint.vocab == vocab and checkpoint.step == 7 and checkpoint.best_val_loss == 1.25
    idx = torch.randint(vocab.size, (2, model.config.block_size))
    torch.testing.assert_close(checkpoint.model(idx)[0], model.eval()(idx)[0])
    assert {"adamw", "muon"} == set(checkpoint.optimizer_state)  # Muon's state too, for an exact resume
    assert all("param_groups" in state for state in checkpoint.optimizer_state.values())
    assert not list(path.parent.glob(".*.tmp")), "no temporary file is left behind"


def test_a_checkpoint_saved_before_bigram_and_ngram_embeddings_existed_loads_without_them(tmp_path):
    params = tiny_params("shakespeare")
    vocab = Vocabulary.from_text(" ACELNORST")
    model = build_model(dataclasses.replace(params.model, bigram_embedding=False, ngram_rows=()), vocab.size, 0)
    path = tmp_path / "old.pt"
    save_checkpoint(path, model, make_optimizer(model, params.train, torch.device("cpu")), vocab, 3, 2.0)
    state = torch.load(path, weights_only=True)
    del state["model_config"]["bigram_embedding"], state["model_config"]["ngram_rows"]  # as older code saved it
    torch.save(state, path)
    checkpoint = load_checkpoint(path)
    assert not checkpoint.model.config.bigram_embedding and params.model.bigram_embedding
    assert checkpoint.model.config.ngram_rows == () and params.model.ngram_rows
    idx = torch.randint(vocab.size, (2, 6))
    torch.testing.assert_close(checkpoint.model(idx)[0], model.eval()(idx)[0])


def test_a_truncated_checkpoint_is_named(saved):
    path, _, _ = saved
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(PipelineError, match=f"{path} is not a readable checkpoint"):
        load_checkpoint(path)


def test_a_checkpoint_of_another_shape_is_named(saved):
    path, _, _ = saved
    state = torch.load(path, weights_only=True)
    state["model_config"]["n_embd"] = 64
    torch.save(state, path)
    with pytest.raises(PipelineError, match="does not match its model config"):
        load_checkpoint(path)


def test_a_missing_checkpoint_says_what_to_run(tmp_path):
    with pytest.raises(PipelineError, match="run the train stage first"):
        load_checkpoint(tmp_path / "ckpt.pt")


@pytest.mark.parametrize("cut", [0, 1, 64, 1000, 0.5, -1])
def test_a_checkpoint_cut_anywhere_is_named_never_a_torch_traceback(saved, cut):
    path, _, _ = saved
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * cut) if isinstance(cut, float) else cut])
    with pytest.raises(PipelineError, match=f"{path} is not a readable checkpoint"):
        load_checkpoint(path)


def test_random_bytes_a_bare_tensor_or_a_foreign_dict_are_named(saved):
    path, _, _ = saved
    path.write_bytes(bytes(range(256)) * 40)
    with pytest.raises(PipelineError, match=f"{path} is not a readable checkpoint"):
        load_checkpoint(path)
    torch.save(torch.zeros(3), path)
    with pytest.raises(PipelineError, match=f"{path} is not a checkpoint of this project: it holds a Tensor"):
        load_checkpoint(path)
    torch.save({"model": {}, "step": 3}, path)
    with pytest.raises(PipelineError, match="it lacks best_val_loss, model_config, optimizer, vocab"):
        load_checkpoint(path)


def test_a_checkpoint_that_pickles_code_is_refused(saved):
    path, _, _ = saved
    torch.save({"model": Vocabulary(("a",))}, path)  # a class instance: weights_only=True will not build it
    with pytest.raises(PipelineError, match=f"{path} is not a readable checkpoint.*Unpickl"):
        load_checkpoint(path)


def test_a_checkpoint_for_another_vocabulary_is_named(saved):
    path, _, _ = saved
    state = torch.load(path, weights_only=True)
    state["vocab"] = state["vocab"][:-1]
    torch.save(state, path)
    with pytest.raises(PipelineError, match=f"{path}: vocabulary of 9 characters, model of 10"):
        load_checkpoint(path)


def test_evaluating_a_checkpoint_of_another_vocabulary_is_refused(toy, tracker, capsys):
    params, paths, dataset = toy
    run_id = tracker.start_run("toy", "toy", {}, {})
    save_run_info(paths.run_info, tracker, run_id)
    other = Vocabulary(tuple(dataset.vocab.chars[:-1]) + ("z",))
    model = build_model(params.model, other.size, params.train.seed)
    save_checkpoint(paths.checkpoint, model, make_optimizer(model, params.train, torch.device("cpu")), other, 5, 2.0)
    with pytest.raises(PipelineError, match="was trained on another vocabulary than .*meta.json: train again"):
        evaluate_example(params, paths, tracker)
    assert not paths.metrics.exists()


def test_latest_checkpoint_round_trip_and_a_corrupt_one_says_how_to_go_on(toy, tmp_path):
    params, _, dataset = toy
    model = build_model(params.model, dataset.vocab.size, params.train.seed)
    saved = TrainingCheckpoints(tmp_path / "latest.pt", tmp_path / "best.pt", model, dataset.vocab, "fp", "run-1")
    assert load_resume_point(tmp_path / "latest.pt") is None
    state = TrainState(7, {"state": {}, "param_groups": []}, torch.Generator().get_state(), {}, [], [], 1.5)
    saved.save(state, best=True)
    point = load_resume_point(tmp_path / "latest.pt")
    assert (point.state.step, point.fingerprint, point.run_id, point.finished) == (7, "fp", "run-1", False)
    assert load_checkpoint(tmp_path / "best.pt").step == 7  # best.pt is a checkpoint evaluate could use
    saved.mark_finished()
    assert load_resume_point(tmp_path / "latest.pt").finished
    (tmp_path / "latest.pt").write_bytes(b"\x00" * 100)
    with pytest.raises(PipelineError, match="cannot resume from .*latest.pt: .*delete it, or train with --fresh"):
        load_resume_point(tmp_path / "latest.pt")


def test_a_corrupt_latest_checkpoint_stops_training_before_a_run_starts(toy, tracker):
    params, paths, _ = toy
    paths.latest_checkpoint.parent.mkdir(parents=True)
    paths.latest_checkpoint.write_bytes(b"PK\x03\x04 torn")
    with pytest.raises(PipelineError, match="cannot resume from .*latest.pt"):
        train_example(params, paths, tracker, progress=False)
    assert tracker.client.search_experiments(filter_string="name = 'toy'") == []
    assert not paths.checkpoint.exists()
