"""Broken stores and files stop the real command line with one `error:` line, exit status 2 and nothing
written: no traceback.

Read-only files: the tests run as root in CI, where chmod does not stop a write. There the file is made
immutable with `chattr +i` (ext4, xfs, btrfs; the test is skipped where the filesystem lacks it), which
stops root as well; as another user, a plain chmod 444 does.
"""

import contextlib
import hashlib
import os
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from .helpers import ROOT, TINY, cli_env, prepared_project, read_only, run_cli

FAST = TINY["toy"]


def one_error(result) -> str:
    """The command's only stderr line, after checking it failed cleanly with status 2."""
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_count(store: Path) -> int:
    with contextlib.closing(sqlite3.connect(f"file:{store}?mode=ro", uri=True)) as db:
        return db.execute("SELECT count(*) FROM runs").fetchone()[0]


def nothing_trained(project: Path) -> bool:
    folder = project / "models/toy"
    return not folder.exists() or not any(folder.iterdir())


@pytest.fixture
def toy_project(tmp_path, empty_store):
    """The toy example prepared, with an empty MLflow store."""
    return prepared_project(tmp_path / "project", empty_store, FAST)


# ---------------------------------------------------------------- the MLflow store


def test_an_mlflow_db_that_is_not_a_database(tmp_path):
    project = prepared_project(tmp_path / "project", None, FAST)
    (project / "mlflow.db").write_bytes(b"garbage, not SQLite\n")
    before = digest(project / "mlflow.db")
    result = run_cli(project, "train", *FAST, flags=("--no-progress",))
    store = project / "mlflow.db"
    assert one_error(result) == f"error: the MLflow store {store} cannot be opened: file is not a database"
    assert digest(project / "mlflow.db") == before and nothing_trained(project)


def test_an_unsupported_tracking_uri(tmp_path):
    project = prepared_project(tmp_path / "project", None, FAST)
    result = run_cli(project, "train", *FAST, flags=("--no-progress",), env=cli_env(MLFLOW_TRACKING_URI="garbage://x"))
    assert one_error(result) == (
        "error: the MLflow store garbage://x (MLFLOW_TRACKING_URI) has an unsupported URI scheme 'garbage': "
        "use sqlite:///<file>, postgresql://..., mysql://..., http(s)://<server> or file:<folder>"
    )
    assert not (project / "mlflow.db").exists() and nothing_trained(project)


@pytest.mark.parametrize(
    "uri, line",
    [
        (
            "sqlite:////proc/x.db",
            "the MLflow store /proc/x.db (MLFLOW_TRACKING_URI) cannot be opened: unable to open database file",
        ),
        (
            "sqlite:////dev/null/x/y.db",
            "the MLflow store /dev/null/x/y.db cannot be created: Not a directory (/dev/null/x)",
        ),
    ],
    ids=["under /proc", "under a file"],
)
def test_a_store_that_can_never_open_fails_at_once_without_retries(tmp_path, uri, line):
    project = prepared_project(tmp_path / "project", None, FAST)
    started = time.monotonic()
    result = run_cli(project, "sample", env=cli_env(MLFLOW_TRACKING_URI=uri))
    assert one_error(result) == f"error: {line}"  # MLflow retried for a minute, a warning at each attempt
    assert time.monotonic() - started < 30 and "retried" not in result.stdout


@pytest.mark.parametrize("existing", [True, False], ids=["a store", "no store yet"])
def test_a_store_past_the_file_size_limit_is_one_line_before_any_run(tmp_path, empty_store, existing):
    """`ulimit -f 200`: MLflow's logged tracebacks, then a two-line error, or a half-made new store."""
    from .test_files import limit_file_size

    project = prepared_project(tmp_path / "project", empty_store if existing else None, FAST)
    store = project / "mlflow.db"
    before = digest(store) if existing else None
    result = run_cli(project, "train", *FAST, flags=("--no-progress",), preexec_fn=limit_file_size(200 * 1024))
    line = one_error(result)
    assert line.startswith(f"error: cannot write the MLflow store {store}: it needs ")
    assert line.endswith(", past this process's file-size limit of 200.0 KiB (ulimit -f): raise the limit")
    assert (digest(store) == before and run_count(store) == 0) if existing else not store.exists()
    assert nothing_trained(project)


def test_a_read_only_mlflow_db_stops_writers_but_not_compare(toy_project):
    store = toy_project / "mlflow.db"
    before = digest(store)
    with read_only(store):
        result = run_cli(toy_project, "train", *FAST, flags=("--no-progress",))
        compare_command = [sys.executable, "-m", "pipeline", "compare"]
        compare = subprocess.run(compare_command, cwd=toy_project, env=cli_env(), capture_output=True, text=True)
    line = one_error(result)  # Operation not permitted (chattr +i), or Permission denied (chmod 444)
    assert line.startswith(f"error: the MLflow store {store} cannot be written (") and line.endswith(
        "): make it writable"
    )
    assert digest(store) == before and run_count(store) == 0 and nothing_trained(toy_project)
    assert compare.returncode == 0 and "no runs in" in compare.stdout, compare.stderr


# ---------------------------------------------------------------- the params file


def test_a_params_file_that_is_not_utf8(project):
    text = (ROOT / "params.yaml").read_text(encoding="utf-8").replace("# Parameters", "# Param\xe8tres", 1)
    (project / "params.yaml").write_bytes(text.encode("latin-1"))
    result = run_cli(project, "prepare", flags=("--params", "params.yaml"))
    offset = text.index("\xe8")
    assert one_error(result) == (
        f"error: params.yaml is not UTF-8 text: byte 0xe8 at offset {offset} (invalid continuation byte); "
        "save it as UTF-8"
    )
    assert not (project / "data/toy/prepared").exists() and not (project / "models").exists()


# ---------------------------------------------------------------- the Optuna storage


def test_an_optuna_db_that_is_not_a_database(toy_project):
    (toy_project / "optuna.db").write_bytes(b"garbage, not SQLite\n")
    result = run_cli(toy_project, "tune", *FAST, flags=("--no-progress",))
    url = f"sqlite:///{toy_project / 'optuna.db'}"
    assert one_error(result) == f"error: cannot open the Optuna storage {url}: file is not a database"
    assert run_count(toy_project / "mlflow.db") == 0 and nothing_trained(toy_project)


def make_optuna_db(path: Path) -> None:
    import optuna

    optuna.storages.RDBStorage(f"sqlite:///{path}").engine.dispose()


def test_a_read_only_optuna_db(toy_project):
    storage = toy_project / "optuna.db"
    make_optuna_db(storage)
    before = digest(storage)
    with read_only(storage):
        result = run_cli(toy_project, "tune", *FAST, flags=("--no-progress",))
    line = one_error(result)
    assert line.startswith(f"error: the Optuna storage {storage} cannot be written (") and line.endswith(
        "): make it writable"
    )
    assert digest(storage) == before and run_count(toy_project / "mlflow.db") == 0 and nothing_trained(toy_project)


TUNE_WITH_SHORT_WAIT = """
import sys
import pipeline.tuning.storage
pipeline.tuning.storage.SQLITE_BUSY_SECONDS = 1  # the real wait is a minute
from pipeline.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_an_optuna_db_locked_by_another_process_for_longer_than_the_wait(toy_project):
    storage = toy_project / "optuna.db"
    make_optuna_db(storage)
    held, release = threading.Event(), threading.Event()

    def hold_exclusively():  # another writer in the middle of a long transaction: nobody may even read
        with contextlib.closing(sqlite3.connect(storage, isolation_level=None)) as db:
            db.execute("BEGIN EXCLUSIVE")
            held.set()
            release.wait(120)
            db.execute("ROLLBACK")

    holder = threading.Thread(target=hold_exclusively)
    holder.start()
    try:
        held.wait(10)
        sets = [arg for override in FAST for arg in ("--set", override)]
        command = [sys.executable, "-c", TUNE_WITH_SHORT_WAIT, "tune", "--example", "toy", "--no-progress"]
        command += ["--params", str(ROOT / "params.yaml"), *sets]
        result = subprocess.run(command, cwd=toy_project, env=cli_env(), capture_output=True, text=True)
    finally:
        release.set()
        holder.join()
    url = f"sqlite:///{storage}"
    assert one_error(result) == (
        f"error: cannot open the Optuna storage {url}: database is locked: another process has held it for over "
        "1 s; wait for it, or stop it"
    )
    assert run_count(toy_project / "mlflow.db") == 0 and nothing_trained(toy_project)


# ---------------------------------------------------------------- sizes


def test_a_batch_that_cannot_fit_is_refused_before_its_mlflow_run(toy_project):
    """10^7 windows of the toy's 5 positions: some 400 GB of activations. Once, the kernel killed it."""
    result = run_cli(toy_project, "train", *FAST, "toy.train.batch_size=10000000", "toy.train.sampling=random")
    line = one_error(result)
    assert line.startswith("error: training toy needs about ") and " GiB (parameters " in line
    assert ", activations " in line and line.endswith("free: lower toy.train.batch_size or toy.model.block_size")
    assert run_count(toy_project / "mlflow.db") == 0 and nothing_trained(toy_project)


# ---------------------------------------------------------------- sampling


def test_max_new_tokens_has_an_upper_bound(project):
    result = run_cli(project, "sample", "toy.sample.max_new_tokens=1000000000")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "toy.sample.max_new_tokens: Input should be less than or equal to 100000 (got 1000000000)" in result.stderr
    assert not (project / "models").exists()


GENERATE = """
import torch
from pipeline.model import GPT, GPTConfig
from pipeline.sampling import generate
model = GPT(GPTConfig(block_size=8, n_layer=1, n_head=1, n_embd=8, dropout=0.0, bias=False, vocab_size=5))
out = generate(model, torch.zeros((1, 1), dtype=torch.long), 300, progress=True)
print(out.shape[1])
"""


def generate_with_stderr(stderr) -> subprocess.CompletedProcess:
    command = [sys.executable, "-c", GENERATE]
    return subprocess.run(command, env=cli_env(), stdout=subprocess.PIPE, stderr=stderr, text=True, timeout=120)


def test_a_long_generation_shows_a_progress_bar_on_a_terminal_only():
    import fcntl
    import pty
    import struct
    import termios

    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a new pty is 0 columns wide
    shown = []

    def read_terminal():
        with contextlib.suppress(OSError):  # EIO once the terminal is closed
            while chunk := os.read(controller, 65536):
                shown.append(chunk)

    reader = threading.Thread(target=read_terminal)
    reader.start()
    try:
        on_terminal = generate_with_stderr(terminal)
    finally:
        os.close(terminal)
        reader.join(10)
        os.close(controller)
    assert on_terminal.stdout == "301\n"
    assert b"sampling:" in b"".join(shown) and b"/300 [" in b"".join(shown)
    piped = generate_with_stderr(subprocess.PIPE)
    assert piped.stdout == "301\n" and piped.stderr == ""
