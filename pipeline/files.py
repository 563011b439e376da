"""Reading and writing files so that a killed process leaves the old file or the new one."""

import errno
import io
import json
import os
import pickle
import resource
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


DISK_FULL = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}  # no room on the disk, past the file-size limit, over quota
SQLITE_WRITE_FAULTS = ("disk I/O error", "database or disk is full")  # how SQLite reports the same


def human(size: float) -> str:
    """`1.5 GiB`: a size in bytes as a message shows it."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def file_size_limit() -> int | None:
    """The largest file this process may write (`ulimit -f`, RLIMIT_FSIZE), or None for no limit.
    Python ignores SIGXFSZ, so a write past it fails with EFBIG instead of killing the process."""
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    return None if soft == resource.RLIM_INFINITY else soft


def check_room(path: Path, size: int, what: str = "") -> None:
    """Fail before any work if `path` could not be written at `size` bytes: past the file-size limit,
    or more than its disk has free. `what` names the file in the message (default: its path)."""
    what, path = what or str(path), Path(path)
    limit = file_size_limit()
    if limit is not None and size > limit:
        raise PipelineError(
            f"cannot write {what}: it needs {human(size)}, past this process's file-size limit of {human(limit)} "
            "(ulimit -f): raise the limit"
        )
    check_free(path, size, what)


def check_free(path: Path, size: int, what: str) -> None:
    """Fail before any work if the disk of `path` has less than `size` bytes free for `what`."""
    folder = next((p for p in [Path(path).parent, *Path(path).parents] if p.exists()), Path("/"))
    free = shutil.disk_usage(folder).free
    if size > free:
        raise PipelineError(f"cannot write {what}: it needs {human(size)}, its disk has {human(free)} free")


def write_failure(error: BaseException) -> str | None:
    """The one line for an error that is a full disk or a file-size limit, wherever it was raised
    (torch, MLflow's artifact copy, matplotlib): the file and the reason; None for any other error."""
    seen = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in DISK_FULL:
            written = seen.filename2 or seen.filename  # a copy names its source, then the file it writes
            return f"cannot write {written or 'a file'}: {seen.strerror}{limit_note()}"
        seen = seen.__cause__ or seen.__context__
    return None


def limit_note() -> str:
    limit = file_size_limit()
    return f" (the file-size limit, ulimit -f, is {human(limit)})" if limit is not None else ""


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
