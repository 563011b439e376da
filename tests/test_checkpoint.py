import pytest
import torch

from pipeline.checkpoint import load_checkpoint, save_checkpoint
from pipeline.commands import build_model
from pipeline.data import Vocabulary
from pipeline.errors import PipelineError
from pipeline.training import make_optimizer

from .conftest import tiny_params


@pytest.fixture
def saved(tmp_path):
    params = tiny_params("toy")
    vocab = Vocabulary.from_text(" ACELNORST")
    model = build_model(params, vocab.size)
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, model, make_optimizer(model, params.train, torch.device("cpu")), vocab, 7, 1.25)
    return path, model, vocab


def test_round_trip_gives_the_same_model(saved):
    path, model, vocab = saved
    checkpoint = load_checkpoint(path)
    assert checkpoint.vocab == vocab and checkpoint.step == 7 and checkpoint.best_val_loss == 1.25
    idx = torch.randint(vocab.size, (2, 6))
    torch.testing.assert_close(checkpoint.model(idx)[0], model.eval()(idx)[0])
    assert "param_groups" in checkpoint.optimizer_state
    assert not list(path.parent.glob(".*.tmp")), "no temporary file is left behind"


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
