import pytest
import torch

from pipeline.model import build_model
from pipeline.optim import Optimizers, learning_rate_at, make_optimizer, set_learning_rate

from .helpers import tiny_params


def recipe(**overrides):
    keys = [f"toy.train.{k}={v}" for k, v in overrides.items()]
    return tiny_params("toy", *keys)


def schedule(**overrides):
    return recipe(**overrides).train


def test_warm_up_is_linear_then_cosine_decays_to_min_lr():
    p = schedule(max_steps=100, warmup_steps=10, learning_rate=1e-3, min_lr=1e-4)
    assert learning_rate_at(0, p) == pytest.approx(1e-4)
    assert learning_rate_at(4, p) == pytest.approx(5e-4)
    assert learning_rate_at(10, p) == pytest.approx(1e-3)
    assert learning_rate_at(55, p) == pytest.approx((1e-3 + 1e-4) / 2)
    assert learning_rate_at(100, p) == pytest.approx(1e-4)
    assert learning_rate_at(500, p) == pytest.approx(1e-4)
    decay = [learning_rate_at(s, p) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(decay, decay[1:]))


def test_no_warm_up_starts_at_the_peak():
    p = schedule(max_steps=50, warmup_steps=0, learning_rate=2e-3, min_lr=0)
    assert learning_rate_at(0, p) == pytest.approx(2e-3)


def test_warmup_stable_decay_holds_the_peak_then_decays_linearly_over_the_cooldown():
    p = schedule(max_steps=100, warmup_steps=10, learning_rate=1e-3, min_lr=1e-4, schedule="wsd", cooldown_fraction=0.2)
    assert learning_rate_at(5, p) == pytest.approx(6e-4)
    assert [learning_rate_at(s, p) for s in (10, 50, 80)] == pytest.approx([1e-3] * 3)
    assert learning_rate_at(90, p) == pytest.approx((1e-3 + 1e-4) / 2)
    assert learning_rate_at(100, p) == pytest.approx(1e-4)


def test_adamw_alone_updates_every_parameter_at_the_scheduled_rate(toy):
    _, _, dataset = toy
    params = recipe(optimizer="adamw")
    model = build_model(params.model, dataset.vocab.size, 0)
    optimizer = make_optimizer(model, params.train, torch.device("cpu"))
    assert isinstance(optimizer, torch.optim.AdamW)
    set_learning_rate(optimizer, 1e-3)
    assert {g["lr"] for g in optimizer.param_groups} == {1e-3}


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest_each_once(toy):
    _, _, dataset = toy
    params = recipe(optimizer="muon", learning_rate=2e-3, muon_lr=0.03)
    model = build_model(params.model, dataset.vocab.size, 0)
    optimizer = make_optimizer(model, params.train, torch.device("cpu"))
    assert isinstance(optimizer, Optimizers) and isinstance(optimizer.optimizers["muon"], torch.optim.Muon)
    muon = {id(p) for g in optimizer.optimizers["muon"].param_groups for p in g["params"]}
    adamw = [id(p) for g in optimizer.optimizers["adamw"].param_groups for p in g["params"]]
    assert muon == {id(p) for p in model.hidden_matrices()} and not muon & set(adamw)
    assert len(muon) + len(adamw) == len(list(model.parameters()))
    set_learning_rate(optimizer, 1e-3)  # half the peak: Muon's rate halves too
    assert optimizer.optimizers["muon"].param_groups[0]["lr"] == pytest.approx(0.015)


def test_muon_state_round_trips_through_a_safe_load(toy, tmp_path):
    _, _, dataset = toy
    params = recipe(optimizer="muon")
    model = build_model(params.model, dataset.vocab.size, 0)
    optimizer = make_optimizer(model, params.train, torch.device("cpu"))
    x = torch.randint(dataset.vocab.size, (4, params.model.block_size))
    model(x, x)[1].backward()
    optimizer.step()
    torch.save(optimizer.state_dict(), tmp_path / "optimizer.pt")
    again = make_optimizer(model, params.train, torch.device("cpu"))
    again.load_state_dict(torch.load(tmp_path / "optimizer.pt", weights_only=True))
    momentum = [again.optimizers["muon"].state[p]["momentum_buffer"] for p in model.hidden_matrices()]
    assert all(m.abs().sum() > 0 for m in momentum)
    with pytest.raises(ValueError, match="optimizer state for"):
        again.load_state_dict({"adamw": again.optimizers["adamw"].state_dict()})


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("optimizer", "sgd", "optimizer"),
        ("schedule", "linear", "schedule"),
        ("muon_lr", 0, "muon_lr"),
        ("cooldown_fraction", 1.5, "cooldown_fraction"),
    ],
)
def test_a_bad_optimizer_setting_is_named(key, value, message):
    from pipeline.errors import PipelineError

    with pytest.raises(PipelineError, match=message):
        recipe(**{key: value})
