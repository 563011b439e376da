"""Reading and writing files so that a killed process leaves the old file or the new one."""

import io
import json
import os
import pickle
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from pipeline.errors import PipelineError


def _default_file_mode() -> int:
    umask = os.umask(0o022)  # the only way to read it; set back at once, at import time
    os.umask(umask)
    return 0o666 & ~umask


FILE_MODE = _default_file_mode()


def atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Write through a temporary file in the same folder, then rename it into place.

    A full disk or an unwritable folder is a PipelineError naming the file; the old file stays.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.fchmod(fd, FILE_MODE)  # mkstemp makes 0600; the result should look like any other file
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
        _fsync_folder(path.parent)  # make the rename itself survive a power cut
    except OSError as e:
        raise PipelineError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_writable(folder: Path) -> None:
    """Fail before any work if `folder` cannot take new files: read-only, not a folder, disk full."""
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder) as f:
            f.write(b"x" * 4096)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise PipelineError(f"cannot write to {folder}: {e.strerror or e}") from None


def write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2) + "\n")


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PipelineError(f"{path} does not exist: run the stage that writes it first") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PipelineError(f"{path} is not valid JSON: {e}") from None


def save_torch(path: Path, obj) -> None:
    import torch  # here, not at the top: the example lock writes through this module before torch loads

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_bytes(path, buffer.getvalue())


def load_torch(path: Path, device="cpu"):
    """Load tensors and plain containers only: `weights_only=True` never runs pickled code."""
    import torch

    if not Path(path).exists():
        raise PipelineError(f"{path} does not exist: run the train stage first")
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError:  # torch's message would suggest weights_only=False: never
        raise PipelineError(
            f"{path} is not a readable checkpoint (UnpicklingError): it is torn, or holds more than tensors and "
            "plain values, which is never loaded"
        ) from None
    except Exception as e:  # torch raises many types for a torn or foreign file
        detail = next((line for line in str(e).splitlines() if line.strip()), "")[:200]
        raise PipelineError(f"{path} is not a readable checkpoint ({type(e).__name__}: {detail})") from None


def write_folder(path: Path, files: dict[str, bytes]) -> None:
    """Make `path` a folder holding exactly `files`: a failure leaves the old folder as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        for name, data in files.items():
            write_bytes(staging / name, data)
        old = staging.with_suffix(".old") if path.exists() else None
        if old:
            os.replace(path, old)
        try:
            os.replace(staging, path)
        except BaseException:
            if old:
                os.replace(old, path)
            raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if old:
        shutil.rmtree(old)
