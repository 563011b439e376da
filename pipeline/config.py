"""`params.yaml`, read and validated once, at the edge: every problem reported at once, each with
its key path, before any work starts.

The file lists its examples under `examples` (DVC's `foreach` reads the same list), the examples
whose sweep `dvc repro` runs under `sweeps`, and holds one section per example with the keys of
pipeline/schema.py.
"""

import dataclasses
from pathlib import Path

import yaml
from pydantic import TypeAdapter, ValidationError

from pipeline.errors import PipelineError
from pipeline.overrides import apply_overrides, did_you_mean
from pipeline.schema import SCHEMA_CLASSES, ExampleParams, with_empty_sections

LISTS = ("examples", "sweeps")  # top-level keys that name examples rather than define one
PARAMS_SCHEMA = TypeAdapter(dict[str, ExampleParams])


def known_keys(classes) -> list[str]:
    return sorted({f.name for cls in classes for f in dataclasses.fields(cls)})


def describe(error: dict, keys: list[str], prefix: tuple = ()) -> str:
    loc = [*prefix, *error["loc"]]
    if loc[1:2] == ["data"] and len(loc) > 2 and loc[2] in ("words", "text"):
        del loc[2]  # pydantic names the chosen `kind` in the path; the file does not
    path = ".".join(str(part) for part in loc)
    if error["type"] in ("unexpected_keyword_argument", "extra_forbidden"):
        return f"{path}: unknown key{did_you_mean(str(error['loc'][-1]), keys)}"
    if error["type"] == "missing":
        return f"{path}: missing key"
    if error["type"] == "union_tag_not_found":  # the one key without a default
        return f"{path}.kind: missing key (words or text)"
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] != "value_error":
        message += f" (got {error['input']!r})"
    return f"{path}: {message}"


def validate(adapter: TypeAdapter, raw, where: str, classes, prefix: tuple = ()):
    """`raw` as the schema's typed objects, or one PipelineError listing every problem."""
    try:
        return adapter.validate_python(raw)
    except ValidationError as e:
        keys = known_keys(classes)
        problems = "\n".join(f"  {describe(err, keys, prefix)}" for err in e.errors())
        count = e.error_count()
        raise PipelineError(f"{where} has {count} problem{'s' * (count > 1)}:\n{problems}") from None


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


def example_sections(raw: dict, path: Path) -> dict:
    """The examples' sections, an empty section (`model:` or `model: {}`) meaning all defaults."""
    sections = {name: section for name, section in raw.items() if name not in LISTS}
    for key in LISTS:
        names = raw.get(key, [])
        if not isinstance(names, list):
            raise PipelineError(f"{path}: '{key}' must be a list of example names (got {names!r})")
        if missing := [name for name in names if name not in sections]:
            raise PipelineError(f"{path}: '{key}' names {missing}, which have no section in the file")
    return {name: with_empty_sections(s) if isinstance(s, dict) else s for name, s in sections.items()}


def load_params(path: Path, overrides: list[str] = ()) -> dict[str, ExampleParams]:
    """Every example's parameters from `path`, or one PipelineError listing every problem."""
    raw = apply_overrides(read_params_file(path), list(overrides))
    return validate(PARAMS_SCHEMA, example_sections(raw, path), str(path), SCHEMA_CLASSES)


def listed_examples(path: Path) -> list[str]:
    """The examples `dvc repro` runs, in the order of the file's `examples` list."""
    return list(read_params_file(path).get("examples", []))


def example_params(params: dict[str, ExampleParams], example: str, source: Path) -> ExampleParams:
    if example not in params:
        raise PipelineError(
            f"unknown example '{example}'{did_you_mean(example, params)}; {source} defines: {', '.join(params)}"
        )
    return params[example]
