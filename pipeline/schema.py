"""The parameters of every stage but `tune`, with their defaults, validated once at the edge.

An example's section of `params.yaml` states only what differs from these defaults. The sweep's
`tune` section has its own schema, beside the sweep (pipeline/tuning/space.py), so that a new
tune key does not re-run the other stages.
"""

import dataclasses
from typing import Annotated, Any, Literal

from pydantic import Field, NonNegativeInt, PositiveInt, WrapValidator
from pydantic.dataclasses import dataclass

from pipeline.device import auto_batch_size
from pipeline.model import STRICT, ModelConfig

Fraction = Annotated[float, Field(gt=0.0, lt=1.0)]
PositiveFloat = Annotated[float, Field(gt=0.0, allow_inf_nan=False)]
NonNegativeFloat = Annotated[float, Field(ge=0.0, allow_inf_nan=False)]
Beta = Annotated[float, Field(ge=0.0, lt=1.0)]
Seed = Annotated[int, Field(ge=0, lt=2**32)]  # what numpy accepts
Prompts = Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1)]
UPPERCASE = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
# Tokens per sample: a whole play is ~100k characters. Each token is one forward pass, so 1e5 tokens
# is minutes on a CPU per sample; a typo such as 1e9 would run for weeks and fill memory first.
MAX_NEW_TOKENS = 100_000
MAX_BATCH = 2**24  # windows a batch; what fits is pipeline/memory.py's to say


def integer_or_auto(value, check_integer):
    """`auto` as it is, for the dataclass to resolve once it knows the device; else an integer."""
    if value == "auto":
        return value
    if isinstance(value, str):
        raise ValueError(f"Input should be an integer or 'auto' (got {value!r})")
    return check_integer(value)


@dataclass(config=STRICT)
class WordsData:
    """A list of words; validation holds out whole words."""

    kind: Literal["words"]
    val_fraction: Fraction = 0.1
    seed: Seed = 1337
    repeats: Annotated[int, Field(ge=1, le=10_000)] = 40  # shuffled passes over the training words
    alphabet: Annotated[str, Field(min_length=1, pattern=r"^\S+$")] = UPPERCASE  # the letters a word may have

    def __post_init__(self):
        if len(set(self.alphabet)) != len(self.alphabet):
            raise ValueError(f"alphabet {self.alphabet!r} repeats a character")


@dataclass(config=STRICT)
class TextData:
    """Running text; validation is the last contiguous `val_fraction` of it."""

    kind: Literal["text"]
    val_fraction: Fraction = 0.1


DataParams = Annotated[WordsData | TextData, Field(discriminator="kind")]


@dataclass(config=STRICT)
class TrainParams:
    """The training recipe; the defaults are the Shakespeare example's."""

    device: Annotated[str, Field(pattern=r"^(auto|cpu|mps|cuda(:\d+)?)$")] = "auto"  # auto: cuda, mps, cpu
    precision: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: bf16 autocast on CUDA and bf16 CPUs
    compile: bool | Literal["auto"] = "auto"  # torch.compile the model; auto: on CUDA only
    # torch.compile's mode when it compiles; reduce-overhead and max-autotune replay CUDA graphs on a GPU
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    threads: NonNegativeInt = 0  # CPU threads while training; 0: torch's default, one per core
    system_metrics: bool = True  # MLflow records CPU, memory (and GPU) use while training
    max_steps: PositiveInt = 1000  # on 2 cores without bf16 (AVX2) about 2 minutes, the main job's longest stage
    # windows a step; auto: 24 where the run multiplies in bf16 (bf16 CPUs, CUDA), 16 in float32.
    # Resolved here, so every reader and the run's logged parameters see the number
    batch_size: Annotated[int, Field(gt=0, le=MAX_BATCH), WrapValidator(integer_or_auto)] = "auto"
    # random: windows at random offsets. passes (word lists): the next batch_size windows of the
    # training stream in order; the stream is shuffled passes over the words, so a batch of one
    # pass's size holds every training word once and the batch's letter counts are the list's own
    sampling: Literal["random", "passes"] = "random"
    learning_rate: Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)] = 3.5e-3  # AdamW's
    min_lr: NonNegativeFloat = 0.0  # the cosine ends at zero: 0.001 to 0.006 lower loss in 4 runs on 2 CPU classes
    warmup_steps: NonNegativeInt = 50
    weight_decay: Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)] = 0.1
    beta1: Beta = 0.9
    beta2: Beta = 0.99
    grad_clip: NonNegativeFloat = 1.0  # 0 turns clipping off
    optimizer: Literal["adamw", "muon"] = "muon"  # muon: Muon for the blocks' matrices, AdamW for the rest
    # follows the schedule's shape. 0.016: 0.003 lower than 0.02 in float32 over three seeds, the same in bf16
    muon_lr: Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)] = 0.016
    muon_momentum: Beta = 0.95
    # the lookup tables' Adam rates, relative to learning_rate (docs/performance.md). The bigram table:
    # 0.003 to 0.006 lower loss at 0.5 than at 1. The hashed n-gram tables, whose rows few batches read
    # and which memorise the training split: 0.009 to 0.031 lower at 1/16 than at 0.5, on both CPU recipes
    bigram_lr_scale: Annotated[float, Field(gt=0.0, le=100.0, allow_inf_nan=False)] = 0.5
    ngram_lr_scale: Annotated[float, Field(gt=0.0, le=100.0, allow_inf_nan=False)] = 0.0625
    schedule: Literal["cosine", "wsd"] = "cosine"  # wsd: warm up, hold, decay linearly over the cooldown
    cooldown_fraction: Annotated[float, Field(gt=0.0, le=1.0)] = 0.3  # of max_steps, for wsd
    eval_interval: PositiveInt = 200  # also how often the latest checkpoint is saved
    eval_batches: PositiveInt = 20
    seed: Seed = 1337

    def __post_init__(self):
        if self.batch_size == "auto":
            self.batch_size = auto_batch_size(self.device, self.precision)
        if self.min_lr > self.learning_rate:
            raise ValueError(f"min_lr ({self.min_lr}) must not exceed learning_rate ({self.learning_rate})")
        if self.warmup_steps > self.max_steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must not exceed max_steps ({self.max_steps})")


@dataclass(config=STRICT)
class WordEvalParams:
    samples: PositiveInt = 1000  # words sampled to measure how many are real
    temperature: PositiveFloat = 1.0
    seed: Seed = 1337


@dataclass(config=STRICT)
class EvaluateParams:
    batch_size: Annotated[int, Field(gt=0, le=MAX_BATCH)] = 64  # windows a pass: 1.7x 256's speed on 2 AVX2 cores
    # the train split's loss over evenly spaced windows with about this many targets (the validation
    # split's size, 111,540 for Shakespeare); null: every window. Shakespeare's whole 1 M took 17 s
    train_tokens: Annotated[int, Field(gt=0)] | None = 131_072
    words: WordEvalParams | None = None  # word metrics, for a word-list example (which gets them by default)


@dataclass(config=STRICT)
class SampleParams:
    prompts: Prompts = Field(default_factory=lambda: ["\n"])
    num_samples: PositiveInt = 2
    max_new_tokens: Annotated[int, Field(ge=1, le=MAX_NEW_TOKENS)] = 300
    temperature: NonNegativeFloat = 0.8  # 0 is greedy
    top_k: NonNegativeInt | None = 40  # 0 or null: no top-k cut
    seed: Seed = 1337


@dataclass(config=STRICT)
class InspectParams:
    """What the inspect stage shows: next-character tables and attention maps of each prompt."""

    prompts: Prompts = Field(default_factory=lambda: ["\n"])
    top_k: PositiveInt = 5  # next characters per row of the text table


@dataclass(config=STRICT)
class ExampleParams:
    """One example's section; every key but `data.kind` has a default."""

    data: DataParams
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainParams = Field(default_factory=TrainParams)
    evaluate: EvaluateParams = Field(default_factory=EvaluateParams)
    sample: SampleParams = Field(default_factory=SampleParams)
    inspect: InspectParams = Field(default_factory=InspectParams)
    tune: dict[str, Any] | None = None  # read by the sweep alone, against its own schema

    def __post_init__(self):
        if self.data.kind == "words" and self.evaluate.words is None:
            raise ValueError("evaluate.words is required for a word-list example")
        if self.data.kind != "words" and self.evaluate.words is not None:
            raise ValueError("evaluate.words is only for a word-list example (data.kind: words)")
        if self.data.kind != "words" and self.train.sampling == "passes":
            raise ValueError("train.sampling: passes is only for a word-list example (data.kind: words)")


def with_empty_sections(section: dict) -> dict:
    """An example's raw section with the defaults a key's absence cannot say: an empty section
    (`model:`) is all defaults, and a word list gets word metrics unless `evaluate.words` is null."""
    section = {key: {} if value is None and key in SECTIONS else value for key, value in section.items()}
    data, evaluate = section.get("data"), section.get("evaluate", {})
    if isinstance(data, dict) and data.get("kind") == "words" and isinstance(evaluate, dict):
        section["evaluate"] = {"words": {}} | evaluate
    return section


SCHEMA_CLASSES = (
    WordsData,
    TextData,
    ModelConfig,
    TrainParams,
    WordEvalParams,
    EvaluateParams,
    SampleParams,
    InspectParams,
    ExampleParams,
)
SECTIONS = [f.name for f in dataclasses.fields(ExampleParams)]
