"""Running one stage for one example: the params read and checked first, and any failure one line
on stderr with a non-zero exit. The DVC entry points (`stages/*.py`) and `python -m pipeline` share it."""

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from pipeline.config import example_params, load_params
from pipeline.errors import PipelineError
from pipeline.files import write_failure
from pipeline.paths import ExamplePaths


def run(stage: Callable, example: str, params_file: Path, overrides: list[str] = (), **options) -> int:
    """Call `stage(params, paths, **options)` for `example`; returns the exit status."""
    try:
        params = example_params(load_params(params_file, overrides), example, params_file)
        stage(params, ExamplePaths(Path.cwd(), example), **options)
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # a full disk, or the file-size limit, wherever the write was
        if (line := write_failure(e)) is None:
            raise
        print(f"error: {line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGINT/SIGTERM turned into Stopped: 128 + the signal, as a shell says
        print(f"error: {e or 'interrupted'}", file=sys.stderr)
        return 128 + getattr(e, "signum", 2)
    return 0


def stage_main(stage: Callable, argv: list[str] | None = None) -> int:
    """A DVC stage's command line: `--example` and `--params`; `python -m pipeline` has the rest."""
    summary = (stage.__doc__ or "").strip().splitlines()[0]
    name = stage.__module__.rsplit(".", 1)[-1]
    parser = argparse.ArgumentParser(
        prog=f"python -m stages.{name}", description=f"{summary} (python -m pipeline --help has every command)"
    )
    parser.add_argument("--example", required=True, help="a section of the params file, e.g. toy")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="default: %(default)s")
    args = parser.parse_args(argv)
    return run(stage, args.example, args.params)
