"""The per-example writer lock, with real processes: a holder, a second writer, a killed holder."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.errors import PipelineError
from pipeline.locks import example_lock, lock_owner, lock_path, owner_path

from .helpers import cli_env, read_only, run_cli

HOLDER = """
import sys, time
from pathlib import Path
from pipeline.locks import example_lock
with example_lock(Path(sys.argv[1]), sys.argv[2]):
    print("locked", flush=True)
    time.sleep(float(sys.argv[3]))
"""
TRAIN = "python -m pipeline train --example toy"


def hold(project: Path, seconds: float = 60, command: str = TRAIN) -> subprocess.Popen:
    """A process that holds models/toy's lock for `seconds`, once it has printed `locked`."""
    process = subprocess.Popen(
        [sys.executable, "-c", HOLDER, "models/toy", command, str(seconds)],
        cwd=project,
        env=cli_env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout.readline() == "locked\n"
    return process


@pytest.fixture
def holder(project):
    process = hold(project)
    yield process
    process.kill()
    process.wait()


def test_a_second_writer_stops_at_once_with_one_line(project, holder):
    started = time.monotonic()
    result = run_cli(project, "prepare", "toy.data.repeats=2")
    assert result.returncode == 2
    assert re.fullmatch(
        rf"error: models/toy is in use by '{TRAIN}' \(pid {holder.pid} on this host, since \d\d:\d\d:\d\d\); "
        r"wait for it, or stop it\n",
        result.stderr,
    ), result.stderr
    assert result.stdout == ""
    assert time.monotonic() - started < 30  # no waiting for the holder (60 s)
    assert not (project / "data/toy/prepared").exists()  # nothing written
    assert sorted(os.listdir(project / "models/toy")) == [".lock", ".lock.owner"]  # no temporary file left either


def test_the_lock_of_a_killed_process_is_taken_over_and_says_so(project):
    process = hold(project)
    assert lock_owner(project / "models/toy").alive
    process.send_signal(signal.SIGKILL)
    process.wait()
    owner = lock_owner(project / "models/toy")
    assert owner.pid == process.pid and owner.command == TRAIN and not owner.alive
    result = run_cli(project, "prepare", "toy.data.repeats=2")
    assert result.returncode == 0, result.stderr
    assert re.search(
        rf"models/toy: taking over the lock of pid {process.pid} \('{TRAIN}', since \d\d:\d\d:\d\d\), "
        r"which is no longer running\n",
        result.stderr,
    ), result.stderr
    assert (project / "data/toy/prepared/meta.json").exists()
    assert os.listdir(project / "models/toy") == []  # released at the end; the folder was there before


def test_a_lock_file_with_garbage_is_taken_over(project):
    (project / "models/toy").mkdir(parents=True)
    owner_path(project / "models/toy").write_bytes(b"\x00\xffnot a record")
    assert lock_owner(project / "models/toy") is None
    result = run_cli(project, "prepare", "toy.data.repeats=2")
    assert result.returncode == 0, result.stderr
    assert "models/toy: taking over models/toy/.lock.owner, which holds no readable record" in result.stderr
    assert not lock_path(project / "models/toy").exists() and not owner_path(project / "models/toy").exists()


def test_the_lock_file_is_gone_after_a_clean_exit(project):
    process = hold(project, seconds=0)
    assert process.wait() == 0
    assert not lock_path(project / "models/toy").exists()
    assert lock_owner(project / "models/toy") is None
    result = run_cli(project, "prepare", "toy.data.repeats=2")
    assert result.returncode == 0 and "taking over" not in result.stderr
    assert not (project / "models").exists()  # made for the lock alone, and removed with it


def test_a_folder_made_for_the_lock_alone_is_removed_with_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with example_lock(tmp_path / "models/toy", "me"):
        assert lock_path(tmp_path / "models/toy").exists()
    assert not (tmp_path / "models").exists()
    with example_lock(tmp_path / "models/toy", "me"):
        (tmp_path / "models/toy/ckpt.pt").write_bytes(b"an output")
    assert os.listdir(tmp_path / "models/toy") == ["ckpt.pt"]


def test_the_holder_sees_itself_alive_and_others_are_refused_in_process(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "models/toy"
    with example_lock(folder, "me") as me:
        owner = lock_owner(folder)
        assert (owner.pid, owner.command, owner.alive) == (os.getpid(), "me", True)
        assert me.pid == os.getpid()
        refused = r"^models/toy is in use by 'me' \(pid \d+ on this host"
        with pytest.raises(PipelineError, match=refused), example_lock(folder, "again"):
            pass
        assert lock_path(folder).exists()  # the refused attempt did not remove the holder's file
    assert not lock_path(folder).exists()


RACER = """
import sys, time
from pathlib import Path
from pipeline.errors import PipelineError
from pipeline.locks import example_lock
time.sleep(max(0.0, float(sys.argv[1]) - time.time()))
try:
    with example_lock(Path("models/toy"), "racer"):
        time.sleep(3)
except PipelineError as e:
    print(e, file=sys.stderr)
    sys.exit(2)
"""


def test_processes_racing_for_a_lock_get_one_writer(project):
    (project / "models/toy").mkdir(parents=True)
    go = str(time.time() + 3)  # every racer is loaded by then, and they start together
    racers = [
        subprocess.Popen([sys.executable, "-c", RACER, go], cwd=project, env=cli_env(), stderr=subprocess.PIPE)
        for _ in range(6)
    ]
    codes = [racer.wait() for racer in racers]
    assert sorted(codes) == [0] + [2] * 5, [racer.stderr.read() for racer in racers]
    assert os.listdir(project / "models/toy") == []


def test_a_read_only_folder_is_a_clear_error(project):
    folder = project / "models/toy"
    folder.mkdir(parents=True)
    with read_only(folder):
        result = run_cli(project, "prepare", "toy.data.repeats=2")
    assert result.returncode == 2
    assert re.fullmatch(r"error: cannot write to \S*models/toy: [^\n]+ \(needed for its lock\)\n", result.stderr)
    assert not (project / "data/toy/prepared").exists()
