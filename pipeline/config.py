"""Typed parameters for every stage, read from `params.yaml` and validated once, at the edge.

`params.yaml` holds one section per example (`toy`, `shakespeare`, ...), each with the keys
`data`, `model`, `train`, `evaluate`, `sample` and `inspect`. Every problem in the file is
reported at once, each with its key path, before any work starts.
"""

import dataclasses
import difflib
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import Field, NonNegativeInt, PositiveInt, TypeAdapter, ValidationError
from pydantic.dataclasses import dataclass

from pipeline.errors import PipelineError
from pipeline.model import STRICT, ModelConfig

Fraction = Annotated[float, Field(gt=0.0, lt=1.0)]
PositiveFloat = Annotated[float, Field(gt=0.0, allow_inf_nan=False)]
NonNegativeFloat = Annotated[float, Field(ge=0.0, allow_inf_nan=False)]
Beta = Annotated[float, Field(ge=0.0, lt=1.0)]
Seed = Annotated[int, Field(ge=0, lt=2**32)]  # what numpy accepts
UPPERCASE = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
# Tokens per sample: a whole play is ~100k characters. Each token is one forward pass, so 1e5 tokens
# is minutes on a CPU per sample, and the (num_samples, prompt + max_new_tokens) token tensor and
# the text stay small; a typo such as 1e9 would run for weeks and fill memory before writing anything.
MAX_NEW_TOKENS = 100_000


@dataclass(config=STRICT)
class WordsData:
    """A list of words; validation holds out whole words."""

    kind: Literal["words"]
    val_fraction: Fraction
    seed: Seed
    repeats: Annotated[int, Field(ge=1, le=10_000)]  # shuffled passes over the training words in the token stream
    alphabet: Annotated[str, Field(min_length=1, pattern=r"^\S+$")] = UPPERCASE  # the letters a word may have

    def __post_init__(self):
        if len(set(self.alphabet)) != len(self.alphabet):
            raise ValueError(f"alphabet {self.alphabet!r} repeats a character")


@dataclass(config=STRICT)
class TextData:
    """Running text; validation is the last contiguous `val_fraction` of it."""

    kind: Literal["text"]
    val_fraction: Fraction


DataParams = Annotated[WordsData | TextData, Field(discriminator="kind")]


@dataclass(config=STRICT)
class TrainParams:
    device: Annotated[str, Field(pattern=r"^(auto|cpu|mps|cuda(:\d+)?)$")]
    precision: Literal["auto", "float32", "bfloat16"]  # auto: bf16 autocast on CUDA only
    max_steps: PositiveInt
    batch_size: PositiveInt
    learning_rate: Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)]  # AdamW steps are about this size
    min_lr: NonNegativeFloat
    warmup_steps: NonNegativeInt
    weight_decay: Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]
    beta1: Beta
    beta2: Beta
    grad_clip: NonNegativeFloat  # 0 turns clipping off
    eval_interval: PositiveInt  # also how often the latest checkpoint is saved
    eval_batches: PositiveInt
    seed: Seed
    compile: bool | Literal["auto"] = "auto"  # torch.compile the model; auto: on CUDA only
    threads: NonNegativeInt = 0  # CPU threads while training; 0: torch's default, one per core

    def __post_init__(self):
        if self.min_lr > self.learning_rate:
            raise ValueError(f"min_lr ({self.min_lr}) must not exceed learning_rate ({self.learning_rate})")
        if self.warmup_steps > self.max_steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must not exceed max_steps ({self.max_steps})")


@dataclass(config=STRICT)
class WordEvalParams:
    samples: PositiveInt  # words sampled to measure how many are real
    temperature: PositiveFloat
    seed: Seed


@dataclass(config=STRICT)
class EvaluateParams:
    batch_size: PositiveInt
    words: WordEvalParams | None = None  # word metrics, for a `words` example


@dataclass(config=STRICT)
class SampleParams:
    prompts: Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1)]
    num_samples: PositiveInt
    max_new_tokens: Annotated[int, Field(ge=1, le=MAX_NEW_TOKENS)]
    temperature: NonNegativeFloat  # 0 is greedy
    top_k: NonNegativeInt | None  # 0 or null: no top-k cut
    seed: Seed


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
}


@dataclass(config=STRICT)
class SamplerParams:
    kind: Literal["tpe", "random"]
    seed: int  # worker i of a parallel sweep uses seed + i
    startup_trials: NonNegativeInt = 5  # tpe: random trials before the model takes over


@dataclass(config=STRICT)
class PrunerParams:
    """`median` stops a trial worse than the median of earlier ones at the same step;
    `successive_halving` and `hyperband` keep the best fraction at each rung; `none` never prunes."""

    kind: Literal["none", "median", "successive_halving", "hyperband"]
    startup_trials: NonNegativeInt = 3  # median: finished trials before any pruning
    warmup_steps: NonNegativeInt = 0  # median: steps before a trial can be pruned
    min_steps: PositiveInt | None = None  # halving/hyperband: first rung; null: Optuna's default
    reduction_factor: Annotated[int, Field(ge=2)] = 3


@dataclass(config=STRICT)
class TuneParams:
    study: str | None  # Optuna study name; null: "<example>-<hash of the settings>"
    storage: str | None  # null: sqlite:///<project>/optuna.db; or e.g. postgresql://user@host/db
    trials: PositiveInt  # total in the study: re-running adds only the missing ones
    workers: PositiveInt  # processes on this machine
    max_steps: PositiveInt  # training budget of one trial
    eval_interval: PositiveInt  # the pruner sees the validation loss this often
    heartbeat_seconds: PositiveInt  # a worker silent for 2x this long has its trial marked failed
    sampler: SamplerParams
    pruner: PrunerParams
    space: SearchSpace
    register_as: str | None  # MLflow registered model for the best trial; null: no registration


@dataclass(config=STRICT)
class InspectParams:
    """What the inspect stage shows: next-character tables and attention maps of each prompt."""

    prompts: Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1)]
    top_k: PositiveInt  # next characters per row of the text table


@dataclass(config=STRICT)
class ExampleParams:
    data: DataParams
    model: ModelConfig
    train: TrainParams
    evaluate: EvaluateParams
    sample: SampleParams
    inspect: InspectParams
    tune: TuneParams | None = None

    def __post_init__(self):
        if self.data.kind == "words" and self.evaluate.words is None:
            raise ValueError("evaluate.words is required for a word-list example")
        if self.data.kind != "words" and self.evaluate.words is not None:
            raise ValueError("evaluate.words is only for a word-list example (data.kind: words)")


@dataclasses.dataclass(frozen=True)
class ExamplePaths:
    """Where each stage of one example reads and writes, relative to the project root."""

    root: Path
    example: str

    @property
    def input(self) -> Path:
        return self.root / "data" / self.example / "input.txt"

    @property
    def prepared(self) -> Path:
        return self.root / "data" / self.example / "prepared"

    @property
    def train_tokens(self) -> Path:
        return self.prepared / "train.bin"

    @property
    def val_tokens(self) -> Path:
        return self.prepared / "val.bin"

    @property
    def meta(self) -> Path:
        return self.prepared / "meta.json"

    @property
    def model_dir(self) -> Path:
        return self.root / "models" / self.example

    @property
    def checkpoint(self) -> Path:
        return self.model_dir / "ckpt.pt"

    @property
    def checkpoints(self) -> Path:
        """Not a DVC output, so DVC does not delete it before re-running the train stage (git ignores it)."""
        return self.model_dir / "checkpoints"

    @property
    def latest_checkpoint(self) -> Path:
        """Saved after every evaluation and on SIGINT/SIGTERM: what an interrupted run resumes from."""
        return self.checkpoints / "latest.pt"

    @property
    def best_checkpoint(self) -> Path:
        """The weights with the lowest validation loss so far."""
        return self.checkpoints / "best.pt"

    @property
    def run_info(self) -> Path:
        """The MLflow run this model was trained in; evaluate and sample log into it."""
        return self.model_dir / "run.json"

    @property
    def history(self) -> Path:
        return self.model_dir / "history.csv"

    @property
    def evals(self) -> Path:
        return self.model_dir / "evals.csv"

    @property
    def loss_plot(self) -> Path:
        return self.model_dir / "loss.png"

    @property
    def train_metrics(self) -> Path:
        return self.model_dir / "train.json"

    @property
    def metrics(self) -> Path:
        return self.model_dir / "metrics.json"

    @property
    def samples(self) -> Path:
        return self.model_dir / "samples.txt"

    @property
    def tune_dir(self) -> Path:
        """The sweep's best parameters, trial table and plots."""
        return self.model_dir / "tune"

    @property
    def tune_metrics(self) -> Path:
        return self.model_dir / "tune.json"

    @property
    def reports(self) -> Path:
        """Pictures and tables of what the model learned, with a copy of the loss curve."""
        return self.model_dir / "reports"


PARAMS_SCHEMA = TypeAdapter(dict[str, ExampleParams])
KNOWN_KEYS = sorted(
    {
        f.name
        for cls in (
            WordsData,
            TextData,
            ModelConfig,
            TrainParams,
            WordEvalParams,
            EvaluateParams,
            SampleParams,
            IntRange,
            FloatRange,
            SearchSpace,
            SamplerParams,
            PrunerParams,
            TuneParams,
            InspectParams,
            ExampleParams,
        )
        for f in dataclasses.fields(cls)
    }
)


def did_you_mean(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _describe(error: dict) -> str:
    loc = list(error["loc"])
    if loc[1:2] == ["data"] and len(loc) > 2 and loc[2] in ("words", "text"):
        del loc[2]  # pydantic names the chosen `kind` in the path; the file does not
    path = ".".join(str(part) for part in loc)
    if error["type"] in ("unexpected_keyword_argument", "extra_forbidden"):
        return f"{path}: unknown key{did_you_mean(str(error['loc'][-1]), KNOWN_KEYS)}"
    if error["type"] == "missing":
        return f"{path}: missing key"
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] != "value_error":
        message += f" (got {error['input']!r})"
    return f"{path}: {message}"


def parse_override(text: str) -> tuple[list[str], object]:
    """`toy.train.max_steps=100` -> (['toy', 'train', 'max_steps'], 100), values read as YAML."""
    key, sep, value = text.partition("=")
    keys = key.split(".")
    if not sep or not all(keys):
        raise PipelineError(f"override '{text}' must look like key.path=value")
    try:
        return keys, yaml.safe_load(value)
    except yaml.YAMLError as e:
        reason = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise PipelineError(f"override '{text}': the value is not valid YAML ({reason})") from None


def read_overrides_file(path: Path) -> list[str]:
    """KEY=VALUE overrides, one a line; blank lines and lines starting with # are left out."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise PipelineError(f"overrides file {path} does not exist") from None
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for text in overrides:
        keys, value = parse_override(text)
        if keys[0] not in raw:
            raise PipelineError(
                f"override '{text}': unknown example '{keys[0]}'{did_you_mean(keys[0], raw)}; "
                f"the params file defines: {', '.join(map(str, raw))}"
            )
        node = raw
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise PipelineError(f"override '{text}': '{key}' is not a section")
        node[keys[-1]] = value
    return raw


class UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one section is an error, not a silent overwrite."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key '{key}' appears twice in one section", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


def read_params_file(path: Path) -> dict:
    try:
        raw = yaml.load(Path(path).read_text(encoding="utf-8"), Loader=UniqueKeyLoader)  # a SafeLoader
    except FileNotFoundError:
        raise PipelineError(f"{path} does not exist") from None
    except UnicodeDecodeError as e:
        raise PipelineError(
            f"{path} is not UTF-8 text: byte {e.object[e.start]:#04x} at offset {e.start} ({e.reason}); "
            "save it as UTF-8"
        ) from None
    except yaml.YAMLError as e:
        raise PipelineError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(raw, dict) or not raw:
        raise PipelineError(f"{path} must map example names to their parameters")
    return raw


def load_params(path: Path, overrides: list[str] = ()) -> dict[str, ExampleParams]:
    """Every example's parameters from `path`, or one PipelineError listing every problem."""
    raw = apply_overrides(read_params_file(path), list(overrides))
    try:
        return PARAMS_SCHEMA.validate_python(raw)
    except ValidationError as e:
        problems = "\n".join(f"  {_describe(err)}" for err in e.errors())
        count = e.error_count()
        raise PipelineError(f"{path} has {count} problem{'s' * (count > 1)}:\n{problems}") from None


def example_params(params: dict[str, ExampleParams], example: str, source: Path) -> ExampleParams:
    if example not in params:
        raise PipelineError(
            f"unknown example '{example}'{did_you_mean(example, params)}; {source} defines: {', '.join(params)}"
        )
    return params[example]
