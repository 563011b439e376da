import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.cli import main
from pipeline.config import example_params, load_params
from pipeline.device import BF16_BATCH_SIZE, FLOAT32_BATCH_SIZE, cpu_supports_bf16
from pipeline.errors import PipelineError
from pipeline.model import ModelConfig
from pipeline.overrides import apply_overrides, parse_override, read_overrides_file
from pipeline.schema import SampleParams, TrainParams, WordEvalParams

from .helpers import ROOT


def test_the_shipped_params_file_is_valid():
    params = load_params(ROOT / "params.yaml")
    assert set(params) == {"toy", "shakespeare"}
    assert params["toy"].data.kind == "words" and params["shakespeare"].data.kind == "text"
    assert params["toy"].evaluate.words is not None


@pytest.mark.parametrize(
    "override, message",
    [
        ("toy.model.n_embd=31", "toy.model: n_embd (31) must be divisible by n_head (2)"),
        ("shakespeare.model.n_embd=62", "shakespeare.model: rotary positions need an even head size, not 31"),
        ("toy.model.positions=absolute", "toy.model.positions: Input should be 'learned' or 'rotary'"),
        ("toy.train.optimizer=sgd", "toy.train.optimizer: Input should be 'adamw' or 'muon'"),
        ("toy.train.learning_rate=-0.1", "toy.train.learning_rate: Input should be greater than 0 (got -0.1)"),
        ("toy.train.lerning_rate=0.1", "toy.train.lerning_rate: unknown key (did you mean 'learning_rate'?)"),
        ("toy.trian.max_steps=3", "toy.trian: unknown key (did you mean 'train'?)"),
        ("toy.train.max_steps=0", "toy.train.max_steps: Input should be greater than 0"),
        ("toy.train.max_steps=2.5", "toy.train.max_steps: Input should be a valid integer"),
        ("toy.train.device=gpu", "toy.train.device: String should match pattern"),
        ("toy.train.precision=fp8", "toy.train.precision: Input should be 'auto', 'float32' or 'bfloat16'"),
        (
            "toy.train.compile_mode=graphs",
            "toy.train.compile_mode: Input should be 'default', 'reduce-overhead', 'max-autotune' or "
            "'max-autotune-no-cudagraphs'",
        ),
        ("toy.train.min_lr=1", "toy.train: min_lr (1.0) must not exceed learning_rate"),
        ("toy.data.val_fraction=1.5", "toy.data.val_fraction: Input should be less than 1"),
        ("toy.data.kind=csv", "toy.data: Input tag 'csv' found using 'kind' does not match"),
        ("toy.data.seedd=1", "toy.data.seedd: unknown key (did you mean 'seed'?)"),
        ("toy.sample.prompts=[]", "toy.sample.prompts: List should have at least 1 item"),
        ("toy.inspect.top_k=0", "toy.inspect.top_k: Input should be greater than 0"),
        ("toy.inspect.topk=3", "toy.inspect.topk: unknown key (did you mean 'top_k'?)"),
        ("toy.evaluate.words=null", "toy: evaluate.words is required for a word-list example"),
        ("shakespeare.model.dropout=1", "shakespeare.model.dropout: Input should be less than 1"),
        ("toy.model.n_layer=1000000000000", "toy.model.n_layer: Input should be less than or equal to 10000"),
        ("toy.model.n_embd=1000000000000", "toy.model.n_embd: Input should be less than or equal to 65536"),
        ("toy.model.n_head=1000000000000", "toy.model.n_head: Input should be less than or equal to 4096"),
        ("toy.model.block_size=1000000000000", "toy.model.block_size: Input should be less than or equal to 1048576"),
        ("toy.train.batch_size=1000000000000", "toy.train.batch_size: Input should be less than or equal to 16777216"),
        (
            "toy.train.batch_size=automatic",
            "toy.train.batch_size: Input should be an integer or 'auto' (got 'automatic')",
        ),
        (
            "toy.evaluate.batch_size=1000000000000",
            "toy.evaluate.batch_size: Input should be less than or equal to 16777216",
        ),
    ],
)
def test_a_bad_parameter_is_named_with_its_reason(override, message):
    with pytest.raises(PipelineError) as error:
        load_params(ROOT / "params.yaml", [override])
    assert message in str(error.value)


def test_every_problem_is_reported_at_once():
    with pytest.raises(PipelineError) as error:
        load_params(ROOT / "params.yaml", ["toy.model.n_layer=0", "shakespeare.train.batch_size=-1"])
    assert "has 2 problems" in str(error.value)
    assert "toy.model.n_layer" in str(error.value) and "shakespeare.train.batch_size" in str(error.value)


def test_an_unknown_example_gets_a_suggestion():
    params = load_params(ROOT / "params.yaml")
    with pytest.raises(PipelineError, match="unknown example 'shakespear' \\(did you mean 'shakespeare'\\?\\)"):
        example_params(params, "shakespear", ROOT / "params.yaml")


def test_broken_or_missing_params_files_are_named(tmp_path):
    path = tmp_path / "params.yaml"
    with pytest.raises(PipelineError, match="does not exist"):
        load_params(path)
    path.write_text("toy: [unclosed")
    with pytest.raises(PipelineError, match="not valid YAML"):
        load_params(path)
    path.write_text("- a list")
    with pytest.raises(PipelineError, match="must map example names"):
        load_params(path)


def test_overrides_are_read_as_yaml_values():
    raw = apply_overrides({"toy": {"train": {"max_steps": 1}}}, ["toy.train.max_steps=5", "toy.sample.top_k=null"])
    assert raw == {"toy": {"train": {"max_steps": 5}, "sample": {"top_k": None}}}
    with pytest.raises(PipelineError, match="key.path=value"):
        apply_overrides({}, ["toy.train.max_steps"])


def test_a_missing_key_is_named(tmp_path):
    """Every key has a default but the kind of data, which says what the other data keys are."""
    path = tmp_path / "params.yaml"
    path.write_text(re.sub(r"\n    kind: words[^\n]*", "", (ROOT / "params.yaml").read_text(), count=1))
    with pytest.raises(PipelineError, match=r"toy.data.kind: missing key \(words or text\)"):
        load_params(path)


def test_a_section_states_only_what_differs_from_the_defaults(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("examples: [mine]\nmine:\n  data: {kind: text}\n  model:\n  train: {max_steps: 700}\n")
    params = load_params(path)["mine"]
    assert params.train.max_steps == 700 and params.train.learning_rate == TrainParams().learning_rate
    assert params.model == ModelConfig() and params.sample == SampleParams() and params.evaluate.words is None
    words = load_params(path, ["mine.data.kind=words"])["mine"]
    assert words.evaluate.words == WordEvalParams()


def test_an_auto_batch_size_comes_to_a_number_by_the_runs_precision_on_its_device():
    def batch(*overrides):
        return load_params(ROOT / "params.yaml", ["shakespeare.train.batch_size=auto", *overrides])[
            "shakespeare"
        ].train.batch_size

    assert batch("shakespeare.train.precision=float32") == FLOAT32_BATCH_SIZE
    assert batch("shakespeare.train.precision=bfloat16") == BF16_BATCH_SIZE
    assert batch("shakespeare.train.device=cuda") == BF16_BATCH_SIZE  # read from the name: no GPU needed
    assert batch("shakespeare.train.device=cpu") == (BF16_BATCH_SIZE if cpu_supports_bf16() else FLOAT32_BATCH_SIZE)
    assert FLOAT32_BATCH_SIZE < BF16_BATCH_SIZE
    assert TrainParams(batch_size=7).batch_size == 7 and TrainParams().batch_size == batch()


def test_the_example_lists_name_sections_of_the_file(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("examples: [mine, other]\nmine:\n  data: {kind: text}\n")
    with pytest.raises(PipelineError, match=r"'examples' names \['other'\], which have no section"):
        load_params(path)


def test_the_gpu_overrides_file_passes_the_schema_and_leaves_the_cpu_defaults_alone():
    defaults = load_params(ROOT / "params.yaml")
    params = load_params(ROOT / "params.yaml", read_overrides_file(ROOT / "overrides" / "gpu.txt"))
    gpu = params["shakespeare"]
    assert (gpu.model.n_layer, gpu.model.n_head, gpu.model.n_embd, gpu.model.block_size) == (6, 6, 384, 256)
    assert (gpu.train.device, gpu.train.precision, gpu.train.compile) == ("cuda", "bfloat16", True)
    assert params["toy"] == defaults["toy"] and defaults["shakespeare"].train.device == "auto"


def test_an_overrides_file_skips_comments_and_blank_lines(tmp_path):
    path = tmp_path / "o.txt"
    path.write_text("# a comment\n\n  toy.train.max_steps=7  \n")
    assert read_overrides_file(path) == ["toy.train.max_steps=7"]
    with pytest.raises(PipelineError, match="does not exist"):
        read_overrides_file(tmp_path / "missing.txt")


# Each bad override or params file: exit status 2, one message naming the problem, nothing written.
BAD_OVERRIDES = [
    ("toy.train.lerning_rate=0.1", "toy.train.lerning_rate: unknown key (did you mean 'learning_rate'?)"),
    ("toy.trian.max_steps=3", "toy.trian: unknown key (did you mean 'train'?)"),
    ("tooy.train.max_steps=3", "unknown example 'tooy' (did you mean 'toy'?)"),
    ("toy.train.max_steps=0", "toy.train.max_steps: Input should be greater than 0 (got 0)"),
    ("toy.train.max_steps=many", "toy.train.max_steps: Input should be a valid integer"),
    ("toy.train.learning_rate=5", "toy.train.learning_rate: Input should be less than or equal to 1 (got 5)"),
    ("toy.train.learning_rate=.nan", "toy.train.learning_rate: Input should be a finite number"),
    ("toy.train.grad_clip=.inf", "toy.train.grad_clip: Input should be a finite number"),
    ("toy.train.weight_decay=-0.1", "toy.train.weight_decay: Input should be greater than or equal to 0"),
    ("toy.train.beta2=1", "toy.train.beta2: Input should be less than 1"),
    ("toy.train.seed=-1", "toy.train.seed: Input should be greater than or equal to 0"),
    ("toy.data.seed=4294967296", "toy.data.seed: Input should be less than 4294967296"),
    ("toy.train.warmup_steps=5000", "toy.train: warmup_steps (5000) must not exceed max_steps (400)"),
    ("toy.train.eval_interval=0", "toy.train.eval_interval: Input should be greater than 0"),
    ("toy.train.device=gpu", "toy.train.device: String should match pattern"),
    ("toy.model.n_head=0", "toy.model.n_head: Input should be greater than 0"),
    ("toy.model.n_embd=31", "toy.model: n_embd (31) must be divisible by n_head (2)"),
    ("toy.model.dropout=-0.1", "toy.model.dropout: Input should be greater than or equal to 0"),
    ("toy.model.bias=maybe", "toy.model.bias: Input should be a valid boolean"),
    ("toy.data.val_fraction=0", "toy.data.val_fraction: Input should be greater than 0"),
    ("toy.data.kind=csv", "toy.data: Input tag 'csv' found using 'kind' does not match"),
    ("toy.data.alphabet=AB C", "toy.data.alphabet: String should match pattern"),
    ("toy.data.alphabet=ABCA", "toy.data: alphabet 'ABCA' repeats a character"),
    ("toy.data.repeats=0", "toy.data.repeats: Input should be greater than or equal to 1"),
    ("toy.sample.prompts=[]", "toy.sample.prompts: List should have at least 1 item"),
    ("toy.sample.prompts=['']", "toy.sample.prompts.0: String should have at least 1 character"),
    ("toy.sample.prompts=COR", "toy.sample.prompts: Input should be a valid list"),
    ("toy.sample.top_k=-3", "toy.sample.top_k: Input should be greater than or equal to 0"),
    ("toy.sample.temperature=-1", "toy.sample.temperature: Input should be greater than or equal to 0"),
    ("toy.evaluate.batch_size=0", "toy.evaluate.batch_size: Input should be greater than 0"),
    ("toy.evaluate.words=null", "toy: evaluate.words is required for a word-list example"),
    (
        "shakespeare.evaluate.words={samples: 10, temperature: 1.0, seed: 1}",
        "shakespeare: evaluate.words is only for a word-list example",
    ),
    ("shakespeare.train.sampling=passes", "shakespeare: train.sampling: passes is only for a word-list example"),
    ("toy.train.sampling=epochs", "toy.train.sampling: Input should be 'random' or 'passes'"),
    ("toy.train=5", "toy.train: Input should be a dictionary"),
    ("toy.sample.prompts=[CO", "override 'toy.sample.prompts=[CO': the value is not valid YAML"),
    ("toy.train.max_steps", "override 'toy.train.max_steps' must look like key.path=value"),
    ("toy..max_steps=3", "must look like key.path=value"),
    ("toy.train.max_steps.x=1", "override 'toy.train.max_steps.x=1': 'max_steps' is not a section"),
]

DEFAULT = (ROOT / "params.yaml").read_text()
BAD_FILES = [
    ("toy: [unclosed", "is not valid YAML"),
    ("", "must map example names to their parameters"),
    ("toy: 5\n", "toy: Input should be a dictionary"),
    (re.sub(r"\n    kind: words[^\n]*", "", DEFAULT, count=1), "toy.data.kind: missing key"),
    (re.sub(r"\n    max_steps: (\d+)", r"\n    max_steps: \1\n    max_steps: 200", DEFAULT, count=1), "appears twice"),
    (DEFAULT.replace("  model:\n", "  modle:\n", 1), "toy.modle: unknown key (did you mean 'model'?)"),
    (DEFAULT.replace("batch_size: 150", "batch_size: -1").replace("n_layer: 1\n", "n_layer: 0\n"), "has 2 problems"),
    (DEFAULT.replace("kind: text", "kind: txt", 1), "shakespeare.data: Input tag 'txt' found using 'kind'"),
    (DEFAULT.replace("sweeps: [toy]", "sweeps: [toys]", 1), "'sweeps' names ['toys'], which have no section"),
]


def files_under(folder: Path) -> dict:
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("override, message", BAD_OVERRIDES, ids=[o for o, _ in BAD_OVERRIDES])
def test_a_bad_override_stops_every_command_before_it_writes(override, message, project, monkeypatch, capsys):
    monkeypatch.chdir(project)
    before = files_under(project)
    for command in ("prepare", "train"):
        code = main([command, "--example", "toy", "--params", str(ROOT / "params.yaml"), "--set", override])
        assert code == 2 and message in capsys.readouterr().err
    assert files_under(project) == before


@pytest.mark.parametrize("content, message", BAD_FILES, ids=[m for _, m in BAD_FILES])
def test_a_bad_params_file_stops_before_anything_is_written(content, message, project, monkeypatch, capsys):
    monkeypatch.chdir(project)
    (project / "params.yaml").write_text(content)
    before = files_under(project)
    assert main(["train", "--example", "toy"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err
    assert files_under(project) == before


@given(st.text(max_size=40))
def test_any_override_text_is_parsed_or_refused_with_a_pipeline_error(text):
    try:
        keys, _ = parse_override(text)
    except PipelineError as e:
        assert "override" in str(e)
    else:
        assert all(keys) and "=" in text
