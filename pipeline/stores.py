"""The databases behind MLflow and Optuna: a broken, foreign or read-only one is one clear line.

MLflow and SQLAlchemy report these as long tracebacks (a file that is not a database, a URI
scheme nobody supports, a read-only file first noticed at the first write); here each becomes
a PipelineError that names the store and the problem, before any work is done.
"""

import contextlib
import logging
import os
import re
import sqlite3
import sys
from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.files import SQLITE_WRITE_FAULTS, check_room, limit_note

MLFLOW_SCHEMES = "sqlite:///<file>, postgresql://..., mysql://..., http(s)://<server> or file:<folder>"


def hide_password(url: str) -> str:
    """`postgresql://me:secret@host/db` -> `postgresql://me:***@host/db`."""
    return re.sub(r"(://[^/:@]+:)[^/@]*@", r"\1***@", url)


def sqlite_file(url: str) -> Path | None:
    """The database file of a `sqlite:///...` URL; None for any other URL or an in-memory database."""
    if not url.startswith("sqlite:///"):  # sqlite:///relative/file or sqlite:////absolute/file
        return None
    path = url.removeprefix("sqlite:///").split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


def problem(error: BaseException) -> str:
    """The first line of a driver's or MLflow's message, without SQLAlchemy's `(sqlite3.X) ` prefix."""
    error = getattr(error, "orig", None) or error  # SQLAlchemy wraps the driver's error
    text = getattr(error, "message", None) or str(error)
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    # SQLAlchemy may open with a note on where it failed, not what failed
    line = next((line for line in lines if not line.startswith("(raised as a result of")), type(error).__name__)
    return re.sub(r"^\([\w.]+\)\s*", "", line)[:300]


def check_sqlite_writable(url: str, what: str) -> None:
    """Fail now, not at the first write, if the SQLite file behind `url` cannot be written.

    `what` names the store in the message, e.g. "the MLflow store".
    """
    path = sqlite_file(url)
    if path is None or not path.exists():
        return
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError as e:
        raise PipelineError(f"{what} {path} cannot be written ({e.strerror or e}): make it writable") from None
    os.close(fd)


def check_sqlite_opens(url: str, what: str) -> None:
    """Fail at once for a SQLite file that can never be opened (a folder that cannot be made, a path
    under /proc, a folder in the file's place): MLflow would retry it for a minute. Only a lock,
    which another process lets go of, is left to the store's own waiting."""
    path = sqlite_file(url)
    if path is None:
        return
    probe = not path.exists()  # a file made only to try it is removed: the store makes its own
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.closing(sqlite3.connect(path, timeout=0)) as db:
            db.execute("PRAGMA schema_version")  # reads the header: opens the file for real
        if probe:
            path.unlink(missing_ok=True)
    except OSError as e:
        raise PipelineError(f"{what} {path} cannot be created: {e.strerror or e} ({e.filename})") from None
    except sqlite3.Error as e:
        if "locked" not in str(e):
            raise PipelineError(f"{what} {path}{chosen_by_env(url)} cannot be opened: {e}") from None


def chosen_by_env(uri: str) -> str:
    """` (MLFLOW_TRACKING_URI)` when the variable chose `uri`: what the user has to change."""
    return " (MLFLOW_TRACKING_URI)" if os.environ.get("MLFLOW_TRACKING_URI") == uri else ""


class _OneRetryLine(logging.Filter):
    """Turns MLflow's multi-line warning at every retry of a database server into one line, once."""

    def __init__(self, uri: str):
        super().__init__()
        self.uri, self.said = uri, False

    def filter(self, record: logging.LogRecord) -> bool:
        if "will be retried" in record.getMessage() and not self.said:
            error = record.args[0] if record.args else ""
            print(
                f"the MLflow store {hide_password(self.uri)} does not answer yet ({problem(error)}): "
                f"MLflow retries for up to {mlflow_retry_seconds():.0f} s, as a starting server may need",
                file=sys.stderr,
            )
            self.said = True
        return "will be retried" not in record.getMessage()


def mlflow_retry_seconds() -> float:
    """How long MLflow keeps retrying a database it cannot connect to (create_sqlalchemy_engine_with_retry)."""
    from mlflow.store.db.utils import MAX_RETRY_COUNT

    return sum(0.1 * (2**attempt - 1) for attempt in range(1, MAX_RETRY_COUNT))


@contextlib.contextmanager
def retries_in_one_line(uri: str):
    """While the block opens the store, MLflow's retries of a database server say so on one line."""
    logger, one_line = logging.getLogger("mlflow.store.db.utils"), _OneRetryLine(uri)
    logger.addFilter(one_line)
    try:
        yield
    finally:
        logger.removeFilter(one_line)


FRESH_STORE_BYTES = 2**20  # a new MLflow SQLite store with its tables is some 900 KiB
STORE_GROWTH_BYTES = 2**20  # what one command adds at most: a run's params, tags and metrics


def check_store_room(url: str, what: str) -> None:
    """Fail before any work if the SQLite store could not grow: past the file-size limit, a full disk."""
    path = sqlite_file(url)
    if path is None:
        return
    size = path.stat().st_size if path.exists() else FRESH_STORE_BYTES
    check_room(path, size + STORE_GROWTH_BYTES, f"{what} {path}")


def store_write_fault(uri: str, error: BaseException) -> str | None:
    """The one line for a store that a full disk or a file-size limit stopped writing; None otherwise."""
    seen = error
    while seen is not None:
        if fault := next((fault for fault in SQLITE_WRITE_FAULTS if fault in str(seen)), None):
            store = sqlite_file(uri) or hide_password(uri)
            return f"the MLflow store {store} cannot be written: {fault}{limit_note()}"
        seen = seen.__cause__ or seen.__context__
    return None


class QuietStoreErrors(logging.Filter):
    """Drops MLflow's logged traceback of a failed database write: the error itself becomes one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "SQLAlchemy database error" not in record.getMessage()


def quiet_store_errors() -> None:
    logger = logging.getLogger("mlflow.store.db.utils")
    if not any(isinstance(f, QuietStoreErrors) for f in logger.filters):
        logger.addFilter(QuietStoreErrors())


def mlflow_store_problem(uri: str, error: BaseException) -> str:
    """The one line for an MLflow store that a client cannot open."""
    shown, origin = hide_password(uri), chosen_by_env(uri)
    if "unsupported URI" in str(error) or type(error).__name__.startswith("Unsupported"):
        scheme = uri.partition("://")[0] if "://" in uri else uri.partition(":")[0]
        return f"the MLflow store {shown}{origin} has an unsupported URI scheme '{scheme}': use {MLFLOW_SCHEMES}"
    if path := sqlite_file(uri):
        return f"the MLflow store {path}{origin} cannot be opened: {problem(error)}"
    return f"the MLflow store {shown}{origin} cannot be opened: {problem(error)}"
