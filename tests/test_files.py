import ctypes
import errno
import os
import resource
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.checkpoint import load_resume_point
from pipeline.config import load_params
from pipeline.errors import PipelineError
from pipeline.files import (
    atomic_write,
    check_writable,
    read_json,
    write_failure,
    write_folder,
    write_json,
    write_text,
)
from pipeline.paths import ExamplePaths
from pipeline.stages.train import train_example
from pipeline.tracking import Tracker

from .helpers import RESUMABLE, ROOT, cli_env, prepared_project, run_cli
from .test_config import files_under


def test_atomic_write_replaces_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "sub" / "out.txt"
    write_text(path, "old")
    write_text(path, "new")
    assert path.read_text() == "new"
    assert [p.name for p in path.parent.iterdir()] == ["out.txt"]


def test_a_write_that_fails_halfway_keeps_the_old_file(tmp_path):
    path = tmp_path / "metrics.json"
    write_json(path, {"loss": 1.0})

    def torn(f):
        f.write(b'{"loss": ')
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(PipelineError, match=f"cannot write {path}: No space left on device"):
        atomic_write(path, torn)
    assert read_json(path) == {"loss": 1.0}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_broken_json_is_named(tmp_path):
    path = tmp_path / "meta.json"
    path.write_text("{")
    with pytest.raises(PipelineError, match="meta.json is not valid JSON"):
        read_json(path)


def test_write_folder_replaces_the_whole_folder(tmp_path):
    folder = tmp_path / "reports"
    write_folder(folder, {"a.png": b"1", "old.txt": b"2"})
    write_folder(folder, {"a.png": b"3", "b.txt": b"4"})
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == {"a.png": b"3", "b.txt": b"4"}
    assert [p.name for p in tmp_path.iterdir()] == ["reports"]


def test_a_folder_write_that_fails_keeps_the_old_folder(tmp_path):
    folder = tmp_path / "reports"
    write_folder(folder, {"a.png": b"1"})
    with pytest.raises(TypeError):  # the second file fails halfway through the folder
        write_folder(folder, {"b.png": b"2", "c.png": "not bytes"})
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == {"a.png": b"1"}
    assert [p.name for p in tmp_path.iterdir()] == ["reports"]


def test_written_files_get_the_usual_permissions(tmp_path):
    write_text(tmp_path / "a.txt", "x")
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o666 & ~umask


def test_an_output_folder_that_cannot_be_made_is_named(tmp_path):
    (tmp_path / "models").write_text("a file where a folder should be")
    with pytest.raises(PipelineError, match=f"cannot write to {tmp_path / 'models' / 'toy'}: "):
        check_writable(tmp_path / "models" / "toy")
    with pytest.raises(PipelineError, match=f"cannot write {tmp_path / 'models' / 'toy' / 'ckpt.pt'}: "):
        write_text(tmp_path / "models" / "toy" / "ckpt.pt", "x")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, empty_store) -> Path:
    """A project whose toy model is trained: the last good checkpoint that must survive."""
    project = prepared_project(tmp_path_factory.mktemp("trained"), empty_store)
    params = load_params(ROOT / "params.yaml", RESUMABLE)["toy"]
    train_example(params, ExamplePaths(project, "toy"), Tracker.for_project(project), progress=False)
    return project


def runs_in(project: Path) -> list:
    client = Tracker.for_project(project).client
    return client.search_runs([client.get_experiment_by_name("toy").experiment_id])


def without_root_override():
    """Root writes into read-only folders: drop that power (CAP_DAC_OVERRIDE) in the child, so read-only means it."""
    if os.geteuid() != 0:
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    PR_CAPBSET_DROP, CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH = 24, 1, 2

    def drop():
        for capability in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
            if libc.prctl(PR_CAPBSET_DROP, capability, 0, 0, 0) != 0:
                raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")

    return drop


def test_a_read_only_model_folder_stops_training_before_a_run_and_keeps_every_file(trained, tmp_path):
    project = tmp_path / "project"
    shutil.copytree(trained, project)
    paths = ExamplePaths(project, "toy")
    before = files_under(paths.model_dir)
    for folder in (paths.checkpoints, paths.model_dir):
        os.chmod(folder, 0o555)
    try:
        result = run_cli(project, "train", *RESUMABLE, "toy.train.max_steps=40", preexec_fn=without_root_override())
    finally:
        for folder in (paths.checkpoints, paths.model_dir):
            os.chmod(folder, 0o755)
    assert result.returncode == 2, result.stderr
    assert f"error: cannot write to {paths.model_dir}: Permission denied" in result.stderr
    assert files_under(paths.model_dir) == before and len(runs_in(project)) == 1


def limit_file_size(limit: int):
    """A disk that takes no file larger than `limit`: what a nearly full disk looks like to a writer."""

    def apply():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write with EFBIG instead of killing

    return apply


def test_a_disk_too_full_for_a_checkpoint_fails_the_run_cleanly_and_keeps_the_last_one(trained, tmp_path):
    project = tmp_path / "project"
    shutil.copytree(trained, project)
    paths = ExamplePaths(project, "toy")
    kept = (paths.checkpoint, paths.history, paths.evals, paths.loss_plot, paths.train_metrics)
    outputs = {path: path.read_bytes() for path in kept}  # run.json will name the new run
    # 6 MB of weights fit under the limit; once AdamW has its state (twice as much again), a checkpoint does not
    bigger = [*RESUMABLE, "toy.model.n_embd=256", "toy.model.n_layer=2"]
    result = run_cli(project, "train", *bigger, preexec_fn=limit_file_size(8_000_000))
    assert result.returncode == 2, result.stderr
    latest = paths.latest_checkpoint
    assert f"error: cannot write {latest}: File too large; {latest} still holds step 0" in result.stderr
    point = load_resume_point(latest)  # the last good checkpoint, whole
    assert point.state.step == 0 and not point.finished
    assert {path: path.read_bytes() for path in kept} == outputs
    assert not list(paths.model_dir.rglob("*.tmp"))
    statuses = {r.info.run_id: r.info.status for r in runs_in(project)}
    assert statuses[point.run_id] == "FAILED" and sorted(statuses.values()) == ["FAILED", "FINISHED"]


COPY_PAST_THE_LIMIT = """
import resource, shutil, sys
from pathlib import Path
from pipeline.runner import run
resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))
source, target = Path(sys.argv[1]), Path(sys.argv[2])
# a write that is not ours (MLflow copying an artifact, say): EFBIG from deep inside another library
sys.exit(run(lambda params, paths: shutil.copyfile(source, target), "toy", Path(sys.argv[3])))
"""


def test_a_write_past_the_limit_anywhere_is_one_line_naming_the_file(tmp_path):
    source, target = tmp_path / "big.bin", tmp_path / "copy.bin"
    source.write_bytes(b"x" * 200_000)
    command = [sys.executable, "-c", COPY_PAST_THE_LIMIT, str(source), str(target), str(ROOT / "params.yaml")]
    result = subprocess.run(command, cwd=tmp_path, env=cli_env(), capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert (
        result.stderr == f"error: cannot write {target}: File too large (the file-size limit, ulimit -f, is 64.0 KiB)\n"
    )


def test_write_failure_knows_a_full_disk_and_nothing_else():
    assert write_failure(OSError(errno.ENOSPC, "No space left on device", "/x/ckpt.pt")).startswith(
        "cannot write /x/ckpt.pt: No space left on device"
    )
    wrapped = RuntimeError("could not save")
    wrapped.__cause__ = OSError(errno.EDQUOT, "Disk quota exceeded", "/x/y")
    assert write_failure(wrapped).startswith("cannot write /x/y: Disk quota exceeded")
    assert write_failure(OSError(errno.EACCES, "Permission denied", "/x")) is None
    assert write_failure(ValueError("no")) is None
