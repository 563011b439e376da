"""Python loads this module at start-up when its folder is on PYTHONPATH. With `RECORD_IMPORTS_TO`
set, each process writes, as it exits, its command line and the files of every module it imported:
tests/test_pipeline.py checks each stage's dvc.yaml dependencies against what the stage of its own
`dvc repro` imported, without running the stage again."""

import atexit
import json
import os
import sys
from pathlib import Path


def record(folder: Path) -> None:
    files = sorted(m.__file__ for m in list(sys.modules.values()) if getattr(m, "__file__", None))
    (folder / f"{os.getpid()}.json").write_text(json.dumps({"argv": sys.argv, "files": files}))


if folder := os.environ.get("RECORD_IMPORTS_TO"):
    atexit.register(record, Path(folder))
