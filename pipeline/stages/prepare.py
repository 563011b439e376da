"""The prepare stage: reads data/<ex>/input.txt and `<ex>.data`; writes data/<ex>/prepared/
(train.bin, val.bin, meta.json). Logs nothing: the train stage logs the data it used."""

from pipeline.data import prepare
from pipeline.locks import writes_example
from pipeline.paths import ExamplePaths
from pipeline.schema import ExampleParams


@writes_example  # one writer per example: a second one stops at once
def prepare_example(params: ExampleParams, paths: ExamplePaths) -> dict:
    """Build the vocabulary, split and encode data/<example>/input.txt."""
    meta = prepare(params.data, paths)
    print(
        f"{paths.example}: {meta['vocab_size']} characters, {meta['train_tokens']:,} train and "
        f"{meta['val_tokens']:,} validation tokens -> {paths.prepared}"
    )
    return meta
