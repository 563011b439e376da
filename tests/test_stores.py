"""pipeline/stores.py: a store that can never open fails at once; one that may be starting says so once."""

import logging

import pytest

from pipeline.errors import PipelineError
from pipeline.stores import check_sqlite_opens, retries_in_one_line


def test_a_sqlite_file_that_can_never_open_fails_at_once(tmp_path):
    with pytest.raises(PipelineError, match=r"^the store /proc/x.db cannot be opened: unable to open database file$"):
        check_sqlite_opens("sqlite:////proc/x.db", "the store")
    (tmp_path / "garbage.db").write_bytes(b"not SQLite at all, but long enough to have a header" * 4)
    with pytest.raises(PipelineError, match="cannot be opened: file is not a database"):
        check_sqlite_opens(f"sqlite:///{tmp_path / 'garbage.db'}", "the store")


def test_a_new_sqlite_file_is_only_tried_and_left_to_the_store_to_make(tmp_path):
    check_sqlite_opens(f"sqlite:///{tmp_path / 'new' / 'mlflow.db'}", "the store")
    assert (tmp_path / "new").is_dir() and not (tmp_path / "new" / "mlflow.db").exists()


def test_mlflow_retrying_a_database_server_is_said_once_on_one_line(capsys):
    """MLflow logs five lines at each of its ten attempts; a server that is starting needs them, the user one line."""
    logger = logging.getLogger("mlflow.store.db.utils")
    with retries_in_one_line("postgresql://me:secret@db/x"):
        for wait in (0.1, 0.3, 0.7):
            refused = ConnectionRefusedError("connection refused\n(Background on this error at: ...)")
            logger.warning(
                "SQLAlchemy engine could not be created.\n%s\nOperation will be retried in %.1f s", refused, wait
            )
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "the MLflow store postgresql://me:***@db/x does not answer yet (connection refused): MLflow retries for up to "
    )
    assert not [f for f in logger.filters if type(f).__name__ == "_OneRetryLine"]  # only while the store opens
