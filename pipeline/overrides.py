"""`--set key.path=value` and `--set-file FILE`: changes to the params for one run only."""

import difflib
from pathlib import Path

import yaml

from pipeline.errors import PipelineError


def did_you_mean(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


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
    except UnicodeDecodeError as e:
        raise PipelineError(
            f"overrides file {path} is not UTF-8 text: byte {e.object[e.start]:#04x} at offset {e.start}; "
            "save it as UTF-8"
        ) from None
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
            if node.get(key) is None:  # an empty section in the file
                node[key] = {}
            node = node[key]
            if not isinstance(node, dict):
                raise PipelineError(f"override '{text}': '{key}' is not a section")
        node[keys[-1]] = value
    return raw
