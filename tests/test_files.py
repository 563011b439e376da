import errno
import os

import pytest

from pipeline.errors import PipelineError
from pipeline.files import atomic_write, read_json, write_json, write_text


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
