"""One writer at a time per example: a `filelock.FileLock` on `models/<example>/.lock`.

Every command that writes an example's outputs or MLflow run holds that lock while it works. The
kernel drops it when the process dies, however it dies. Beside it, `.lock.owner` records who holds
it (pid, host, command, start time), written atomically once the lock is held. So:

- a second writer finds the lock taken and stops at once with one line naming the holder;
- a record whose lock is free was left by a dead process: the next writer takes over and says so;
- both files are removed, record first, only by the process that holds the lock.

`dvc exp run --temp` and `--queue` run in a copy of the project, with its own `models/` (the lock
files are git-ignored, so a copy never starts with one): they are not blocked.
"""

import contextlib
import dataclasses
import datetime
import functools
import json
import os
import sys
import time
from pathlib import Path

import filelock

from pipeline.errors import PipelineError
from pipeline.files import write_bytes
from pipeline.paths import shown_path
from pipeline.processes import command_line, gone_here, this_host

LOCK_NAME = ".lock"
OWNER_NAME = ".lock.owner"
FOLDER_RETRIES = 40  # a folder removed by a writer leaving as this one arrives: make it again this often
RECORD_WAIT = 2.0  # a holder that has just taken the lock writes its record within this many seconds


@dataclasses.dataclass(frozen=True)
class Owner:
    """Who holds (or held) an example's lock."""

    pid: int
    host: str
    command: str
    started: datetime.datetime

    @property
    def alive(self) -> bool:
        """False only when the owner is proven gone; one on another host cannot be checked from here."""
        return not gone_here(self.host, self.pid)

    def describe(self) -> str:
        """`'python -m pipeline train --example toy' (pid 1234 on this host, since 15:20:01)`"""
        where = "this host" if self.host == this_host() else self.host
        return f"{self.command!r} (pid {self.pid} on {where}, since {self.since})"

    @property
    def since(self) -> str:
        """The start time: `15:20:01` today, `2024-05-01 15:20:01` another day."""
        started = self.started.astimezone()
        same_day = started.date() == datetime.datetime.now().astimezone().date()
        return started.strftime("%H:%M:%S" if same_day else "%Y-%m-%d %H:%M:%S")

    def record(self) -> bytes:
        started = self.started.isoformat(timespec="seconds")
        data = {"pid": self.pid, "host": self.host, "command": self.command, "started": started}
        return (json.dumps(data) + "\n").encode()

    @classmethod
    def parse(cls, data: bytes) -> "Owner | None":
        """The owner in a record, or None if the bytes are not such a record."""
        try:
            record = json.loads(data.decode("utf-8"))
            started = datetime.datetime.fromisoformat(record["started"])
            return cls(int(record["pid"]), str(record["host"]), str(record["command"]), started)
        except (ValueError, TypeError, KeyError, AttributeError):
            return None


def lock_path(model_dir: Path) -> Path:
    return Path(model_dir) / LOCK_NAME


def owner_path(model_dir: Path) -> Path:
    return Path(model_dir) / OWNER_NAME


def read_record(model_dir: Path) -> bytes | None:
    try:
        return owner_path(model_dir).read_bytes()
    except OSError:
        return None


def lock_owner(model_dir: Path) -> Owner | None:
    """Who holds the example's lock, or held it and died (`Owner.alive` tells); None without a record."""
    record = read_record(model_dir)
    return Owner.parse(record) if record is not None else None


@contextlib.contextmanager
def example_lock(model_dir: Path, command: str | None = None, wait: float = 0.0):
    """Hold the example's lock while the block runs; a PipelineError if another process holds it, at
    once or after waiting `wait` seconds for it.

    `command`: what the record says holds it (default: this process's command line). Yields the Owner.
    """
    model_dir = Path(model_dir)
    owner = Owner(os.getpid(), this_host(), command or command_line(), datetime.datetime.now().astimezone())
    made = [folder for folder in (model_dir, *model_dir.parents) if not folder.exists()]  # deepest first
    lock = _acquire(model_dir, wait)
    try:
        _take_over(model_dir, lock)
        write_bytes(owner_path(model_dir), owner.record())
    except BaseException:
        lock.release()
        raise
    try:
        yield owner
    finally:
        _release(model_dir, lock, made)


def writes_example(stage):
    """A stage function `(params, paths, ...)` that holds its example's lock while it runs."""

    @functools.wraps(stage)
    def locked(params, paths, *args, **kwargs):
        with example_lock(paths.model_dir):
            return stage(params, paths, *args, **kwargs)

    return locked


class InUse(PipelineError):
    """Another live process holds the example's lock."""


def in_use_message(model_dir: Path, owner: Owner | None) -> str:
    holder = owner.describe() if owner else "another process (its lock file holds no readable record)"
    message = f"{shown_path(model_dir)} is in use by {holder}; wait for it, or stop it"
    if owner and owner.host != this_host():
        message += f" (if it is no longer running on {owner.host}, delete {shown_path(owner_path(model_dir))})"
    return message


def _acquire(model_dir: Path, wait: float) -> filelock.FileLock:
    """The example's lock, held; InUse naming the holder if it stays taken for `wait` seconds."""
    lock = filelock.FileLock(lock_path(model_dir), thread_local=False)
    for _ in range(FOLDER_RETRIES):
        try:
            model_dir.mkdir(parents=True, exist_ok=True)
            lock.acquire(timeout=wait)
            return lock
        except filelock.Timeout:
            raise InUse(in_use_message(model_dir, _holder(model_dir))) from None
        except FileNotFoundError:  # a writer that had made the folder removed it, empty, on leaving
            continue
        except OSError as e:
            raise PipelineError(f"cannot write to {model_dir}: {e.strerror or e} (needed for its lock)") from None
    raise PipelineError(f"cannot lock {shown_path(model_dir)}: its folder keeps disappearing")


def _holder(model_dir: Path) -> Owner | None:
    """The live holder's record; one that has just taken the lock may not have written it yet."""
    deadline = time.monotonic() + RECORD_WAIT
    while (owner := lock_owner(model_dir)) is None or not owner.alive:
        if time.monotonic() > deadline:
            return owner
        time.sleep(0.05)
    return owner


def _take_over(model_dir: Path, lock: filelock.FileLock) -> None:
    """With the lock held: say whose record this replaces; refuse one of another host, which may
    still run there on a filesystem shared between machines."""
    for leftover in model_dir.glob(f".{OWNER_NAME}.*.tmp"):  # a holder killed while writing its record
        leftover.unlink(missing_ok=True)
    record = read_record(model_dir)
    if record is None:
        return
    previous = Owner.parse(record)
    shown = shown_path(model_dir)
    if previous is None:
        message = f"{shown}: taking over {shown_path(owner_path(model_dir))}, which holds no readable record"
    elif previous.host != this_host():
        raise InUse(in_use_message(model_dir, previous))
    else:
        message = (
            f"{shown}: taking over the lock of pid {previous.pid} ({previous.command!r}, since {previous.since}), "
            "which is no longer running"
        )
    print(message, file=sys.stderr, flush=True)


def _release(model_dir: Path, lock: filelock.FileLock, made: list[Path]) -> None:
    """Remove the record, then the lock file, while still holding the lock; then let go of it.

    `made`: the folders the lock created, deepest first; those still empty go too, so that a
    command that failed before writing anything leaves no trace.
    """
    try:
        owner_path(model_dir).unlink(missing_ok=True)
        lock_path(model_dir).unlink(missing_ok=True)  # a waiter on the unlinked file tries again (filelock)
    except OSError as e:  # a folder made read-only meanwhile: the next writer takes the lock over
        print(f"warning: could not remove {shown_path(owner_path(model_dir))}: {e.strerror or e}", file=sys.stderr)
    finally:
        lock.release()
    for folder in made:
        try:
            folder.rmdir()
        except OSError:  # not empty (outputs, or another writer's lock): keep it and those above
            break
