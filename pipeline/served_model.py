"""The MLflow model of a trained checkpoint, logged as code ("models from code"): nothing is pickled.

MLflow runs this file to load the model: `set_model` at the bottom hands it the instance. The
weights travel as the artifact `weights`, a checkpoint read with `torch.load(weights_only=True)`;
the `pipeline` package travels in the model's `code/` folder (pipeline/logged_models.py logs both).

predict(prompts, params) -> DataFrame, one row per sample (prompt by prompt), columns `prompt`,
`sample` (0, 1, ...) and `completion` (the new characters only, `max_new_tokens` of them). Served,
that is `{"predictions": [{"prompt": ..., "sample": 0, "completion": ...}, ...]}`: each
completion says which prompt it continues, also when `num_samples` > 1.

Input: a list of prompts, a str, or a one-column DataFrame. Params (all optional): PARAM_DEFAULTS.
Sampling is the sample stage's (pipeline.sampling: KV cache, one generator seeded by `seed` for the
whole request), so the same prompts and params give the same text as `python -m pipeline sample`.
A prompt is read as the sample stage reads it (pipeline.sampling.read_prompt): the model of a word
list (its MLmodel's model_config says `word_list: true`) reads a word from the boundary before it,
and each completion stops at the word's end, so `COR` completes to `E` or `N`.
A bad prompt or param raises MlflowException(INVALID_PARAMETER_VALUE): HTTP 400 with the message.

An unknown param (`temprature`) never reaches predict when MLflow calls it: MLflow 3.17's pyfunc
checks params against the signature's params schema, drops any it does not list with only a
warning in the server's log, and fills in the defaults, so such a request is answered 200 at the
default values. Only a direct call of `CharGPTModel.predict` is refused with the list of params.
"""

from pathlib import Path

import mlflow
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from pydantic import ValidationError

from pipeline.checkpoint import load_checkpoint
from pipeline.device import pick_device
from pipeline.errors import PipelineError
from pipeline.sampling import check_prompts, continuations, make_generator, sampling_of
from pipeline.schema import SampleParams

WEIGHTS = "weights"  # the artifact that holds the checkpoint
PARAM_DEFAULTS = {"max_new_tokens": 200, "temperature": 1.0, "top_k": 0, "num_samples": 1, "seed": 1337}
LIMITS = {"max_new_tokens": 10_000, "num_samples": 100, "prompts": 100}  # per request: keep a server responsive


def bad_request(message: str) -> MlflowException:
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def read_prompts(model_input) -> list[str]:
    """The prompts of a list, a str, a Series or array, or a one-column DataFrame."""
    if isinstance(model_input, pd.DataFrame):
        if model_input.shape[1] != 1:
            raise bad_request(f"input must have one column of prompts, not {list(model_input.columns)}")
        model_input = model_input.iloc[:, 0]
    if isinstance(model_input, str):
        model_input = [model_input]
    try:
        prompts = list(model_input)
    except TypeError:
        raise bad_request(f"input must be a list of prompts, not {type(model_input).__name__}") from None
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise bad_request(f"input must be a non-empty list of prompt strings, got {prompts!r:.200}")
    if len(prompts) > LIMITS["prompts"]:
        raise bad_request(f"at most {LIMITS['prompts']} prompts per request, got {len(prompts)}")
    return prompts


def sample_params(prompts: list[str], params: dict | None) -> SampleParams:
    """The request's params over PARAM_DEFAULTS, checked as params.yaml's `sample` section is."""
    params = dict(params or {})
    if unknown := sorted(set(params) - set(PARAM_DEFAULTS)):
        raise bad_request(f"unknown params {unknown}: the params are {sorted(PARAM_DEFAULTS)}")
    values = PARAM_DEFAULTS | {k: v.item() if hasattr(v, "item") else v for k, v in params.items()}
    values["top_k"] = values["top_k"] or None  # 0: no top-k cut
    try:
        checked = SampleParams(prompts=prompts, **values)
    except ValidationError as e:
        details = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        raise bad_request(f"bad params: {details}") from None
    for name in ("max_new_tokens", "num_samples"):
        if getattr(checked, name) > LIMITS[name]:
            raise bad_request(f"bad params: {name} is {getattr(checked, name)}, at most {LIMITS[name]}")
    return checked


class CharGPTModel(mlflow.pyfunc.PythonModel):
    """Text from a character-level GPT checkpoint: see the module docstring."""

    def load_context(self, context):
        self.device = pick_device("auto")
        checkpoint = load_checkpoint(Path(context.artifacts[WEIGHTS]), self.device)
        self.model, self.vocab = checkpoint.model, checkpoint.vocab
        self.word_list = bool((context.model_config or {}).get("word_list", False))  # logged before: text

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        """MLflow hands over a DataFrame (the signature has a column of prompts); a direct call may pass a list."""
        prompts = read_prompts(model_input)
        try:
            check_prompts(self.vocab, prompts, self.word_list)
        except PipelineError as e:
            raise bad_request(str(e)) from None
        sample = sample_params(prompts, params)
        generator = make_generator(sample.seed, self.device)
        rows = []
        with torch.inference_mode():
            for prompt in prompts:
                texts = continuations(
                    self.model,
                    self.vocab,
                    prompt,
                    sample.num_samples,
                    sampling_of(sample),
                    generator,
                    self.device,
                    self.word_list,
                )
                rows += [(prompt, i, text) for i, text in enumerate(texts)]
        return pd.DataFrame(rows, columns=["prompt", "sample", "completion"])


mlflow.models.set_model(CharGPTModel())
