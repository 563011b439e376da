import optuna
import pytest

from pipeline.cli import main
from pipeline.config import load_params
from pipeline.errors import PipelineError
from pipeline.model import ModelConfig
from pipeline.tuning.space import apply_values, check_space, parse_tune, suggest

from .helpers import ROOT, sweep_params


@pytest.mark.parametrize(
    "override, message",
    [
        ("toy.tune.space.n_layer={low: 4, high: 2}", "empty range: low (4) is above high (2)"),
        ("toy.tune.space.n_head={choices: []}", "choices is empty"),
        ("toy.tune.space.learning_rate={low: 0.0, high: 1.0e-2, log: true}", "a log range needs low > 0"),
        ("toy.tune.space.dropout={low: 0.0, high: 1.5}", "dropout: values must be in [0.0, 1.0)"),
        ("toy.tune.space.n_layers={low: 1, high: 2}", "unknown key (did you mean 'n_layer'?)"),
        ("toy.tune.pruner.kind=medain", "toy.tune.pruner.kind: Input should be"),
        ("toy.tune.sampler.kind=cmaes", "toy.tune.sampler.kind: Input should be"),
        ("toy.tune.space={}", "the search space is empty"),
        ("toy.tune.space.mlp={choices: []}", "toy.tune.space.mlp.choices: Value should have at least 1 item"),
        ("toy.tune.space.qk_norm={low: 0, high: 1}", "toy.tune.space.qk_norm"),
        ("toy.tune.objective=loss", "toy.tune.objective: Input should be 'val_loss' or 'invalid_mass'"),
    ],
)
def test_bad_tune_params_are_refused_before_anything_is_written(override, message, toy, capsys, monkeypatch):
    _, paths, _ = toy
    monkeypatch.chdir(paths.root)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    before = sorted(paths.root.rglob("*"))
    code = main(["tune", "--example", "toy", "--params", str(ROOT / "params.yaml"), "--set", override])
    assert code == 2
    assert message in capsys.readouterr().err
    assert sorted(paths.root.rglob("*")) == before


def test_the_invalid_mass_objective_is_refused_for_running_text():
    params = load_params(ROOT / "params.yaml", ["shakespeare.tune.objective=invalid_mass"])["shakespeare"]
    with pytest.raises(PipelineError, match="shakespeare.tune.objective: invalid_mass is only for a word-list"):
        parse_tune(params, "shakespeare")


@pytest.mark.parametrize(
    "extra, message",
    [
        (["toy.tune.space.learning_rate={low: 1.0e-4, high: 1.0e-3}"], "does not contain the params.yaml value"),
        (["toy.tune.space.head_size=null", "toy.tune.space.n_head={choices: [3, 5]}"], "no value in [3, 5] divides"),
        (["toy.tune.space.warmup_steps={low: 0, high: 50}"], "warmup_steps = 50 gives an invalid configuration"),
        (["toy.tune.space.mlp={choices: [relu2, swiglu]}"], "does not contain the params.yaml value"),
        (["toy.tune.space.mlp={choices: [gelu, swish]}"], "mlp = swish gives an invalid configuration"),
        (
            [
                "toy.model.positions=learned",
                "toy.tune.space.positions={choices: [learned, rotary]}",
                "toy.tune.space.head_size={choices: [3, 16]}",
            ],
            "head_size = 3 with positions = rotary gives an invalid configuration: rotary",
        ),
    ],
)
def test_a_space_that_cannot_hold_the_baseline_or_a_valid_model_is_refused(extra, message):
    with pytest.raises(PipelineError, match="tune.space") as error:
        check_space(*sweep_params(*extra))
    assert message in str(error.value)


@pytest.mark.parametrize("with_head_size", [True, False])
def test_every_suggested_configuration_is_a_valid_model(with_head_size):
    extra = [] if with_head_size else ["toy.tune.space.head_size=null", "toy.tune.space.n_head={low: 1, high: 8}"]
    params, tune = sweep_params(*extra)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(40):
        values = suggest(study.ask(), tune.space, params.model.n_embd)
        model = apply_values(params, tune, values).model
        assert isinstance(model, ModelConfig) and model.n_embd % model.n_head == 0
        if with_head_size:
            assert model.n_embd == values["n_head"] * values["head_size"]
        else:
            assert model.n_embd == params.model.n_embd


def test_the_block_and_the_optimizer_can_be_tuned_and_the_best_reads_back_as_params():
    from pipeline.tuning.reports import best_config

    extra = [
        "toy.tune.space.positions={choices: [learned, rotary]}",
        "toy.tune.space.qk_norm={choices: [false, true]}",
        "toy.tune.space.optimizer={choices: [adamw, muon]}",
        "toy.tune.space.muon_lr={low: 0.01, high: 0.05, log: true}",
        "toy.tune.space.grad_clip={choices: [0.0, 1.0]}",
    ]
    params, tune = sweep_params(*extra)
    check_space(params, tune)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(80):
        trial = study.ask()
        tuned = apply_values(params, tune, suggest(trial, tune.space, params.model.n_embd))
        seen.add((tuned.model.positions, tuned.model.qk_norm, tuned.train.optimizer, tuned.train.grad_clip))
        study.tell(trial, 1.0)
    assert len(seen) == 16  # every combination was drawn
    config = best_config(params, tune, study.best_trial, "toy")["toy"]
    assert {"positions", "qk_norm"} <= set(config["model"])
    assert {"optimizer", "muon_lr", "grad_clip"} <= set(config["train"])
