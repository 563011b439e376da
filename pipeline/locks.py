"""One writer at a time per example: a lock file under `models/<example>/`.

Every command that writes an example's outputs or MLflow run holds `models/<example>/.lock`
while it works. The file records who holds it (pid, host, command, start time) and carries an OS
lock (`flock`), which the kernel drops when the process dies however it dies. So:

- a second writer finds the OS lock taken and stops at once with one line naming the holder;
- a lock file whose OS lock is free was left by a dead process: the next writer takes it over
  and says so;
- the file appears with its record complete (written to a temporary file, then hard-linked into
  place), and is replaced (rename) or removed only by a process that holds its OS lock.

`dvc exp run --temp` and `--queue` run in a copy of the project, with its own `models/` (the lock
file is git-ignored, so a copy never starts with one): they are not blocked.
"""

import contextlib
import dataclasses
import datetime
import fcntl
import functools
import json
import os
import shlex
import socket
import sys
import tempfile
import time
from pathlib import Path

from pipeline.errors import PipelineError  # and not pipeline.files, which loads torch: a lock is taken first

LOCK_NAME = ".lock"
RETRIES = 40  # a lock file that is being released or taken over right now: look again this many times
RETRY_SECONDS = 0.05
LEFTOVER_SECONDS = 60  # an unlocked temporary lock file this old was left by a killed process


def this_host() -> str:
    return socket.gethostname()


def pid_running(pid: int) -> bool:
    """Whether a process with this pid exists on this machine (a zombie counts as gone)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # no /proc (macOS), or it ended just now
        return True
    return stat.rpartition(")")[2].split()[:1] != ["Z"]


def gone_here(host: str | None, pid: int | str | None) -> bool:
    """Whether process `pid` of `host` is proven gone: it ran on this host and runs no more. A
    process of another host, or one without a pid, is never taken for gone."""
    return host == this_host() and pid is not None and not pid_running(int(pid))


@dataclasses.dataclass(frozen=True)
class Owner:
    """Who holds (or held) an example's lock."""

    pid: int
    host: str
    command: str
    started: datetime.datetime
    held: bool | None = None  # whether its OS lock was held when the record was read; None: not looked at

    @property
    def alive(self) -> bool:
        """False only when the owner is proven gone: on this host, its OS lock is free or its pid is gone.

        An owner on another host cannot be checked from here, so it counts as alive.
        """
        if self.held or self.host != this_host():
            return True
        if self.held is False:
            return False
        return pid_running(self.pid)

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
    def parse(cls, data: bytes, held: bool | None = None) -> "Owner | None":
        """The owner recorded in a lock file, or None if the bytes are not such a record."""
        try:
            record = json.loads(data.decode("utf-8"))
            return cls(
                int(record["pid"]),
                str(record["host"]),
                str(record["command"]),
                datetime.datetime.fromisoformat(record["started"]),
                held,
            )
        except (ValueError, TypeError, KeyError, AttributeError):
            return None


def command_line() -> str:
    """This process's command line as it was typed: `python -m pipeline train --example toy`."""
    argv = list(getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv])
    argv[0] = Path(argv[0]).name  # python, not /home/me/project/.venv/bin/python
    text = shlex.join(argv)
    return text if len(text) <= 300 else text[:297] + "..."


def lock_path(model_dir: Path) -> Path:
    return Path(model_dir) / LOCK_NAME


def shown_path(folder: Path) -> str:
    """`models/toy`: relative to the working directory (the project root) when it is inside it."""
    try:
        return str(Path(folder).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(folder)


def lock_owner(model_dir: Path) -> Owner | None:
    """Who holds the example's lock, or held it and died; None when there is no readable lock file.

    `Owner.alive` then says whether that owner is still running. A process holding the lock
    itself sees itself as the owner, alive.
    """
    try:
        fd = os.open(lock_path(model_dir), os.O_RDONLY)
    except OSError:
        return None
    try:
        held = not _try_lock(fd)
        if not held:
            fcntl.flock(fd, fcntl.LOCK_UN)
        return Owner.parse(os.pread(fd, 65536, 0), held)
    finally:
        os.close(fd)


@contextlib.contextmanager
def example_lock(model_dir: Path, command: str | None = None, wait: float = 0.0):
    """Hold the example's lock while the block runs; a PipelineError if another process holds it, at
    once or after waiting `wait` seconds for it.

    `command`: what the lock file says holds it (default: this process's command line). Yields the Owner.
    """
    model_dir = Path(model_dir)
    owner = Owner(os.getpid(), this_host(), command or command_line(), datetime.datetime.now().astimezone(), True)
    made = [folder for folder in (model_dir, *model_dir.parents) if not folder.exists()]  # deepest first
    deadline = time.monotonic() + wait
    while True:
        try:
            fd = _acquire(model_dir, owner)
            break
        except InUse:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.2)
    try:
        yield owner
    finally:
        _release(model_dir, fd, made)


def writes_example(stage):
    """A stage function `(params, paths, ...)` that holds its example's lock while it runs."""

    @functools.wraps(stage)
    def locked(params, paths, *args, **kwargs):
        with example_lock(paths.model_dir):
            return stage(params, paths, *args, **kwargs)

    return locked


class InUse(PipelineError):
    """Another live process holds the example's lock."""


def in_use_message(shown: str, owner: Owner | None, path: Path) -> str:
    holder = owner.describe() if owner else "another process (its lock file holds no readable record)"
    message = f"{shown} is in use by {holder}; wait for it, or stop it"
    if owner and owner.host != this_host():
        message += f" (if it is no longer running on {owner.host}, delete {shown_path(path)})"
    return message


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _same_file(fd: int, path: Path) -> bool:
    """Whether `path` still names the file open as `fd` (not removed or replaced since it was opened)."""
    try:
        here, there = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def _new_lock_file(model_dir: Path, owner: Owner, shown: str) -> tuple[int, str]:
    """A temporary file holding the owner record, already locked: (fd, name)."""
    for attempt in range(RETRIES):
        try:
            model_dir.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=model_dir, prefix=f"{LOCK_NAME}.", suffix=".tmp")
            break
        except FileNotFoundError:  # a writer that had made the folder removed it, empty, on leaving
            if attempt == RETRIES - 1:
                raise PipelineError(f"cannot lock {shown}: its folder keeps disappearing") from None
        except OSError as e:
            raise PipelineError(f"cannot write to {model_dir}: {e.strerror or e} (needed for its lock)") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a new file: nobody else can hold it
        os.fchmod(fd, 0o644)  # mkstemp makes 0600: let other users see who holds the example
        os.write(fd, owner.record())
        os.fsync(fd)
    except OSError as e:
        os.close(fd)
        Path(tmp).unlink(missing_ok=True)
        raise PipelineError(f"cannot lock {shown}: cannot write {shown_path(tmp)} ({e.strerror or e})") from None
    return fd, tmp


def _acquire(model_dir: Path, owner: Owner) -> int:
    """The fd whose OS lock makes this process the example's writer, or a PipelineError."""
    path, shown = lock_path(model_dir), shown_path(model_dir)
    fd, tmp = _new_lock_file(model_dir, owner, shown)
    try:
        seen = None
        for _ in range(RETRIES):
            try:
                os.link(tmp, path)  # appears complete, or not at all; fails if there is one
                _remove_leftovers(model_dir)
                return fd
            except FileExistsError:
                pass
            try:
                old = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                continue  # released a moment ago
            try:
                record = os.pread(old, 65536, 0)
                if not _try_lock(old):  # someone holds it
                    seen = Owner.parse(record, held=True)
                    if _same_file(old, path) and seen and (seen.host != this_host() or pid_running(seen.pid)):
                        raise InUse(in_use_message(shown, seen, path))
                    time.sleep(RETRY_SECONDS)  # being released or taken over right now: look again
                    continue
                if not _same_file(old, path):
                    continue  # released and removed, or taken over, while we looked
                previous = Owner.parse(record, held=False)
                if previous and previous.host != this_host():  # we cannot tell whether it is running
                    raise InUse(in_use_message(shown, previous, path))
                os.rename(tmp, path)  # we hold the old file's lock, so nobody else replaces it meanwhile
                tmp = None
            finally:
                os.close(old)
            _remove_leftovers(model_dir)
            print(_takeover_message(shown, previous, path), file=sys.stderr, flush=True)
            return fd
        raise InUse(in_use_message(shown, seen, path))
    except BaseException:
        os.close(fd)
        raise
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def _takeover_message(shown: str, previous: Owner | None, path: Path) -> str:
    if previous is None:
        return f"{shown}: taking over {shown_path(path)}, which holds no readable record and no process holds"
    return (
        f"{shown}: taking over the lock of pid {previous.pid} ({previous.command!r}, since {previous.since}), "
        "which is no longer running"
    )


def _remove_leftovers(model_dir: Path) -> None:
    """Temporary lock files of processes killed while taking the lock: old, and locked by nobody."""
    for leftover in model_dir.glob(f"{LOCK_NAME}.*.tmp"):
        with contextlib.suppress(OSError):
            fd = os.open(leftover, os.O_RDONLY)
            try:
                if time.time() - os.fstat(fd).st_mtime > LEFTOVER_SECONDS and _try_lock(fd):
                    leftover.unlink()
            finally:
                os.close(fd)


def _release(model_dir: Path, fd: int, made: list[Path]) -> None:
    """Remove the lock file while still holding its OS lock, then let go of it.

    `made`: the folders the lock created, deepest first; those still empty go too, so that a
    command that failed before writing anything leaves no trace.
    """
    try:
        path = lock_path(model_dir)
        if _same_file(fd, path):
            path.unlink()
    except OSError as e:  # a folder made read-only meanwhile: the next writer takes the file over
        print(f"warning: could not remove {shown_path(lock_path(model_dir))}: {e.strerror or e}", file=sys.stderr)
    finally:
        os.close(fd)
    for folder in made:
        try:
            folder.rmdir()
        except OSError:  # not empty (outputs, or another writer's lock): keep it and those above
            break
