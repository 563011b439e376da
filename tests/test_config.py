import pytest

from pipeline.config import apply_overrides, example_params, load_params, read_overrides_file
from pipeline.errors import PipelineError

from .conftest import ROOT


def test_the_shipped_params_file_is_valid():
    params = load_params(ROOT / "params.yaml")
    assert set(params) == {"toy", "shakespeare"}
    assert params["toy"].data.kind == "words" and params["shakespeare"].data.kind == "text"
    assert params["toy"].evaluate.words is not None


@pytest.mark.parametrize(
    "override, message",
    [
        ("toy.model.n_embd=30", "toy.model: n_embd (30) must be divisible by n_head (4)"),
        ("toy.train.learning_rate=-0.1", "toy.train.learning_rate: Input should be greater than 0 (got -0.1)"),
        ("toy.train.lerning_rate=0.1", "toy.train.lerning_rate: unknown key (did you mean 'learning_rate'?)"),
        ("toy.trian.max_steps=3", "toy.trian: unknown key (did you mean 'train'?)"),
        ("toy.train.max_steps=0", "toy.train.max_steps: Input should be greater than 0"),
        ("toy.train.max_steps=2.5", "toy.train.max_steps: Input should be a valid integer"),
        ("toy.train.device=gpu", "toy.train.device: String should match pattern"),
        ("toy.train.precision=fp8", "toy.train.precision: Input should be 'auto', 'float32' or 'bfloat16'"),
        ("toy.train.min_lr=1", "toy.train: min_lr (1.0) must not exceed learning_rate"),
        ("toy.data.val_fraction=1.5", "toy.data.val_fraction: Input should be less than 1"),
        ("toy.data.kind=csv", "toy.data: Input tag 'csv' found using 'kind' does not match"),
        ("toy.data.seedd=1", "toy.data.seedd: unknown key (did you mean 'seed'?)"),
        ("toy.sample.prompts=[]", "toy.sample.prompts: List should have at least 1 item"),
        ("toy.inspect.top_k=0", "toy.inspect.top_k: Input should be greater than 0"),
        ("toy.inspect.topk=3", "toy.inspect.topk: unknown key (did you mean 'top_k'?)"),
        ("toy.evaluate.words=null", "toy: evaluate.words is required for a word-list example"),
        ("shakespeare.model.dropout=1", "shakespeare.model.dropout: Input should be less than 1"),
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
    path = tmp_path / "params.yaml"
    path.write_text((ROOT / "params.yaml").read_text().replace("    grad_clip: 1.0\n", "", 1))
    with pytest.raises(PipelineError, match=r"toy.train.grad_clip: missing key"):
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
