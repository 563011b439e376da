"""What a sweep tunes: the `tune` section's schema, and how a trial's values become a model and a recipe."""

import dataclasses
import itertools
from typing import Annotated, Literal

import optuna
import pydantic
from pydantic import Field, NonNegativeInt, PositiveInt, TypeAdapter
from pydantic.dataclasses import dataclass

from pipeline.config import validate
from pipeline.errors import PipelineError
from pipeline.model import STRICT
from pipeline.schema import ExampleParams

MODEL_KEYS = {"n_layer", "n_head", "dropout", "positions", "norm", "qk_norm", "mlp", "tie_embeddings", "zero_init"}
MODEL_KEYS |= {"logit_softcap"}


@dataclass(config=STRICT)
class IntRange:
    """An integer to tune: `low`..`high` (every `step`, log-spaced if `log`), or one of `choices`."""

    low: int | None = None
    high: int | None = None
    step: PositiveInt = 1
    log: bool = False
    choices: list[int] | None = None

    def __post_init__(self):
        _check_range(self)


@dataclass(config=STRICT)
class FloatRange:
    """A float to tune: `low`..`high` (log-spaced if `log`), or one of `choices`."""

    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: list[float] | None = None

    def __post_init__(self):
        _check_range(self)


@dataclass(config=STRICT)
class Choice:
    """An option to tune among `choices`: names (`[rotary, learned]`) or switches (`[true, false]`)."""

    choices: Annotated[list[bool] | list[str], Field(min_length=1)]


def _check_range(space) -> None:
    if space.choices is not None:
        if space.low is not None or space.high is not None:
            raise ValueError("give either low/high or choices, not both")
        if not space.choices:
            raise ValueError("choices is empty")
        return
    if space.low is None or space.high is None:
        raise ValueError("give low and high (or choices)")
    if space.low > space.high:
        raise ValueError(f"empty range: low ({space.low}) is above high ({space.high})")
    if space.log and space.low <= 0:
        raise ValueError(f"a log range needs low > 0 (got {space.low})")
    if space.log and getattr(space, "step", 1) != 1:
        raise ValueError("a log range cannot have a step")


@dataclass(config=STRICT)
class SearchSpace:
    """What a sweep tunes; a key left out keeps its params.yaml value.

    `head_size` makes n_embd = n_head * head_size, so every trial is a valid model. Without it,
    n_embd stays fixed and n_head is drawn among its divisors only.
    """

    n_layer: IntRange | None = None
    n_head: IntRange | None = None
    head_size: IntRange | None = None
    learning_rate: FloatRange | None = None
    dropout: FloatRange | None = None
    weight_decay: FloatRange | None = None
    batch_size: IntRange | None = None
    warmup_steps: IntRange | None = None
    muon_lr: FloatRange | None = None
    grad_clip: FloatRange | None = None
    logit_softcap: FloatRange | None = None
    cooldown_fraction: FloatRange | None = None
    positions: Choice | None = None
    norm: Choice | None = None
    qk_norm: Choice | None = None
    mlp: Choice | None = None
    tie_embeddings: Choice | None = None
    zero_init: Choice | None = None
    optimizer: Choice | None = None
    schedule: Choice | None = None

    def __post_init__(self):
        for name, (low, high) in SPACE_LIMITS.items():
            space = getattr(self, name)
            values = (space.choices or [space.low, space.high]) if space else []
            if bad := [v for v in values if not (low <= v and (high is None or v < high))]:
                limit = f"at least {low}" if high is None else f"in [{low}, {high})"
                raise ValueError(f"{name}: values must be {limit}, got {bad}")
        if not any(dataclasses.asdict(self).values()):
            raise ValueError("the search space is empty: give at least one key to tune")


SPACE_LIMITS = {  # (lowest allowed, upper bound excluded)
    "n_layer": (1, None),
    "n_head": (1, None),
    "head_size": (1, None),
    "learning_rate": (1e-12, None),
    "dropout": (0.0, 1.0),
    "weight_decay": (0.0, None),
    "batch_size": (1, None),
    "warmup_steps": (0, None),
    "muon_lr": (1e-12, None),
    "grad_clip": (0.0, None),
    "logit_softcap": (0.0, None),
    "cooldown_fraction": (1e-12, 1.0 + 1e-12),
}
SPACE_KEYS = [field.name for field in dataclasses.fields(SearchSpace)]


@dataclass(config=STRICT)
class SamplerParams:
    kind: Literal["tpe", "random"] = "tpe"
    seed: int = 1337  # worker i of a parallel sweep uses seed + i
    startup_trials: NonNegativeInt = 5  # tpe: random trials before the model takes over


@dataclass(config=STRICT)
class PrunerParams:
    """`median` stops a trial worse than the median of earlier ones at the same step;
    `successive_halving` and `hyperband` keep the best fraction at each rung; `none` never prunes."""

    kind: Literal["none", "median", "successive_halving", "hyperband"] = "median"
    startup_trials: NonNegativeInt = 3  # median: finished trials before any pruning
    warmup_steps: NonNegativeInt = 0  # median: steps before a trial can be pruned
    min_steps: PositiveInt | None = None  # halving/hyperband: first rung; null: Optuna's default
    reduction_factor: Annotated[int, Field(ge=2)] = 3


@dataclass(config=STRICT)
class TuneParams:
    space: SearchSpace
    study: str | None = None  # Optuna study name; null: "<example>-<hash of the settings>"
    storage: str | None = None  # null: sqlite:///<project>/optuna.db; or e.g. postgresql://user@host/db
    trials: PositiveInt = 20  # total in the study: re-running adds only the missing ones
    workers: PositiveInt = 1  # processes on this machine
    max_steps: PositiveInt = 600  # training budget of one trial
    eval_interval: PositiveInt = 100  # the pruner sees the objective this often
    # what the sweep minimises: the validation loss, or (word lists) invalid_mass, 1 - valid_mass:
    # the probability that a word sampled at temperature 1 is not one of the list
    objective: Literal["val_loss", "invalid_mass"] = "val_loss"
    heartbeat_seconds: PositiveInt = 30  # a worker silent for 2x this long has its trial marked failed
    sampler: SamplerParams = Field(default_factory=SamplerParams)
    pruner: PrunerParams = Field(default_factory=PrunerParams)
    register_as: str | None = None  # MLflow registered model for the best trial; null: no registration


TUNE_SCHEMA = TypeAdapter(TuneParams)
TUNE_CLASSES = (IntRange, FloatRange, Choice, SearchSpace, SamplerParams, PrunerParams, TuneParams)


def parse_tune(params: ExampleParams, example: str) -> TuneParams:
    """The example's `tune` section, checked like the rest of the file."""
    if params.tune is None:
        raise PipelineError(f"params for '{example}' have no tune section")
    tune = validate(TUNE_SCHEMA, params.tune, f"the tune section of '{example}'", TUNE_CLASSES, (example, "tune"))
    if tune.objective == "invalid_mass" and params.evaluate.words is None:
        raise PipelineError(
            f"{example}.tune.objective: invalid_mass is only for a word-list example (data.kind: words)"
        )
    return tune


def _values(space: IntRange | FloatRange | Choice) -> list:
    if space.choices is not None:
        return list(space.choices)
    if isinstance(space, IntRange) and not space.log:
        return list(range(space.low, space.high + 1, space.step))
    return [space.low, space.high]


def head_choices(space: SearchSpace, n_embd: int) -> list[int]:
    """n_head candidates: all of them with head_size, else only the divisors of the fixed n_embd."""
    values = _values(space.n_head)
    if space.head_size is not None:
        return values
    if isinstance(space.n_head, IntRange) and space.n_head.log and space.n_head.choices is None:
        values = list(range(space.n_head.low, space.n_head.high + 1))
    divisors = [h for h in values if n_embd % h == 0]
    if not divisors:
        raise PipelineError(f"tune.space.n_head: no value in {values} divides model.n_embd ({n_embd})")
    return divisors


def suggest(trial: optuna.Trial, space: SearchSpace, n_embd: int) -> dict:
    """One value for every key in the space, drawn by the trial's sampler."""
    values = {}
    for name in SPACE_KEYS:
        if (param := getattr(space, name)) is None:
            continue
        if name == "n_head" and space.head_size is None:
            values[name] = trial.suggest_categorical(name, head_choices(space, n_embd))
        elif param.choices is not None:
            values[name] = trial.suggest_categorical(name, param.choices)
        elif isinstance(param, IntRange):
            values[name] = trial.suggest_int(name, param.low, param.high, step=param.step, log=param.log)
        else:
            values[name] = trial.suggest_float(name, param.low, param.high, log=param.log)
    return values


def apply_values(params: ExampleParams, tune: TuneParams, values: dict) -> ExampleParams:
    """`params` with the tuned values and the sweep's per-trial budget, validated again."""
    model = {k: v for k, v in values.items() if k in MODEL_KEYS}
    if "head_size" in values:
        model["n_embd"] = values.get("n_head", params.model.n_head) * values["head_size"]
    train = {k: v for k, v in values.items() if k not in MODEL_KEYS | {"head_size"}}
    train |= {"max_steps": tune.max_steps, "eval_interval": tune.eval_interval}
    if "learning_rate" in values:  # the schedule keeps its shape: min_lr stays the same fraction of it
        train["min_lr"] = params.train.min_lr * values["learning_rate"] / params.train.learning_rate
    return dataclasses.replace(
        params, model=dataclasses.replace(params.model, **model), train=dataclasses.replace(params.train, **train)
    )


def baseline_values(params: ExampleParams, space: SearchSpace) -> dict:
    """The params.yaml configuration, as values of the search space: the sweep's first trial."""
    current = dataclasses.asdict(params.model) | dataclasses.asdict(params.train)
    current["head_size"] = params.model.n_embd // params.model.n_head
    values = {name: current[name] for name in SPACE_KEYS if getattr(space, name) is not None}
    for name, value in values.items():
        param = getattr(space, name)
        allowed = head_choices(space, params.model.n_embd) if name == "n_head" else None
        if isinstance(param, Choice) and value not in param.choices:
            raise PipelineError(
                f"tune.space.{name} does not contain the params.yaml value {value}, which the sweep runs first "
                "as its baseline: add it to the choices"
            )
        inside = value in (allowed or param.choices or []) or (
            allowed is None and param.choices is None and param.low <= value <= param.high
        )
        if not inside:
            raise PipelineError(
                f"tune.space.{name} does not contain the params.yaml value {value}, which the sweep runs first "
                "as its baseline: widen the range"
            )
    return values


def check_space(params: ExampleParams, tune: TuneParams) -> None:
    """Every corner of the space, alone and with every other key's corners (rotary positions need
    an even head size), gives a valid configuration, before any trial starts."""
    space = tune.space
    corners = {name: _values(getattr(space, name)) for name in SPACE_KEYS if getattr(space, name) is not None}
    if "n_head" in corners:
        corners["n_head"] = head_choices(space, params.model.n_embd)
    corners = {
        name: values if isinstance(getattr(space, name), Choice) else sorted({min(values), max(values)})
        for name, values in corners.items()
    }
    base = baseline_values(params, space)
    for first, second in itertools.combinations_with_replacement(corners, 2):
        for a, b in itertools.product(corners[first], corners[second]):
            if first == second and a != b:
                continue
            try:
                apply_values(params, tune, base | {first: a, second: b})
            except pydantic.ValidationError as e:
                reasons = "; ".join(error["msg"].removeprefix("Value error, ") for error in e.errors())
                together = f" with {second} = {b}" if first != second else ""
                raise PipelineError(
                    f"tune.space.{first} = {a}{together} gives an invalid configuration: {reasons}"
                ) from None
